"""Low-rank (LoRA) terms added to a linear layer's output at run time.

A term is ``y += (x @ a.T) @ b.T`` with ``a [R, K]`` and ``b [N, R]``: every LoRA of a stack and every
slice of a fused weight (q/k/v of a qkv projection) concatenated along R, with the LoRA scale and
strength folded into ``b`` and zero rows of ``b`` outside a slice. ``lora/dynamic.py`` builds them;
they reach a layer as the ``int8_lora`` attribute, set per model clone by ComfyUI's object patches,
so clones of one model carry different LoRAs and nothing stays on the shared module after unpatching.

A fused block hands an INT8 layer its input already quantized (``Int8Linear.run_quantized``: int8 rows, rotated
by the layer's ConvRot group, and per-row scales), so there the term's down projection runs on those rows too:
``h = (xq @ a_q.T) * x_scale * a_scale``, with ``a`` rotated by the same group (the rotation is orthonormal:
``x @ a.T = (x H) @ (a H).T``) and quantized per rank (``int8_down``); ``lora/dynamic.py`` quantizes it once per
term for the layer it is set on (``with_int8_down``).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import kernels

ATTR = "int8_lora"


@dataclass(frozen=True, eq=False)
class Int8Down:
    """A term's ``a`` rotated by ConvRot group ``rotate_group`` (0: none) and quantized per rank: ``q`` int8
    ``[R, K]``, ``scale`` float32 ``[R, 1]`` (``kernels.quantize_weight``, round-to-nearest-even)."""

    q: torch.Tensor
    scale: torch.Tensor
    rotate_group: int


def quantize_down(a: torch.Tensor, rotate_group: int) -> Int8Down:
    """``a [R, K]`` (float) as an ``Int8Down`` for rows rotated by ``rotate_group``. Zero rows (rank padding) get
    the quantizer's tiny scale and stay zero."""
    q, scale = kernels.quantize_weight(a.float(), per_row=True, rotate_group=rotate_group)
    return Int8Down(q, scale, rotate_group)


@dataclass(frozen=True, eq=False)
class LowRank:
    """``a [R, K]`` and ``b [N, R]`` on the model's device and compute dtype (R padded for the kernels); ``down``:
    ``a`` quantized for one ConvRot group (``with_int8_down``), or None."""

    a: torch.Tensor
    b: torch.Tensor
    down: Int8Down | None = None

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"LowRank: expected a [R, K] and b [N, R], got {list(self.a.shape)}, {list(self.b.shape)}")
        if self.down is not None and tuple(self.down.q.shape) != tuple(self.a.shape):
            raise ValueError(f"LowRank: int8 down projection {list(self.down.q.shape)} does not match a "
                             f"{list(self.a.shape)}")

    def with_int8_down(self, rotate_group: int) -> LowRank:
        """This term with ``a`` quantized once for pre-quantized rows rotated by ``rotate_group`` (the ConvRot
        group of the layer it is set on)."""
        return dataclasses.replace(self, down=quantize_down(self.a, rotate_group))

    def int8_down(self, rotate_group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_q int8 [R, K], a_scale float32 [R, 1])`` for rows rotated by ``rotate_group``: the one
        ``with_int8_down`` stored when its group and device match, else quantized now (a term built another way;
        correct, one small quantization per call)."""
        d = self.down
        if d is None or d.rotate_group != rotate_group or d.q.device != self.a.device:
            d = quantize_down(self.a, rotate_group)
        return d.q, d.scale

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + (x @ a.T) @ b.T`` computed in x's dtype (the float fallback; INT8 layers fuse it)."""
        h = x @ self.a.to(x.dtype).T
        return y + (h @ self.b.to(h.dtype).T).to(y.dtype)

    def concat(self, other: LowRank) -> LowRank:
        return LowRank(torch.cat([self.a, other.a.to(self.a)], 0), torch.cat([self.b, other.b.to(self.b)], 1))


# stacked down projections of terms whose layers read the same rows (``stacked_down``), kept per first term (an entry
# goes with it) with weak references to the others, so a replaced term is never matched by a reused address
_STACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def stacked_down(terms: Sequence[LowRank], rotate_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_q int8 [sum R, K], a_scale float32 [sum R, 1])``: the ``int8_down`` of each term stacked along R, for
    layers fed one quantization of the same rows (q/k/v, w1/w3): one INT8 GEMM of sum R columns computes every
    term's ``h``, column for column the same values as one GEMM per term (integer sums, per-column scales). Built
    once per set of terms (and ConvRot group) and kept while the first term lives."""
    first, rest = terms[0], tuple(terms[1:])
    entry = _STACKED.get(first)
    if (entry is not None and entry[1] == rotate_group and len(entry[0]) == len(rest)
            and all(ref() is t for ref, t in zip(entry[0], rest, strict=True))):
        return entry[2]
    downs = [t.int8_down(rotate_group) for t in terms]
    stacked = (torch.cat([d[0] for d in downs], 0), torch.cat([d[1].reshape(-1, 1) for d in downs], 0))
    _STACKED[first] = (tuple(weakref.ref(t) for t in rest), rotate_group, stacked)
    return stacked


def forward_with_lowrank(module: torch.nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward of a layer that is not ``Int8Linear`` (e.g. ComfyUI's own ops) plus its ``int8_lora`` term.

    Installed per clone as the module's ``forward`` by an object patch; reads the term at call time.
    """
    y = type(module).forward(module, x, *args, **kwargs)
    term = getattr(module, ATTR, None)
    return y if term is None else term.apply(x, y)


def lowrank_forward_for(module: torch.nn.Module):
    """The per-instance ``forward`` that adds the module's low-rank term."""
    return functools.partial(forward_with_lowrank, module)
