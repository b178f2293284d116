"""LoRA nodes for INT8 models (V3): merge, dynamic, and a stack for the loader's LoRA input."""

from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from ..lora import dynamic, loading, merge
from .report import show

logger = logging.getLogger(__name__)

CATEGORY = "loaders/int8 w8a8"
SLOTS = 10
NONE = "None"
LoraStack = io.Custom("INT8_LORA_STACK")

STRENGTH_TOOLTIP = "How strongly the LoRA changes the model; 0 skips it, negative values invert it."
MERGE_DESCRIPTION = (
    "Merges LoRAs into the INT8 weights when the model is loaded: dequantize, apply the LoRAs in float "
    "(LoRA, LoCon, LoHa, LoKr, DoRA), requantize once. Runs as fast as the model without LoRA; removing or "
    "changing the LoRA restores the original INT8 weights exactly, without reading the model file again."
)
DYNAMIC_DESCRIPTION = (
    "Adds LoRAs at run time, fused into the INT8 matrix multiplication; the INT8 weights are not touched. "
    "Changing a strength or a LoRA takes effect at once, without merging. LoRA and LoCon only (merge DoRA, LoHa "
    "and LoKr); works with torch.compile. Save INT8 Model merges them into the file it writes."
)


def _lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def _slot_inputs() -> list:
    inputs = []
    for i in range(1, SLOTS + 1):
        inputs += [
            io.Combo.Input(f"lora_{i}", options=[NONE, *_lora_names()], default=NONE, optional=True,
                           tooltip=f"LoRA {i} of the stack (from models/loras); None leaves the slot empty."),
            io.Float.Input(f"strength_{i}", default=1.0, min=-10.0, max=10.0, step=0.01, optional=True,
                           tooltip=STRENGTH_TOOLTIP),
        ]
    return inputs


def _single_inputs() -> list:
    return [
        io.Combo.Input("lora_name", options=_lora_names(), tooltip="A LoRA file from models/loras."),
        io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip=STRENGTH_TOOLTIP),
    ]


def _stack(kwargs: dict) -> list[loading.LoraSpec]:
    out = []
    for i in range(1, SLOTS + 1):
        name = kwargs.get(f"lora_{i}")
        if name and name != NONE:
            out.append(loading.LoraSpec(name, float(kwargs.get(f"strength_{i}", 1.0))))
    return out


def _report(node_cls, model, reports: list[loading.MatchReport]) -> io.NodeOutput:
    """The model, with each LoRA's "X/Y LoRA keys matched" shown on the node."""
    return io.NodeOutput(model, ui=show(node_cls, [r.summary() for r in reports] or ["no LoRA applied"]))


def _rounding_input() -> io.Combo.Input:
    # optional, so that ComfyUI lists it after every LoRA input (required inputs come first in the UI)
    return io.Combo.Input("rounding", options=list(merge.ROUNDINGS), default="nearest", advanced=True, optional=True,
                          tooltip="How merged weights are requantized: nearest (more accurate) or stochastic "
                                  "(seeded per layer, what ComfyUI does for its own INT8 layers).")


def _model_input() -> io.Model.Input:
    return io.Model.Input("model", tooltip="An INT8 model (from the INT8 loader, Quantize Model to INT8 or the stock "
                                           "loader on an INT8 file); float layers get the LoRA too.")


class Int8LoraMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Int8LoraMerge", display_name="Load LoRA (INT8 merge)", category=CATEGORY,
            description=MERGE_DESCRIPTION, inputs=[_model_input(), *_single_inputs(), _rounding_input()],
            outputs=[io.Model.Output(tooltip="The model with the LoRA merged when it is loaded.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, lora_name, strength, rounding="nearest") -> io.NodeOutput:
        return _report(cls, *merge.merge(model, [loading.LoraSpec(lora_name, strength)], rounding))


class Int8LoraMergeStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Int8LoraMergeStack", display_name="LoRA Stack (INT8 merge)", category=CATEGORY,
            description=MERGE_DESCRIPTION + f" Up to {SLOTS} LoRAs, requantized once for the whole stack.",
            inputs=[_model_input(), *_slot_inputs(), _rounding_input()],
            outputs=[io.Model.Output(tooltip="The model with the LoRAs merged when it is loaded.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, rounding="nearest", **kwargs) -> io.NodeOutput:
        return _report(cls, *merge.merge(model, _stack(kwargs), rounding))


class Int8LoraDynamic(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Int8LoraDynamic", display_name="Load LoRA (INT8 dynamic)", category=CATEGORY,
            description=DYNAMIC_DESCRIPTION, inputs=[_model_input(), *_single_inputs()],
            outputs=[io.Model.Output(tooltip="The model computing the LoRA at run time, on top of dynamic LoRAs "
                                             "already there.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        return _report(cls, *dynamic.apply(model, [loading.LoraSpec(lora_name, strength)]))


class Int8LoraDynamicStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Int8LoraDynamicStack", display_name="LoRA Stack (INT8 dynamic)", category=CATEGORY,
            description=DYNAMIC_DESCRIPTION + f" Up to {SLOTS} LoRAs, computed together as one low-rank term.",
            inputs=[_model_input(), *_slot_inputs()],
            outputs=[io.Model.Output(tooltip="The model computing the LoRAs at run time.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, **kwargs) -> io.NodeOutput:
        return _report(cls, *dynamic.apply(model, _stack(kwargs)))


class Int8LoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Int8LoraStack", display_name="LoRA Stack (INT8, before quantization)", category=CATEGORY,
            description="A list of LoRAs for the INT8 loader's lora_stack input. When the loader converts a BF16/"
                        "FP16/FP8 file, the LoRAs are added to each float weight before it is quantized, so the "
                        "weights are rounded once (more accurate than merging into INT8 weights). Changing them "
                        "reloads the model.",
            inputs=[LoraStack.Input("lora_stack", optional=True, tooltip="More LoRAs, placed before these."),
                    *_slot_inputs()],
            outputs=[LoraStack.Output(tooltip="The LoRAs, for the INT8 loader.")],
        )

    @classmethod
    def execute(cls, lora_stack=None, **kwargs) -> io.NodeOutput:
        return io.NodeOutput((*(lora_stack or ()), *_stack(kwargs)))
