"""Apply LoRAs to float weights before their first quantization (the loader's LoRA input; ComfyUI glue).

Merging into an already-quantized weight rounds the weight a second time. When the loader converts a
BF16/FP16/FP32/FP8 file, it can instead add the LoRAs to each float weight just before quantizing it,
so every weight is rounded once. ``prepare_factory(stack)`` returns what ``ops.loader.LoadOptions``
takes: given the normalized state dict it builds the LoRA patches (keys matched against a model of
that architecture built on the meta device) and returns ``prepare(layer, w) -> w + delta``.
Patches that do not land on a converted Linear weight (biases, norms, kept layers) are returned for
the caller to add as ordinary ComfyUI patches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import comfy.lora
import comfy.model_detection
import torch

from . import loading

PREFIX = "diffusion_model."


@dataclass
class Preloaded:
    """The per-weight patch lists (ComfyUI format) and the match reports of a LoRA stack."""

    patches: dict[str, list] = field(default_factory=dict)
    reports: list[loading.MatchReport] = field(default_factory=list)
    consumed: set[str] = field(default_factory=set)


class _MetaModel:
    """Just enough of a ModelPatcher for loading.match: ``.model`` is the architecture on the meta device."""

    def __init__(self, nsd: dict):
        config = comfy.model_detection.model_config_from_unet(nsd, "")
        if config is None:
            raise loading.LoraError("LoRA before quantization: ComfyUI does not recognize the model's architecture")
        self.model = config.get_model(nsd, "", device=torch.device("meta"))


def build(nsd: dict, stack: Sequence[loading.LoraSpec]) -> Preloaded:
    meta = _MetaModel(nsd)
    out = Preloaded()
    for spec in stack:
        if spec.strength == 0:
            continue
        patches, report = loading.match(meta, loading.read(spec.name), spec.name)
        out.reports.append(report)
        for key, patch in patches.items():
            weight_key = key if isinstance(key, str) else key[0]
            offset = None if isinstance(key, str) or len(key) < 2 else key[1]
            function = None if isinstance(key, str) or len(key) < 3 else key[2]
            out.patches.setdefault(weight_key, []).append((spec.strength, patch, 1.0, offset, function))
    return out


def prepare_factory(stack: Sequence[loading.LoraSpec], sink: list | None = None) -> Callable:
    """For ``LoadOptions.prepare``: nsd -> prepare(layer, w). ``sink`` receives the Preloaded record."""

    def factory(nsd: dict):
        pre = build(nsd, stack)
        if sink is not None:
            sink.append(pre)

        def prepare(layer: str, w: torch.Tensor) -> torch.Tensor:
            key = f"{PREFIX}{layer}.weight"
            if key not in pre.patches:
                return w
            pre.consumed.add(key)
            return comfy.lora.calculate_weight(pre.patches[key], w.float(), key)

        return prepare

    return factory
