"""Hadamard matrices for the group rotation fused into activation quantization (ConvRot).

Convention (shared with ComfyUI's native ``int8_tensorwise`` ConvRot files and comfy-kitchen): the
input features are split into groups of ``G``; activations are rotated as ``x_g @ H`` and weights as
``W_g @ H^T``, with ``H`` orthonormal, so ``x W^T`` is unchanged. For powers of 4 (64, 256) ``H`` is
the *regular* Hadamard matrix built from Kronecker powers of ``H4 = [[1,1,1,-1],[1,1,-1,1],
[1,-1,1,1],[-1,1,1,1]]``; no regular Hadamard matrix of order 128 exists, so group 128 uses the
Sylvester matrix (``scipy.linalg.hadamard(128)``), the convention of ComfyUI-INT8-Fast's QuaRot
files. Both are symmetric, so ``H^T == H``.
"""

from __future__ import annotations

import functools
import math

import torch

_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))
_H2 = ((1, 1), (1, -1))


@functools.cache
def _pm1_cpu(group: int) -> torch.Tensor:
    if group <= 1 or group & (group - 1):
        raise ValueError(f"rotate_group: Hadamard group must be a power of two, got {group}")
    is_power_of_4 = (group.bit_length() - 1) % 2 == 0
    base = torch.tensor(_H4 if is_power_of_4 else _H2, dtype=torch.float32)
    h = base
    while h.shape[0] < group:
        h = torch.kron(h, base)
    if h.shape[0] != group:
        raise ValueError(f"rotate_group: cannot build a Hadamard matrix of order {group}")
    return h


def hadamard_pm1(group: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unnormalized Hadamard matrix ``[G, G]`` with entries +-1 (exact in every float dtype)."""
    return _pm1_cpu(group).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def hadamard_pm1_cached(group: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``hadamard_pm1`` kept per (group, device, dtype), so kernels do not copy it every call."""
    return hadamard_pm1(group, device, dtype)


def hadamard(group: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal Hadamard matrix ``[G, G]`` (``hadamard_pm1 / sqrt(G)``)."""
    return (_pm1_cpu(group).double() / math.sqrt(group)).to(device=device, dtype=dtype)


def rotate(x: torch.Tensor, group: int) -> torch.Tensor:
    """Group rotation ``x_g @ H`` along the last dimension, computed in float64 and returned as float32.

    ``x`` [..., K] with ``K % group == 0``. Float64 makes the sums exact for float32 inputs, so this is
    the correctly rounded reference the kernels are compared against.
    """
    k = x.shape[-1]
    xg = x.double().reshape(*x.shape[:-1], k // group, group)
    h = _pm1_cpu(group).to(device=x.device, dtype=torch.float64)
    return ((xg @ h) * (1.0 / math.sqrt(group))).reshape(x.shape).float()
