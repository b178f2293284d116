"""Dynamic LoRA: low-rank terms added in the forward pass, per model clone (ComfyUI glue).

``apply(model, stack)`` returns a clone whose affected layers carry an ``ops.lowrank.LowRank`` term
(object patches on the clone, so the shared module is untouched once the clone is unloaded). Int8Linear
fuses the term into its GEMM epilogue; ComfyUI's own layers (e.g. from the stock loader) get a
per-clone ``forward`` that adds it. New strengths or LoRAs only build new terms; nothing is merged or
reloaded, and stacked LoRAs (also from several nodes in a chain) concatenate along the rank.

Supported: LoRA/LoCon adapters on 2-D weights, also on slices of fused weights (diffusers to_q/to_k/
to_v onto qkv, proj_mlp onto linear1) and with ComfyUI's key functions (row swaps). DoRA, LoHa, LoKr
and diff/set patches change the weight in ways a low-rank term cannot express: merge those instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import comfy.utils
import torch

from ..kernels import lora_rank_padded
from ..ops.comfy_ops import Int8Linear
from ..ops.lowrank import ATTR, LowRank, lowrank_forward_for
from . import loading

PREFIX = "diffusion_model."


def _compute_dtype(model) -> torch.dtype:
    return model.model.manual_cast_dtype or model.model.get_dtype()


def terms(model, patches: dict, strength: float, name: str) -> dict[str, LowRank]:
    """Low-rank terms per module path (``double_blocks.0.img_attn.qkv``) for one LoRA's patches."""
    device, dtype = model.load_device, _compute_dtype(model)
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    unsupported = []
    for key, adapter in patches.items():
        weight_key = key if isinstance(key, str) else key[0]
        offset = None if isinstance(key, str) or len(key) < 2 else key[1]
        function = None if isinstance(key, str) or len(key) < 3 else key[2]
        weights = getattr(adapter, "weights", None)
        if (type(adapter).__name__ != "LoRAAdapter" or weights is None or weights[3] is not None
                or weights[4] is not None or weights[5] is not None or not weight_key.endswith(".weight")
                or (offset is not None and offset[0] != 0)):
            kind = "DoRA" if weights is not None and len(weights) > 4 and weights[4] is not None else (
                type(adapter).__name__ if not isinstance(adapter, tuple) else adapter[0])
            unsupported.append(f"{weight_key} ({kind})")
            continue
        up, down, alpha = weights[0].flatten(1), weights[1].flatten(1), weights[2]
        rank = down.shape[0]
        scale = (alpha / rank if alpha is not None else 1.0) * strength
        path = weight_key[len(PREFIX):-len(".weight")]
        n = comfy.utils.get_attr(model.model, weight_key).shape[0]
        b = torch.zeros(n, rank, dtype=torch.float32)
        start, length = (0, n) if offset is None else (offset[1], offset[2])
        b[start:start + length] = up.float() * scale
        if function is not None:
            b = function(b)
        parts.setdefault(path, []).append((down.float(), b))
    if unsupported:
        raise loading.LoraError(
            f"{name}: {len(unsupported)} patch(es) cannot run as a dynamic LoRA (first: {', '.join(unsupported[:3])}); "
            "use Load LoRA (INT8 merge) for DoRA, LoHa, LoKr and full-weight patches"
        )
    out = {}
    for path, pieces in parts.items():
        a = torch.cat([p[0] for p in pieces], 0)
        b = torch.cat([p[1] for p in pieces], 1)
        r = a.shape[0]
        pad = lora_rank_padded(r) - r  # the kernel's rank, so nothing is padded per forward
        a = torch.nn.functional.pad(a, (0, 0, 0, pad))
        b = torch.nn.functional.pad(b, (0, pad))
        out[path] = LowRank(a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous())
    return out


def _existing(model, path: str) -> LowRank | None:
    return model.object_patches.get(f"{PREFIX}{path}.{ATTR}")


def _unpad(term: LowRank) -> LowRank:
    keep = (term.a.abs().sum(1) != 0) | (term.b.abs().sum(0) != 0)
    return LowRank(term.a[keep], term.b[:, keep])


def apply(model, stack: Sequence[loading.LoraSpec]) -> tuple[object, list[loading.MatchReport]]:
    """A clone of ``model`` whose layers add the stack's LoRAs at run time (on top of LoRAs already there)."""
    clone = model.clone()
    reports = []
    combined: dict[str, LowRank] = {}
    for spec in stack:
        if spec.strength == 0:
            continue
        patches, report = loading.match(clone, loading.read(spec.name), spec.name)
        reports.append(report)
        for path, term in terms(clone, patches, spec.strength, spec.name).items():
            combined[path] = combined[path].concat(term) if path in combined else term
    for path, term in combined.items():
        previous = _existing(clone, path)
        if previous is not None:
            term = _unpad(previous).concat(_unpad(term))
            r = term.a.shape[0]
            pad = lora_rank_padded(r) - r
            term = LowRank(torch.nn.functional.pad(term.a, (0, 0, 0, pad)), torch.nn.functional.pad(term.b, (0, pad)))
        clone.add_object_patch(f"{PREFIX}{path}.{ATTR}", term)
        module = comfy.utils.get_attr(clone.model, f"{PREFIX}{path}")
        if not isinstance(module, Int8Linear):  # ComfyUI's own ops: a per-clone forward adds the term
            clone.add_object_patch(f"{PREFIX}{path}.forward", lowrank_forward_for(module))
    return clone, reports
