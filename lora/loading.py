"""Read LoRA files and match their keys to a model, with a report of what matched (ComfyUI glue).

Key formats are ComfyUI's own: ``comfy.lora.model_lora_keys_unet`` maps BFL/ComfyUI names,
diffusers/PEFT names (including slices of fused qkv / linear1 weights) and kohya ``lora_unet_``
names onto the model's weights, and ``comfy.lora.load_lora`` builds the adapters (LoRA, LoCon, LoHa,
LoKr, DoRA, diff/set patches).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import comfy.lora
import comfy.lora_convert
import comfy.utils
import torch

logger = logging.getLogger(__name__)


PREFIX = "diffusion_model."  # where ComfyUI's model keeps the diffusion model's weights


def split_key(key) -> tuple[str, tuple | None, object]:
    """(weight key, slice, function) of a ComfyUI patch key: a weight name, or a tuple of the name, the
    slice ``(dim, start, length)`` of a fused weight it patches and a function applied to the result."""
    if isinstance(key, str):
        return key, None, None
    return key[0], key[1] if len(key) > 1 else None, key[2] if len(key) > 2 else None


class LoraError(ValueError):
    """A LoRA that cannot be applied: names the file, what is wrong and a few offending keys."""

    __module__ = "int8_w8a8"  # what ComfyUI shows as the error's type (not the install path)


@dataclass(frozen=True)
class LoraSpec:
    """One entry of a LoRA stack: a file (name under models/loras or a path) and its strength."""

    name: str
    strength: float = 1.0


@dataclass
class MatchReport:
    """How many of a LoRA file's keys were used, and by how many of the model's weights."""

    name: str
    matched_keys: int
    total_keys: int
    weights: int
    unmatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.name}: {self.matched_keys}/{self.total_keys} LoRA keys matched ({self.weights} weights)"
        if self.unmatched:
            text += f"; not matched: {', '.join(self.unmatched[:3])}" + (" ..." if len(self.unmatched) > 3 else "")
        return text


def resolve_path(name: str) -> str:
    if os.path.isfile(name):
        return name
    import folder_paths

    return folder_paths.get_full_path_or_raise("loras", name)


def read(name: str) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file, with a readable error for broken files."""
    path = resolve_path(name)
    try:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as exc:  # safetensors/torch raise many types for a broken file
        raise LoraError(f"{os.path.basename(path)}: cannot be read ({type(exc).__name__}: {exc}); the file is "
                        "truncated or not a LoRA; download it again") from exc
    if not sd:
        raise LoraError(f"{os.path.basename(path)}: holds no tensors")
    return sd


def match(model, sd: dict, name: str) -> tuple[dict, MatchReport]:
    """ComfyUI patches of a LoRA for ``model`` (a ModelPatcher) and the report; raises when nothing matches."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = comfy.lora_convert.convert_lora(sd)
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    used: set[str] = set()
    for adapter in patches.values():  # adapters share load_lora's set of consumed keys
        used |= set(getattr(adapter, "loaded_keys", ()) or ())
    if not used:
        used = {k for k in sd if any(k.startswith(p) for p in key_map)} if patches else set()
    unmatched = sorted(k for k in sd if k not in used)
    report = MatchReport(os.path.basename(name), len(sd) - len(unmatched), len(sd), len(patches), unmatched)
    if not patches:
        raise LoraError(
            f"{report.name}: none of its {len(sd)} keys match this {type(model.model).__name__} model "
            f"(first keys: {', '.join(sorted(sd)[:3])}); it is a LoRA for another architecture or text encoder"
        )
    check_shapes(model, patches, report.name)
    logger.info("int8_w8a8: %s", report.summary())
    return patches, report


def _target_shape(model, key) -> tuple[str, tuple[int, ...]]:
    weight_key, offset, _ = split_key(key)
    shape = tuple(comfy.utils.get_attr(model.model, weight_key).shape)
    if offset is not None and len(shape) > offset[0]:
        shape = (*shape[: offset[0]], offset[2], *shape[offset[0] + 1:])
    return weight_key, shape


def check_shapes(model, patches: dict, name: str) -> None:
    """LoRA up/down shapes must produce the (slice of the) weight they patch; raise naming the keys."""
    bad = []
    for key, adapter in patches.items():
        weights = getattr(adapter, "weights", None)
        if type(adapter).__name__ != "LoRAAdapter" or weights is None or weights[5] is not None:
            continue  # other adapters and reshaping LoRAs: shapes are checked by ComfyUI when applied
        up, down = weights[0], weights[1]
        weight_key, shape = _target_shape(model, key)
        if len(shape) != 2:
            continue
        rank_ok = up.shape[1] == down.shape[0]
        if not rank_ok or up.shape[0] != shape[0] or down.flatten(1).shape[1] != shape[1]:
            bad.append(f"{weight_key} (LoRA {list(up.shape)} x {list(down.shape)}, weight {list(shape)})")
    if bad:
        raise LoraError(f"{name}: {len(bad)} LoRA weight(s) do not fit the model: {'; '.join(bad[:3])}. The LoRA "
                        "was trained for another size of this architecture")
