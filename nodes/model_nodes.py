"""Load, quantize and save INT8 diffusion models (V3 nodes)."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..lora import preload
from ..ops import loader, profiles
from ..ops.config import ROTATE_GROUPS, ConvertOptions
from .lora_nodes import LoraStack

CATEGORY = "loaders/int8 w8a8"

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
    "0 = off; 256 is the ComfyUI-native default and the fastest; 64 and 128 rotate with a full matrix, slower."
)


def _convert_options(weight_scale: str, convrot_group: str) -> ConvertOptions:
    return ConvertOptions(per_row=weight_scale == "per-row", rotate_group=int(convrot_group))


def _conversion_inputs() -> list:
    return [
        io.Combo.Input("model_profile", options=list(profiles.CHOICES), default=profiles.AUTO,
                       tooltip=PROFILE_TOOLTIP),
        io.Combo.Input("weight_scale", options=["per-row", "per-tensor"], default="per-row", tooltip=SCALE_TOOLTIP),
        io.Combo.Input("convrot_group", options=[str(g) for g in ROTATE_GROUPS], default="0", tooltip=CONVROT_TOOLTIP,
                       advanced=True),
    ]


class Int8DiffusionModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Int8DiffusionModelLoader",
            display_name="Load Diffusion Model (INT8 W8A8)",
            category=CATEGORY,
            description="Loads a diffusion model for INT8 weights and activations: INT8 files of any common format "
                        "as they are, BF16/FP16/FP32/FP8 files converted to INT8 on load, layer by layer.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="A file from models/diffusion_models: INT8 (native, ConvRot, INT8-Fast, "
                                       "ModelOpt) or BF16/FP16/FP32/FP8 to convert on load."),
                *_conversion_inputs(),
                LoraStack.Input("lora_stack", optional=True,
                                tooltip="LoRAs from 'LoRA Stack (INT8, before quantization)'. When the file is "
                                        "converted on load they are added to the float weights before quantizing "
                                        "(one rounding); on INT8 files they are merged like the merge node."),
            ],
            outputs=[io.Model.Output(tooltip="The model with its Linear layers on INT8 W8A8 kernels.")],
        )

    @classmethod
    def execute(cls, unet_name, model_profile, weight_scale, convrot_group, lora_stack=None) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        built: list = []
        prepare = preload.factory(tuple(lora_stack), unet_name, sink=built) if lora_stack else None
        options = loader.LoadOptions(profile=model_profile, convert=_convert_options(weight_scale, convrot_group),
                                     prepare=prepare)
        model = loader.load_file(path, options)
        if not built:
            return io.NodeOutput(model)
        return io.NodeOutput(model, ui={"text": [r.summary() for r in built[-1].reports]})


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
                    *_conversion_inputs()],
            outputs=[io.Model.Output(tooltip="The INT8 clone.")],
        )

    @classmethod
    def execute(cls, model, model_profile, weight_scale, convrot_group) -> io.NodeOutput:
        options = loader.LoadOptions(profile=model_profile, convert=_convert_options(weight_scale, convrot_group))
        return io.NodeOutput(loader.quantize_model(model, options))


class Int8SaveModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Int8SaveModel",
            display_name="Save INT8 Model",
            category=CATEGORY,
            description="Writes the diffusion model as a ComfyUI-native int8_tensorwise file into "
                        "models/diffusion_models; stock ComfyUI (0.27+) loads it without this pack.",
            inputs=[
                io.Model.Input("model", tooltip="An INT8 model (from the INT8 loader or Quantize Model to INT8); "
                                                "LoRAs applied to it are merged into the saved weights."),
                io.String.Input("filename_prefix", default="int8/model",
                                tooltip="File name under models/diffusion_models; a counter and .safetensors are "
                                        "added. Use a/b to write into a subfolder."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix) -> io.NodeOutput:
        out_dir = folder_paths.get_folder_paths("diffusion_models")[0]
        full_dir, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        os.makedirs(full_dir, exist_ok=True)
        path = os.path.join(full_dir, f"{name}_{counter:05}_.safetensors")
        loader.save_model(model, path)
        return io.NodeOutput(ui={"text": [f"saved {os.path.relpath(path, out_dir)}"]})
