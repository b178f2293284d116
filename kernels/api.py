"""Public kernel API: validate arguments, then run the implementation the dispatch rules pick.

Outside torch.compile the implementation is called directly (the custom-op dispatcher adds tens of
microseconds per call, which matters for batch-1 layers). While Dynamo traces, calls go through the
``int8_w8a8::*`` custom ops registered in ``library.py``, which Inductor treats as opaque nodes with
shape-only fake implementations: no graph breaks, no recompiles when M changes.
"""

from __future__ import annotations

import functools

import torch

from . import _checks, reference
from .dispatch import choose_backend


def lora_rank_padded(r: int) -> int:
    """The LoRA rank the GEMM epilogue runs at: ``tl.dot`` needs a power of two >= 16.

    Callers that keep a LoRA term across calls pad it to this rank once (zero rows of ``lora_a`` and
    zero columns of ``lora_b`` add nothing), so the kernels do not pad it on every forward.
    """
    return max(16, 1 << max(0, int(r) - 1).bit_length())


def quantize_rows(
    x: torch.Tensor, *, smooth: torch.Tensor | None = None, rotate_group: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token INT8 quantization of activations.

    Args:
        x: float16/bfloat16/float32 ``[..., K]``, any strides; leading dims fold into M.
        smooth: optional ``[K]`` per-channel divisor (SmoothQuant), applied before the rotation.
        rotate_group: 0, or a ConvRot group (64, 128, 256) rotating each group of K (``x_g @ H``).

    Returns:
        ``q`` int8 ``[M, K]`` and ``scale`` float32 ``[M, 1]``; rows with NaN/Inf get scale NaN.
    """
    if torch.compiler.is_compiling() or smooth is not None or not isinstance(x, torch.Tensor):
        _check_quantize_rows(x, smooth, rotate_group)
        if torch.compiler.is_compiling():
            return torch.ops.int8_w8a8.quantize_rows(x, smooth, rotate_group)
        return quantize_rows_impl(x, smooth, rotate_group)
    # eager, no smoothing (a fused block's attention output): checks and launch path once per specialization,
    # launches replayed (kernels/direct.Replayer)
    return _rows_replayer()((x,), (rotate_group,), lambda: _check_quantize_rows(x, None, rotate_group),
                            lambda: quantize_rows_impl(x, None, rotate_group))


def _check_quantize_rows(x, smooth, rotate_group: int) -> None:
    _checks.check_float_input(x, "x")
    _checks.check_smooth(smooth, x.shape[-1])
    _checks.check_rotate_group(rotate_group, x.shape[-1])


@functools.cache
def _rows_replayer():
    from .direct import Replayer  # direct imports this module

    return Replayer("quantize_rows", interpreted=False)


def quantize_weight(
    w: torch.Tensor,
    *,
    per_row: bool = True,
    seed: int | None = None,
    rotate_group: int = 0,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ``[N, K]``: round-to-nearest-even, or stochastic rounding when seeded.

    Returns ``q`` int8 ``[N, K]`` and ``scale`` float32 ``[N, 1]`` (per_row) or ``[]``. With
    ``rotate_group`` the weight is rotated (``W_g @ H^T``) first, to pair with activations quantized
    with the same group. ``scale`` (0-d float32, per-tensor only) fixes the scale instead of
    deriving it from the absmax. NaN/Inf in ``w`` raise ``ValueError``.
    """
    reference.check_weight_input(w, per_row, seed, rotate_group, scale)
    if torch.compiler.is_compiling():
        return torch.ops.int8_w8a8.quantize_weight(w, per_row, seed, rotate_group, scale)
    return quantize_weight_impl(w, per_row, seed, rotate_group, scale)


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype | None = None,
    smooth: torch.Tensor | None = None,
    rotate_group: int = 0,
    validate: bool = True,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    quant_in_graph: bool = False,
) -> torch.Tensor:
    """W8A8 linear layer: ``y = (quant(x) @ q.T) * x_scale * scale + bias [+ (x @ lora_a.T) @ lora_b.T]``.

    Args:
        x: float16/bfloat16/float32 ``[..., K]``.
        q: int8 weight ``[N, K]``.
        scale: float32 weight scale, ``[]`` (per-tensor), ``[N]`` or ``[N, 1]`` (per-row); finite, > 0.
        bias: optional ``[N]``.
        out_dtype: float16/bfloat16/float32; default ``x.dtype``.
        smooth, rotate_group: as in ``quantize_rows``; ``q`` must have been built to match.
        validate: check that ``scale`` and ``smooth`` are finite and positive (one host sync per
            tensor version). Callers that validated them when the weight was loaded pass False, so
            that offloading, which hands over a fresh copy of the scale every step, stays sync-free.
        lora_a, lora_b: an optional low-rank (LoRA) term, ``lora_a [R, K]`` and ``lora_b [N, R]`` with
            the LoRA's scale folded into ``lora_b``. ``x @ lora_a.T`` is computed in x's dtype and the
            second product is accumulated into the GEMM's float32 epilogue, so the output is written once.
        quant_in_graph: under torch.compile, quantize ``x`` with plain torch ops inside the traced graph
            (``reference.quantize_rows_in_graph``), so the compiler can fuse the quantization into the op
            that produces ``x`` (a norm, a modulation), and run only the GEMM as an opaque op. Without a
            rotation only; no effect in eager mode.

    Returns:
        ``y [..., N]`` in ``out_dtype``.
    """
    _, _, _, dtype = _checks.check_linear_args(x, q, scale, bias, out_dtype, smooth, rotate_group, lora_a, lora_b)
    if torch.compiler.is_compiling():
        if quant_in_graph and not rotate_group:
            x2 = x.reshape(-1, x.shape[-1])
            xq, xs = reference.quantize_rows_in_graph(x2, smooth)
            h = reference.lora_hidden(x2, lora_a) if lora_a is not None else None
            y = torch.ops.int8_w8a8.int8_gemm(xq, xs, q, scale, bias, dtype, validate, h, lora_b)
            return y.reshape(*x.shape[:-1], q.shape[0])
        return torch.ops.int8_w8a8.int8_linear(x, q, scale, bias, dtype, smooth, rotate_group, validate,
                                               lora_a, lora_b)
    return int8_linear_impl(x, q, scale, bias, dtype, smooth, rotate_group, validate, lora_a, lora_b)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, *, rotate_group: int = 0, validate: bool = True
) -> torch.Tensor:
    """``w = q * scale`` as ``dtype`` ``[N, K]``; with ``rotate_group`` the rotation is undone.

    ``validate`` as in ``int8_linear``."""
    reference.check_dequantize_args(q, scale, dtype, rotate_group)
    if torch.compiler.is_compiling():
        return torch.ops.int8_w8a8.dequantize(q, scale, dtype, rotate_group, validate)
    return dequantize_impl(q, scale, dtype, rotate_group, validate)


# ---- implementations behind both the eager calls and the custom ops ----
# Metadata was checked by the public functions; value checks (host syncs) happen here, at run time,
# so they also guard compiled graphs.
def quantize_rows_impl(x, smooth, rotate_group):
    _checks.check_values(smooth=smooth)
    if choose_backend(x.device).name == "triton":
        from . import triton_quant

        return triton_quant.quantize_rows(x, smooth=smooth, rotate_group=rotate_group)
    return reference.quantize_rows_unchecked(x, smooth, rotate_group)


def quantize_weight_impl(w, per_row, seed, rotate_group, scale=None):
    reference.check_weight_finite(w)
    if scale is not None:
        _checks.check_values(scale)
    if choose_backend(w.device).name == "triton":
        from . import triton_quant

        return triton_quant.quantize_weight(w, per_row=per_row, seed=seed, rotate_group=rotate_group, scale=scale)
    return reference.quantize_weight_unchecked(w, per_row, seed, rotate_group, scale)


def int8_linear_impl(x, q, scale, bias, out_dtype, smooth, rotate_group, validate=True, lora_a=None, lora_b=None):
    if validate:
        _checks.check_values(scale, smooth)
    backend = choose_backend(x.device)
    if backend.name == "triton":
        from . import triton_ops

        return triton_ops.int8_linear(x, q, scale, bias, out_dtype, smooth, rotate_group, backend,
                                      lora_a=lora_a, lora_b=lora_b)
    return reference.int8_linear_unchecked(x, q, scale, bias, out_dtype, smooth, rotate_group, lora_a, lora_b)


def int8_gemm_impl(xq, x_scale, q, scale, bias, out_dtype, validate=True, lora_h=None, lora_b=None):
    """The GEMM of ``int8_linear`` on rows quantized elsewhere (the ``quant_in_graph`` path)."""
    if validate:
        _checks.check_values(scale)
    backend = choose_backend(xq.device)
    if backend.name == "triton":
        from . import triton_ops

        return triton_ops.int8_gemm(xq, x_scale, q, scale, bias, out_dtype, backend, lora_h, lora_b)
    return reference.int8_gemm_unchecked(xq, x_scale, q, scale, bias, out_dtype, lora_h, lora_b)


def dequantize_impl(q, scale, dtype, rotate_group, validate=True):
    if validate:
        _checks.check_values(scale)
    if choose_backend(q.device).name == "triton":
        from . import triton_ops

        return triton_ops.dequantize(q, scale, dtype, rotate_group)
    return reference.dequantize_unchecked(q, scale, dtype, rotate_group)
