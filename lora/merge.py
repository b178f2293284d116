"""Merge a LoRA stack into an INT8 model through ComfyUI's patcher (ComfyUI glue).

The clone gets ComfyUI patches; when ComfyUI loads it, each patched layer is dequantized, every LoRA
of the stack is applied in float by core's ``calculate_weight`` (LoRA, LoCon, LoHa, LoKr, DoRA), and
the result is requantized once (``Int8Linear.set_weight`` -> ``Int8W8A8Layout.quantize``): per-row
scales, rows that still fit keep their grid, seeded stochastic rounding. Under DynamicVRAM the same
happens when a layer is first cast and the result stays in VRAM; with lowvram offload ComfyUI applies
the patch in float on the fly. Unpatching restores the original INT8 tensors bit-exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import loading


def merge(model, stack: Sequence[loading.LoraSpec]) -> tuple[object, list[loading.MatchReport]]:
    """A clone of ``model`` with every LoRA of ``stack`` patched in; strengths of 0 are skipped."""
    clone = model.clone()
    reports = []
    for spec in stack:
        if spec.strength == 0:
            continue
        patches, report = loading.match(clone, loading.read(spec.name), spec.name)
        clone.add_patches(patches, spec.strength)
        reports.append(report)
    return clone, reports
