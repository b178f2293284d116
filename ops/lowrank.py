"""Low-rank (LoRA) terms added to a linear layer's output at run time.

A term is ``y += (x @ a.T) @ b.T`` with ``a [R, K]`` and ``b [N, R]``: every LoRA of a stack and every
slice of a fused weight (q/k/v of a qkv projection) concatenated along R, with the LoRA scale and
strength folded into ``b`` and zero rows of ``b`` outside a slice. ``lora/dynamic.py`` builds them;
they reach a layer as the ``int8_lora`` attribute, set per model clone by ComfyUI's object patches,
so clones of one model carry different LoRAs and nothing stays on the shared module after unpatching.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

ATTR = "int8_lora"


@dataclass(frozen=True)
class LowRank:
    """``a [R, K]`` and ``b [N, R]`` on the model's device and compute dtype (R padded for the kernels)."""

    a: torch.Tensor
    b: torch.Tensor

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"LowRank: expected a [R, K] and b [N, R], got {list(self.a.shape)}, {list(self.b.shape)}")

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + (x @ a.T) @ b.T`` computed in x's dtype (the float fallback; INT8 layers fuse it)."""
        h = x @ self.a.to(x.dtype).T
        return y + (h @ self.b.to(h.dtype).T).to(y.dtype)

    def concat(self, other: LowRank) -> LowRank:
        return LowRank(torch.cat([self.a, other.a.to(self.a)], 0), torch.cat([self.b, other.b.to(self.b)], 1))


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
