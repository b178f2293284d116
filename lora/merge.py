"""Merge a LoRA stack into an INT8 model through ComfyUI's patcher (ComfyUI glue).

The clone gets ComfyUI patches; when ComfyUI loads it, each patched layer is dequantized, every LoRA
of the stack is applied in float by core's ``calculate_weight`` (LoRA, LoCon, LoHa, LoKr, DoRA), and
the result is requantized once (``Int8Linear.set_weight`` -> ``Int8W8A8Layout.quantize``) with a
recalculated scale per row. Under DynamicVRAM the same happens when a layer is first cast, and the
result stays in VRAM; with lowvram offload ComfyUI applies the patch in float on the fly. Unpatching
restores the original INT8 tensors bit-exactly (ComfyUI keeps the original QuantizedTensor as its backup).

Rounding: "nearest" (default) or "stochastic" (seeded by ComfyUI with a hash of the layer name, what
ComfyUI does for its own INT8 layers). On a tiny FLUX.2 with rank-8 LoRAs nearest loses 0.8-1.4 dB of
SQNR against BF16+LoRA, stochastic and ComfyUI's own merge 1.6-2.4 dB (bench/NOTES.md, "LoRA merge").
"""

from __future__ import annotations

from collections.abc import Sequence

import comfy.utils

from ..ops.comfy_ops import Int8Linear
from . import loading
from .loading import PREFIX

ROUNDINGS = ("nearest", "stochastic")


def merge(model, stack: Sequence[loading.LoraSpec], rounding: str = "nearest") -> tuple[object, list]:
    """A clone of ``model`` with every LoRA of ``stack`` patched in, and a MatchReport per LoRA.

    Strengths of 0 are skipped.
    Every LoRA is read and matched before anything is added, so a bad one leaves no partial clone.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding: expected one of {ROUNDINGS}, got {rounding!r}")
    clone = model.clone()
    matched = []
    for spec in stack:
        if spec.strength != 0:
            matched.append((spec, *loading.match(clone, loading.read(spec.name), spec.name)))
    for spec, patches, _ in matched:
        clone.add_patches(patches, spec.strength)
        if rounding != "nearest":
            for key in patches:
                path = loading.split_key(key)[0][len(PREFIX):].rsplit(".", 1)[0]
                if isinstance(comfy.utils.get_attr(clone.model, f"{PREFIX}{path}"), Int8Linear):
                    clone.add_object_patch(f"{PREFIX}{path}.int8_merge_rounding", rounding)
    return clone, [report for _, _, report in matched]
