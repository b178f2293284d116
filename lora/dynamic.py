"""Dynamic LoRA: low-rank terms added in the forward pass, per model clone (ComfyUI glue).

``apply(model, stack)`` returns a clone whose affected layers carry an ``ops.lowrank.LowRank`` term
(object patches on the clone, so the shared module is untouched once the clone is unloaded). Int8Linear
fuses the term into its GEMM epilogue, also inside fused blocks (its down projection on the block's int8
rows, ``Int8Linear.run_quantized``); other layers (ComfyUI's own ops, e.g. from the stock loader) get
a per-clone ``forward`` that adds it. A new strength or LoRA only builds new terms; nothing is merged
or reloaded, and stacked LoRAs (also from several nodes in a chain) concatenate along the rank.

Low-rank terms: LoRA/LoCon adapters on 2-D weights, also on slices of fused weights (diffusers to_q/
to_k/to_v onto qkv, proj_mlp onto linear1) and with ComfyUI's key functions. Everything else in a LoRA
file that targets a float tensor (biases, norms, full-weight diffs of layers kept in float) becomes an
ordinary ComfyUI patch on the clone, which is exact there. DoRA, LoHa, LoKr or diffs on an INT8 weight
cannot be expressed without touching it: those raise, pointing to the merge node.
"""

from __future__ import annotations

from collections.abc import Sequence

import comfy.utils
import torch

from ..kernels import lora_rank_padded
from ..ops import layout
from ..ops.comfy_ops import Int8Linear
from ..ops.lowrank import ATTR, LowRank, lowrank_forward_for
from . import loading
from .loading import PREFIX


def _compute_dtype(model) -> torch.dtype:
    return model.model.manual_cast_dtype or model.model.get_dtype()


def _low_rank(adapter, weight_key: str, offset) -> bool:
    weights = getattr(adapter, "weights", None)
    return (type(adapter).__name__ == "LoRAAdapter" and weights is not None and weights[3] is None
            and weights[4] is None and weights[5] is None and weight_key.endswith(".weight")
            and (offset is None or offset[0] == 0))


def _kind(adapter) -> str:
    weights = getattr(adapter, "weights", None)
    if type(adapter).__name__ == "LoRAAdapter" and weights is not None and weights[4] is not None:
        return "DoRA"
    return adapter[0] if isinstance(adapter, tuple) else type(adapter).__name__.replace("Adapter", "")


def split(model, patches: dict, strength: float, name: str) -> tuple[dict[str, LowRank], dict]:
    """One LoRA's patches as low-rank terms per module path, and the rest as ordinary float patches.

    Terms are float32 on the CPU, not yet padded; the rest targets float tensors only.
    """
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    rest, refused = {}, []
    for key, adapter in patches.items():
        weight_key, offset, function = loading.split_key(key)
        target = comfy.utils.get_attr(model.model, weight_key)
        if not _low_rank(adapter, weight_key, offset) or target.dim() != 2:
            if layout.is_int8_weight(target):
                refused.append(f"{weight_key} ({_kind(adapter)})")
            else:
                rest[key] = adapter
            continue
        up, down, alpha = adapter.weights[0].flatten(1), adapter.weights[1].flatten(1), adapter.weights[2]
        rank = down.shape[0]
        scale = (alpha / rank if alpha is not None else 1.0) * strength
        n = target.shape[0]
        b = torch.zeros(n, rank, dtype=torch.float32)
        start, length = (0, n) if offset is None else (offset[1], offset[2])
        b[start:start + length] = up.float() * scale  # rows outside the slice add nothing
        if function is not None:  # a row permutation of the fused weight (ComfyUI's key functions)
            b = function(b)
        parts.setdefault(weight_key[len(PREFIX):-len(".weight")], []).append((down.float(), b))
    if refused:
        raise loading.LoraError(
            f"{name}: {len(refused)} patch(es) cannot run as a dynamic LoRA on INT8 weights (first: "
            f"{', '.join(refused[:3])}); use Load LoRA (INT8 merge) for DoRA, LoHa, LoKr and full-weight patches"
        )
    terms = {path: LowRank(torch.cat([a for a, _ in ps], 0), torch.cat([b for _, b in ps], 1))
             for path, ps in parts.items()}
    return terms, rest


def _padded(term: LowRank, device, dtype) -> LowRank:
    """The term at the kernel's rank (zero rows/columns), on the model's device and compute dtype."""
    pad = lora_rank_padded(term.a.shape[0]) - term.a.shape[0]
    a = torch.nn.functional.pad(term.a, (0, 0, 0, pad))
    b = torch.nn.functional.pad(term.b, (0, pad))
    return LowRank(a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous())


def _unpadded(term: LowRank) -> LowRank:
    keep = (term.a != 0).any(1) | (term.b != 0).any(0)
    return LowRank(term.a[keep].float().cpu(), term.b[:, keep].float().cpu())


def apply(model, stack: Sequence[loading.LoraSpec]) -> tuple[object, list[loading.MatchReport]]:
    """A clone of ``model`` whose layers add the stack's LoRAs at run time (on top of dynamic LoRAs already there).

    Every LoRA is read, matched and checked before the clone is changed.
    """
    clone = model.clone()
    reports, combined, plain = [], {}, []
    for spec in stack:
        if spec.strength == 0:
            continue
        patches, report = loading.match(clone, loading.read(spec.name), spec.name)
        terms, rest = split(clone, patches, spec.strength, spec.name)
        reports.append(report)
        plain.append((rest, spec.strength))
        for path, term in terms.items():
            combined[path] = combined[path].concat(term) if path in combined else term
    device, dtype = clone.load_device, _compute_dtype(clone)
    for path, term in combined.items():
        previous = clone.object_patches.get(f"{PREFIX}{path}.{ATTR}")
        if previous is not None:  # a dynamic LoRA earlier in the chain: add up along the rank
            term = _unpadded(previous).concat(term)
        module = comfy.utils.get_attr(clone.model, f"{PREFIX}{path}")
        term = _padded(term, device, dtype)
        if isinstance(module, Int8Linear) and layout.is_int8_weight(module.weight):
            # fused blocks run the layer on rows they quantized: the down projection too, with ``a`` rotated as
            # the layer's weight and quantized once here (LowRank.int8_down)
            term = term.with_int8_down(module.input_rotation())
        clone.add_object_patch(f"{PREFIX}{path}.{ATTR}", term)
        if not isinstance(module, Int8Linear):  # ComfyUI's own ops: a per-clone forward adds the term
            clone.add_object_patch(f"{PREFIX}{path}.forward", lowrank_forward_for(module))
    for rest, strength in plain:
        if rest:
            clone.add_patches(rest, strength)
    return clone, reports
