"""Apply LoRAs to float weights before their first quantization (the loader's LoRA input; ComfyUI glue).

Merging into an already-quantized weight rounds each weight a second time. When the loader converts
a BF16/FP16/FP32/FP8 file it can instead add the LoRAs to each float weight just before quantizing
it, so every weight is rounded once. ``factory(stack)`` is what ``ops.loader.LoadOptions.prepare``
takes: given the normalized state dict it matches the LoRA keys against the architecture (built on
the meta device, nothing allocated) and returns a ``PreQuantLora``. Patches that do not land on a
converted weight (layers kept in float, biases, norms, layers of a pre-quantized file) are attached to
the loaded model as ordinary ComfyUI patches, so nothing of the LoRA is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import comfy.lora
import comfy.model_detection
import torch

from ..ops.formats import SMOOTH
from . import loading
from .loading import PREFIX

logger = logging.getLogger(__name__)

QUANT_SUFFIXES = (".comfy_quant", ".weight_scale", ".input_scale", f".{SMOOTH}")


class _MetaModel:
    """Just enough of a ModelPatcher for ``loading.match``: ``.model`` is the architecture on the meta device."""

    def __init__(self, nsd: dict, source: str):
        # without the quantization entries: ComfyUI would build layers whose weights appear only when loaded
        plain = {k: v for k, v in nsd.items() if not k.endswith(QUANT_SUFFIXES)}
        config = comfy.model_detection.model_config_from_unet(plain, "")
        if config is None:
            raise loading.LoraError(f"{source}: ComfyUI does not recognize the model's architecture, so its LoRA "
                                    "keys cannot be matched")
        with torch.device("meta"):
            self.model = config.get_model(plain, "", device=torch.device("meta"))


class PreQuantLora:
    """A ``ops.config.WeightPrep``: the LoRAs of a stack added to float weights before quantization.

    ``reports`` has one ``loading.MatchReport`` per LoRA (strength 0 entries are skipped).
    """

    def __init__(self, nsd: dict, stack: Sequence[loading.LoraSpec], source: str = "the model"):
        meta = _MetaModel(nsd, source)
        self.reports: list[loading.MatchReport] = []
        self._stack: list[tuple[dict, float]] = []  # (ComfyUI patches, strength) per LoRA
        self._per_weight: dict[str, list] = {}  # weight key -> calculate_weight's patch list
        self._applied: set[str] = set()
        for spec in stack:
            if spec.strength == 0:
                continue
            patches, report = loading.match(meta, loading.read(spec.name), spec.name)
            self.reports.append(report)
            self._stack.append((patches, spec.strength))
            for key, patch in patches.items():
                weight_key, offset, function = loading.split_key(key)
                self._per_weight.setdefault(weight_key, []).append((spec.strength, patch, 1.0, offset, function))

    def __call__(self, layer: str, weight: torch.Tensor) -> torch.Tensor:
        key = f"{PREFIX}{layer}.weight"
        patches = self._per_weight.get(key)
        if patches is None:
            return weight
        self._applied.add(key)
        # a float32 copy: calculate_weight adds in place, and ``weight`` may be the file's tensor
        return comfy.lora.calculate_weight(patches, weight.to(torch.float32, copy=True), key)

    def attach(self, patcher) -> None:
        """Add every patch that was not applied before quantization to ``patcher`` as an ordinary patch."""
        left = 0
        for patches, strength in self._stack:
            rest = {k: v for k, v in patches.items() if loading.split_key(k)[0] not in self._applied}
            left += len(patcher.add_patches(rest, strength)) if rest else 0
        logger.info("int8_w8a8: LoRA before quantization: %d weights patched before quantizing, %d patched as usual",
                    len(self._applied), left)

    @property
    def applied(self) -> frozenset[str]:
        """The weight keys whose LoRA was added before quantization."""
        return frozenset(self._applied)


def factory(stack: Sequence[loading.LoraSpec], source: str = "the model",
            sink: list | None = None) -> Callable[[dict], PreQuantLora]:
    """For ``LoadOptions.prepare``: nsd -> PreQuantLora. ``sink`` (a list) receives each one built, for reports."""

    def build(nsd: dict) -> PreQuantLora:
        prep = PreQuantLora(nsd, stack, source)
        if sink is not None:
            sink.append(prep)
        return prep

    return build
