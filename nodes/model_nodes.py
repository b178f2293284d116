"""Load, quantize and save INT8 diffusion models (V3 nodes)."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..lora import preload
from ..ops import loader, profiles, saving
from ..ops.config import ATTENTION_CHOICES, ROTATE_GROUPS, WEIGHT_SCALES, ConvertOptions
from .lora_nodes import LoraStack
from .report import show

CATEGORY = "loaders/int8 w8a8"
SAVE_CATEGORY = "model/merging"  # beside ComfyUI's own Save Model / Save Checkpoint nodes
SAVE_FOLDER = "diffusion_models"

PROFILE_TOOLTIP = (
    "Which architecture the model is, deciding which layers stay in BF16 when converting (embedders, "
    "modulation, output head). 'auto' detects it from the weights. Pre-quantized files keep their own choice."
)
SCALE_TOOLTIP = (
    "Used when converting a BF16/FP16/FP8 model: one scale per output channel (per-row, more accurate) or one "
    "per weight (per-tensor, what some older INT8 files use). Pre-quantized files keep their scales."
)
CONVROT_TOOLTIP = (
    "Used when converting: rotate groups of input channels with a Hadamard matrix before quantizing (ConvRot), "
    "which spreads outliers and improves quality at a small speed cost (klein 9B: +3 dB, ~8% slower with 256). "
    "0 = off; 256 is the ComfyUI-native default and the fastest; 64 and 128 rotate with a full matrix, slower. "
    "Needs weight_scale per-row. Stock ComfyUI runs 64 and 256 only, so Save INT8 Model refuses 128."
)

ATTENTION_TOOLTIP = (
    "Attention inside the pack's fused transformer blocks. 'bf16': ComfyUI's attention, the backend you chose "
    "for ComfyUI (as without this option). '8-bit': the pack's 8-bit attention (INT8 Q K^T, P V in the "
    "model's 16-bit type; about 1.2% relative error): a Gluon kernel on Hopper (Triton where Gluon is "
    "unavailable), comfy-kitchen's where measured faster, the PyTorch twin on the CPU; calls it cannot take "
    "(masks, head sizes other than 64/128, FP32) and GPUs without an 8-bit attention worth running use ComfyUI's. "
    "'auto': 8-bit only where it was measured faster than ComfyUI's attention on this GPU generation and within "
    "the accuracy bound (2% relative error); on an H200 that is calls with at least 8192 tokens (1.03-1.24x "
    "cuDNN's BF16 attention there: video, images from about 1400x1400; 0.91x at 4608), shorter ones keep "
    "ComfyUI's. Models and blocks that run ComfyUI's own code (fallbacks, architectures without fused blocks) "
    "always keep ComfyUI's attention."
)

EXTRA_BLOCKS_TOOLTIP = (
    "Used when converting: also quantize the blocks the model profile keeps in BF16 only by convention, as "
    "community INT8 files do: Z-Image's noise and context refiners (ComfyUI's FP8 'fast' quantizes them). The noise "
    "refiners then run the fused INT8 block like the main layers: a faster step, at a small cost in accuracy. "
    "Off: they stay in BF16. No effect on other architectures (their profiles keep only embedders, modulation and "
    "output layers) or on pre-quantized files, which decide their layers themselves."
)


def conversion_problem(weight_scale, convrot_group) -> str | None:
    """Why the conversion inputs cannot be used together (naming the inputs and what works), or None."""
    groups = [str(g) for g in ROTATE_GROUPS]
    if weight_scale not in WEIGHT_SCALES:
        return f"weight_scale: {weight_scale!r} is not one of {', '.join(WEIGHT_SCALES)}"
    if str(convrot_group) not in groups:
        return f"convrot_group: {convrot_group!r} is not one of {', '.join(groups)}"
    if weight_scale == "per-tensor" and str(convrot_group) != "0":
        return (f"convrot_group {convrot_group} needs weight_scale 'per-row': ConvRot rotates the weights before "
                "quantizing them, with one scale per output row. Set weight_scale to per-row, or convrot_group to 0 "
                "to keep per-tensor scales.")
    return None


def _convert_options(weight_scale: str, convrot_group: str) -> ConvertOptions:
    problem = conversion_problem(weight_scale, convrot_group)
    if problem is not None:  # validate_inputs catches widget values; this catches values from links
        raise ValueError(problem)
    return ConvertOptions(per_row=weight_scale == "per-row", rotate_group=int(convrot_group))


def _validate_conversion(weight_scale=None, convrot_group=None) -> bool | str:
    # Only the inputs named here are handed over; ComfyUI skips its own option check for them, hence the list
    # checks in conversion_problem. A value coming from a link is not known yet (None): execute checks it.
    if weight_scale is None or convrot_group is None:
        return True
    return conversion_problem(weight_scale, convrot_group) or True


def _conversion_inputs() -> list:
    return [
        io.Combo.Input("model_profile", options=list(profiles.CHOICES), default=profiles.AUTO,
                       tooltip=PROFILE_TOOLTIP),
        io.Combo.Input("weight_scale", options=["per-row", "per-tensor"], default="per-row", tooltip=SCALE_TOOLTIP),
        io.Combo.Input("convrot_group", options=[str(g) for g in ROTATE_GROUPS], default="0", tooltip=CONVROT_TOOLTIP,
                       advanced=True),
    ]


def _attention_input():
    # the last widget, advanced and optional: workflows saved before the option keep their widget values in place
    # (the frontend reads them by position) and API prompts without it still validate; both get "auto"
    return io.Combo.Input("attention", options=list(ATTENTION_CHOICES), default="auto", tooltip=ATTENTION_TOOLTIP,
                          advanced=True, optional=True)


def _extra_blocks_input():
    # after attention, advanced and optional, for the same reason
    return io.Boolean.Input("quantize_extra_blocks", default=False, tooltip=EXTRA_BLOCKS_TOOLTIP, advanced=True,
                            optional=True)


def output_folder() -> str:
    """Where Save INT8 Model writes: ComfyUI's models/diffusion_models folder.

    ComfyUI 0.29 lists the legacy models/unet folder first for "diffusion_models"; the documented folder is
    the models/diffusion_models beside it. A folder set up first by the user (extra_model_paths.yaml with
    is_default) stays first.
    """
    folders = [os.path.normpath(f) for f in folder_paths.get_folder_paths(SAVE_FOLDER)]
    first = folders[0]
    if os.path.basename(first) == "unet":
        beside = os.path.join(os.path.dirname(first), SAVE_FOLDER)
        if beside in folders:
            return beside
    return first


class Int8DiffusionModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Int8DiffusionModelLoader",
            display_name="Load Diffusion Model (INT8 W8A8)",
            category=CATEGORY,
            description="Loads a diffusion model for INT8 weights and activations: INT8 files of any common format "
                        "as they are, BF16/FP16/FP32/FP8 files converted to INT8 on load, layer by layer. Shows what "
                        "it loaded and converted on the node.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="A file from models/diffusion_models: INT8 (native, ConvRot, INT8-Fast, "
                                       "ModelOpt, SmoothQuant) or BF16/FP16/FP32/FP8 to convert on load."),
                *_conversion_inputs(),
                _attention_input(),
                _extra_blocks_input(),
                LoraStack.Input("lora_stack", optional=True,
                                tooltip="LoRAs from 'LoRA Stack (INT8, before quantization)'. When the file is "
                                        "converted on load they are added to the float weights before quantizing "
                                        "(one rounding); on INT8 files they are merged like the merge node."),
            ],
            outputs=[io.Model.Output(tooltip="The model with its Linear layers on INT8 W8A8 kernels.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, weight_scale=None, convrot_group=None) -> bool | str:
        return _validate_conversion(weight_scale, convrot_group)

    @classmethod
    def execute(cls, unet_name, model_profile, weight_scale, convrot_group, attention="auto",
                quantize_extra_blocks=False, lora_stack=None) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        built: list = []
        text: list[str] = []
        prepare = preload.factory(tuple(lora_stack), unet_name, sink=built) if lora_stack else None
        options = loader.LoadOptions(profile=model_profile, convert=_convert_options(weight_scale, convrot_group),
                                     prepare=prepare, attention=attention,
                                     quantize_extra_blocks=bool(quantize_extra_blocks), notify=text.append)
        model = loader.load_file(path, options)
        lines = text[-1:] + ([r.summary() for r in built[-1].reports] if built else [])
        return io.NodeOutput(model, ui=show(cls, lines))


class Int8QuantizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Int8QuantizeModel",
            display_name="Quantize Model to INT8",
            category=CATEGORY,
            description="Returns a clone of the model whose Linear weights are INT8 (W8A8), keeping its LoRAs and "
                        "settings. The input model is left as it is.",
            inputs=[io.Model.Input("model", tooltip="A diffusion model from any loader, e.g. the stock BF16 one."),
                    *_conversion_inputs(), _attention_input(), _extra_blocks_input()],
            outputs=[io.Model.Output(tooltip="The INT8 clone.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, weight_scale=None, convrot_group=None) -> bool | str:
        return _validate_conversion(weight_scale, convrot_group)

    @classmethod
    def execute(cls, model, model_profile, weight_scale, convrot_group, attention="auto",
                quantize_extra_blocks=False) -> io.NodeOutput:
        text: list[str] = []
        options = loader.LoadOptions(profile=model_profile, convert=_convert_options(weight_scale, convrot_group),
                                     attention=attention, quantize_extra_blocks=bool(quantize_extra_blocks),
                                     notify=text.append)
        out = loader.quantize_model(model, options)
        return io.NodeOutput(out, ui=show(cls, text[-1:] or ["the model is already INT8; returned unchanged"]))


class Int8SaveModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Int8SaveModel",
            display_name="Save INT8 Model",
            category=SAVE_CATEGORY,
            description="Writes the diffusion model as a ComfyUI-native int8_tensorwise file into "
                        "models/diffusion_models, with every LoRA on it (merged or dynamic) merged into the weights; "
                        "stock ComfyUI (0.27+) loads and runs it without this pack. Shows the saved file on the node.",
            inputs=[
                io.Model.Input("model", tooltip="An INT8 model (from the INT8 loader or Quantize Model to INT8); "
                                                "LoRAs applied to it, merged or dynamic, are merged into the saved "
                                                "weights (requantized once). ConvRot group 128 and SmoothQuant models "
                                                "are refused: stock ComfyUI cannot run them."),
                io.String.Input("filename_prefix", default="int8/model",
                                tooltip="File name under models/diffusion_models; a counter and .safetensors are "
                                        "added. Use a/b to write into a subfolder."),
            ],
            outputs=[],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix) -> io.NodeOutput:
        out_dir = output_folder()
        full_dir, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        os.makedirs(full_dir, exist_ok=True)
        path = os.path.join(full_dir, f"{name}_{counter:05}_.safetensors")
        report = saving.save(model, path)
        listed = os.path.relpath(path, out_dir).replace(os.sep, "/")
        return io.NodeOutput(ui=show(cls, [report.summary(), f"the loaders list it as {listed}"]))
