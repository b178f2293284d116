"""Per-load configuration, passed explicitly and never mutated (no class-level flags)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .profiles import ModelProfile

WEIGHT_SCALES = ("per-row", "per-tensor")
ROTATE_GROUPS = (0, 64, 128, 256)


@dataclass(frozen=True)
class ConvertOptions:
    """How float (and FP8) weights are turned into INT8.

    per_row: one scale per output channel (default; more accurate) or one per tensor.
    rotate_group: ConvRot group (0 = off); applied where it divides a layer's input width.
    seed: None for round-to-nearest-even, or a seed for stochastic rounding.
    """

    per_row: bool = True
    rotate_group: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.rotate_group not in ROTATE_GROUPS:
            raise ValueError(f"ConvRot group: expected one of {ROTATE_GROUPS}, got {self.rotate_group}")
        if self.rotate_group and not self.per_row:
            raise ValueError(f"ConvRot (rotate_group {self.rotate_group}) needs per-row weight scales: set "
                             "per_row=True (weight_scale 'per-row' on the nodes) or rotate_group=0 (convrot_group '0')")


class WeightPrep(Protocol):
    """Changes float weights just before their first quantization (the loader's LoRA input).

    Merging a LoRA into an INT8 weight rounds it twice; applied here, each weight is rounded once.
    """

    def __call__(self, layer: str, weight: torch.Tensor) -> torch.Tensor:
        """The weight ``[N, K]`` of Linear ``layer`` (float, on the compute device) with the changes applied;
        must not modify ``weight`` in place (it may be the loaded file's tensor)."""
        ...

    def attach(self, patcher) -> None:
        """After loading: hand what was not applied (layers kept in float, biases, pre-quantized layers) to
        the ModelPatcher as ordinary patches."""
        ...


@dataclass(frozen=True)
class LoadConfig:
    """Everything one load needs to build its ``Int8Linear`` layers.

    profile: the architecture's profile when float layers are converted; None when the source is
        already quantized (its float layers stay as the file has them).
    source: a name for messages (the file name).
    compute_device: where float weights are quantized ("cuda:0"; None = where they are).
    progress: called with the layer name after each converted layer (the node's progress bar).
    prepare: applied to each float weight that is converted, just before it is quantized.
    quant_in_graph: under torch.compile, quantize activations with torch ops the compiler can fuse into
        the op producing them (``kernels.int8_linear``); off until measured faster on the GPU.
    traced_weights: under torch.compile, resident layers hand the graph their weights' parts as plain tensors
        (``Int8Linear._traced``: two tensor guards per layer instead of a QuantizedTensor's subtree, bench/NOTES.md
        item 51); False keeps the QuantizedTensor in the graph, as before (the benchmarks' ``pack-convert-qt``).
    """

    profile: ModelProfile | None
    convert: ConvertOptions
    source: str
    compute_device: str | None = None
    progress: Callable[[str], None] | None = None
    prepare: WeightPrep | None = None
    quant_in_graph: bool = False
    traced_weights: bool = True

    def converts(self, layer: str) -> bool:
        """Whether a float Linear weight at ``layer`` is quantized on load."""
        return self.profile is not None and not self.profile.keeps(layer)


# The attention of the fused blocks (``LoadOptions.attention``, the loader nodes' ``attention`` input):
# "auto": 8-bit where measured faster than SDPA on that GPU generation and within the accuracy bound
#         (``kernels.attention.auto_8bit``; on the H200 for calls with at least 8192 keys), else ComfyUI's;
# "bf16": ComfyUI's attention (``optimized_attention``: the backend the user chose), as before the option;
# "8-bit": the pack's ``kernels.attention_8bit`` wherever the call and the GPU allow it.
ATTENTION_CHOICES = ("auto", "bf16", "8-bit")
