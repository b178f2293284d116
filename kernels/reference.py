"""Pure-torch twins of the public kernel API: same names, same signatures, same numerics.

These run on any device. They are the CPU fallback, the oracle the Triton kernels are tested
against, and the path for GPUs without INT8 tensor cores. The arithmetic is spelled out so that
the Triton kernels can reproduce it bit for bit:

* activations are converted to float32, divided by ``smooth`` (IEEE division) and optionally
  rotated per group (``x_g @ H``);
* ``scale = max(absmax * fp32(1/127), 2**-126)`` per row, ``inv = 1 / scale`` (IEEE);
* ``q = clamp(round_half_even(x * inv), -128, 127)`` (or ``floor(x * inv + u)`` with a seeded
  counter-based uniform ``u`` for stochastic rounding), cast to int8 after clamping;
* a row holding NaN or Inf gets ``scale = NaN`` (its int8 values are 0), so that every output of
  that row is NaN and no other row is touched; an all-zero row gets the tiny scale and zeros;
* the INT8 GEMM accumulates exactly in int32; the epilogue is ``((acc * x_scale) * w_scale) + bias``
  in float32, then one rounding to the output dtype.
"""

from __future__ import annotations

import math

import torch

from . import _checks
from .hadamard import rotate

INV_127 = 1.0 / 127.0  # rounded to float32 where it is used
TINY_SCALE = 2.0**-126  # smallest normal float32: all-zero rows still get a positive scale
# 0-d tensors of the two: torch.compile traces module-level Python floats as symbols (and restarts the
# trace to specialize them), tensors as constants
_INV_127_F32 = torch.tensor(INV_127, dtype=torch.float32)
_TINY_SCALE_F32 = torch.tensor(TINY_SCALE, dtype=torch.float32)
_SEED_MASK = 0x7FFFFFFF  # seeds are reduced to 31 bits so kernels take them as int32
_CHUNK_ELEMS = 1 << 24  # rows are processed in chunks of about this many elements to bound memory
_EXACT_FP32_K = 1024  # 1024 * 128 * 128 = 2**24: float32 sums of int8 products are exact up to this K


# --------------------------------------------------------------------------------------------
# Counter-based uniform noise for stochastic rounding (identical on CPU, CUDA and in Triton)
# --------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``(h * c) mod 2**32`` for int64 ``h`` in [0, 2**32) without int64 overflow."""
    lo = (h & 0xFFFF) * c
    hi = ((h >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def fmix32_int(h: int) -> int:
    """The same finalizer on a Python int (used to pre-mix the seed on the host)."""
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def uniform_noise(seed: int, row0: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float32 noise ``[rows, cols]`` for element (row0 + i, j) of a seeded tensor.

    ``u = fmix32((col * 0x9E3779B1 mod 2**32) ^ fmix32(row ^ fmix32(seed))) >> 8, * 2**-24``.
    """
    seed_h = fmix32_int(seed & _SEED_MASK)
    r = torch.arange(row0, row0 + rows, device=device, dtype=torch.int64)
    rh = _fmix32(r ^ seed_h)
    c = _mul32(torch.arange(cols, device=device, dtype=torch.int64), 0x9E3779B1)
    h = _fmix32(c[None, :] ^ rh[:, None])
    return (h >> 8).to(torch.float32) * (2.0**-24)


# --------------------------------------------------------------------------------------------
# Row quantization
# --------------------------------------------------------------------------------------------
def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` as ``[M, K]`` (a view when the strides allow; also for K = 0)."""
    k = x.shape[-1]
    return x.reshape(-1, k) if k else x.reshape(math.prod(x.shape[:-1]), 0)



def _transform(x2: torch.Tensor, smooth: torch.Tensor | None, rotate_group: int) -> torch.Tensor:
    """Float32 view of the activation rows after smoothing and rotation. x2 [M, K]."""
    xf = x2.float()
    if smooth is not None:
        xf = xf / smooth.float()
    if rotate_group:
        xf = rotate(xf, rotate_group)
    return xf


def _quantize_float_rows(
    xf: torch.Tensor,
    *,
    fixed_scale: torch.Tensor | None = None,
    seed: int | None = None,
    row0: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float32 rows ``xf [M, K]``; returns (q int8 [M, K], scale float32 [M]).

    ``fixed_scale`` (0-d float32) replaces the per-row scale (per-tensor weights).
    """
    m, k = xf.shape
    finite = torch.isfinite(xf)
    if fixed_scale is None:
        absmax = torch.where(finite, xf.abs(), 0.0).amax(dim=1) if k else xf.new_zeros(m)
        scale = torch.maximum(absmax * _INV_127_F32.to(xf.device), _TINY_SCALE_F32.to(xf.device))
        bad = ~finite.all(dim=1)
    else:  # one scale for all rows ([]) or one per row ([m, 1])
        scale = fixed_scale.float().reshape(-1).expand(m)
        bad = torch.zeros(m, dtype=torch.bool, device=xf.device)
    inv = torch.reciprocal(scale)
    y = xf * inv[:, None]
    if seed is None:
        r = torch.round(y)  # round half to even
    else:
        r = torch.floor(y + uniform_noise(seed, row0, m, k, xf.device))
    r = torch.where(finite, r.clamp(-128.0, 127.0), 0.0)
    scale_out = torch.where(bad, torch.full_like(scale, float("nan")), scale)
    return r.to(torch.int8), scale_out


def _quantize_chunked(xf_fn, m: int, k: int, device, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``_quantize_float_rows`` over row chunks; ``xf_fn(r0, r1)`` yields float32 rows."""
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    q = torch.empty((m, k), dtype=torch.int8, device=device)
    scale = torch.empty((m,), dtype=torch.float32, device=device)
    fixed = kwargs.pop("fixed_scale", None)
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        chunk_fixed = fixed if fixed is None or fixed.dim() == 0 else fixed[r0:r1]
        q[r0:r1], scale[r0:r1] = _quantize_float_rows(xf_fn(r0, r1), row0=r0, fixed_scale=chunk_fixed, **kwargs)
    return q, scale


def quantize_rows(
    x: torch.Tensor, *, smooth: torch.Tensor | None = None, rotate_group: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token INT8 quantization.

    Args:
        x: float16/bfloat16/float32 ``[..., K]``, any strides; leading dims are folded into M.
        smooth: optional float ``[K]`` per-channel divisor (SmoothQuant), applied before rotation.
        rotate_group: 0, or the ConvRot group (64, 128, 256) rotating each group of K.

    Returns:
        ``q`` int8 ``[M, K]`` contiguous and ``scale`` float32 ``[M, 1]`` with ``x ~= q * scale``.
    """
    _checks.check_float_input(x, "x")
    _checks.check_smooth(smooth, x.shape[-1])
    _checks.check_rotate_group(rotate_group, x.shape[-1])
    _checks.check_values(smooth=smooth)
    return quantize_rows_unchecked(x, smooth, rotate_group)


def quantize_rows_unchecked(
    x: torch.Tensor, smooth: torch.Tensor | None, rotate_group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[-1]
    x2 = as_rows(x)
    q, scale = _quantize_chunked(
        lambda r0, r1: _transform(x2[r0:r1], smooth, rotate_group), x2.shape[0], k, x.device
    )
    return q, scale[:, None].clone()  # not a view, as the kernel's (the custom op returns it as it is)


def quantize_rows_in_graph(x2: torch.Tensor, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows`` of rows ``x2 [M, K]`` as plain torch ops, without chunking, for torch.compile to
    trace and fuse into the op that produces ``x2`` (the same arithmetic as the kernel: absmax of the
    finite values / 127, multiply by its reciprocal, round half to even, clamp)."""
    q, scale = _quantize_float_rows(_transform(x2, smooth, 0))
    return q, scale[:, None]


def int8_gemm_unchecked(xq, x_scale, q, scale, bias, out_dtype, lora_h=None, lora_b=None) -> torch.Tensor:
    """The GEMM and epilogue of ``int8_linear`` on already-quantized rows ``xq [M, K]``, ``x_scale [M, 1]``."""
    return epilogue(int8_matmul(xq, q), x_scale, scale, bias, out_dtype, lora_h, lora_b)


def check_weight_input(
    w: torch.Tensor, per_row: bool, seed: int | None, rotate_group: int, scale: torch.Tensor | None = None
) -> None:
    """Metadata checks of ``quantize_weight`` arguments (values: ``check_weight_finite``)."""
    if scale is not None:
        n = w.shape[0] if w.dim() == 2 else -1
        want = (n, 1) if per_row else ()
        if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != want:
            raise ValueError(f"scale: a given scale must be float32 of shape {list(want)} "
                             f"({'per-row' if per_row else 'per-tensor'})")
        if scale.device != w.device:
            raise ValueError(f"scale: is on {scale.device} but w is on {w.device}")
    _checks.check_float_input(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D weight [N, K], got shape {list(w.shape)}")
    if seed is not None and not isinstance(seed, int):
        raise ValueError(f"seed: expected an int or None, got {type(seed).__name__}")
    _checks.check_rotate_group(rotate_group, w.shape[1])
    if rotate_group and not per_row:
        raise ValueError("rotate_group: ConvRot needs per-row weight scales (per_row=True)")


def check_weight_finite(w: torch.Tensor) -> None:
    """NaN/Inf in a weight to be quantized raise ``ValueError`` with the rows (one host sync)."""
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        rows = (~finite).any(dim=1).nonzero().flatten()
        raise ValueError(
            f"w: contains NaN or Inf in {rows.numel()} row(s), first rows {rows[:5].tolist()}; "
            "the source weights are corrupt and cannot be quantized"
        )


def per_tensor_scale(absmax: torch.Tensor) -> torch.Tensor:
    """0-d float32 scale from a 0-d absmax, with the same rounding as the per-row scales."""
    return torch.clamp(absmax.float() * torch.tensor(INV_127, dtype=torch.float32), min=TINY_SCALE)


def quantize_weight(
    w: torch.Tensor,
    *,
    per_row: bool = True,
    seed: int | None = None,
    rotate_group: int = 0,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ``w [N, K]`` to INT8.

    Args:
        w: float16/bfloat16/float32 ``[N, K]``; NaN/Inf raise ``ValueError``.
        per_row: one scale per output row (``[N, 1]``) or one for the tensor (``[]``).
        seed: None for round-to-nearest-even, or an int seed for stochastic rounding (reproducible
            on every device: the noise is a hash of seed, row and column).
        rotate_group: ConvRot group (64/128/256) applied as ``W_g @ H^T`` before quantizing.
        scale: a given float32 scale instead of ``absmax / 127``: ``[N, 1]`` with ``per_row``, ``[]``
            without (values beyond 127 steps clamp).

    Returns:
        ``q`` int8 ``[N, K]`` and ``scale`` float32 ``[N, 1]`` or ``[]``.
    """
    check_weight_input(w, per_row, seed, rotate_group, scale)
    check_weight_finite(w)
    if scale is not None:
        _checks.check_positive_finite(scale, "scale")
    return quantize_weight_unchecked(w, per_row, seed, rotate_group, scale)


def quantize_weight_unchecked(
    w: torch.Tensor, per_row: bool, seed: int | None, rotate_group: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    kwargs = {"seed": seed}
    if not per_row:
        kwargs["fixed_scale"] = scale if scale is not None else per_tensor_scale(
            w.abs().amax() if w.numel() else w.new_zeros(()))
    elif scale is not None:
        kwargs["fixed_scale"] = scale
    fixed = kwargs.get("fixed_scale")
    q, out = _quantize_chunked(lambda r0, r1: _transform(w[r0:r1], None, rotate_group), n, k, w.device, **kwargs)
    if per_row:
        return q, (out[:, None] if fixed is None else fixed.clone())
    return q, fixed.to(w.device)


# --------------------------------------------------------------------------------------------
# GEMM and epilogue
# --------------------------------------------------------------------------------------------
def _int_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    m, k = a.shape
    return a.is_cuda and m > 16 and k > 0 and k % 8 == 0 and b.shape[0] % 8 == 0


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` for int8 ``a [M, K]`` and ``b [N, K]``, returned as int32 ``[M, N]``.

    Uses ``torch._int_mm`` (cuBLASLt) where its constraints hold, else float32 matmuls over K chunks
    of 1024, which are exact because every partial sum stays below 2**24.
    """
    m, k = a.shape
    n = b.shape[0]
    if _int_mm_ok(a, b):
        return torch._int_mm(a, b.t())
    acc = torch.zeros((m, n), dtype=torch.int32, device=a.device)
    for k0 in range(0, k, _EXACT_FP32_K):
        k1 = min(k, k0 + _EXACT_FP32_K)
        acc += (a[:, k0:k1].float() @ b[:, k0:k1].float().T).to(torch.int32)
    return acc


def epilogue(
    acc: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    lora_h: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """``((acc * x_scale) * w_scale) + bias [+ lora_h @ lora_b.T]`` in float32, rounded once to ``out_dtype``.

    acc int32 [M, N]; x_scale float32 [M] or [M, 1]; w_scale float32 [], [N] or [N, 1]; bias [N];
    lora_h [M, R] and lora_b [N, R] (the low-rank term, see ``int8_linear``).
    """
    m, n = acc.shape
    out = acc.float() * x_scale.reshape(m, 1)
    out = out * (w_scale.reshape(1, n) if w_scale.dim() else w_scale)
    if bias is not None:
        out = out + bias.float()
    if lora_h is not None:
        out = out + lora_h.float() @ lora_b.float().T
    return out.to(out_dtype)


def lora_hidden(x2: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """The low-rank projection ``x2 @ lora_a.T`` [M, R] in x's dtype (the first LoRA matmul)."""
    return x2 @ lora_a.to(x2.dtype).T


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
) -> torch.Tensor:
    """W8A8 linear: ``y = dequant(quant(x) @ q.T) + bias [+ (x @ lora_a.T) @ lora_b.T]``.

    Args:
        x: float ``[..., K]``.
        q: int8 weight ``[N, K]`` (already rotated / multiplied by ``smooth`` when those are used).
        scale: float32 weight scale ``[]`` (per-tensor), ``[N]`` or ``[N, 1]`` (per-row).
        bias: optional float ``[N]``.
        out_dtype: output dtype (default ``x.dtype``).
        smooth, rotate_group: as in ``quantize_rows``.
        validate: check scale and smooth values (see ``kernels.int8_linear``).
        lora_a, lora_b: an optional low-rank term, ``lora_a [R, K]`` and ``lora_b [N, R]`` float (the
            LoRA's scale folded into ``lora_b``); added in float32 before the output is rounded.

    Returns:
        ``y`` ``[..., N]`` in ``out_dtype``.
    """
    _, _, _, out_dtype = _checks.check_linear_args(x, q, scale, bias, out_dtype, smooth, rotate_group,
                                                   lora_a, lora_b)
    if validate:
        _checks.check_values(scale, smooth)
    return int8_linear_unchecked(x, q, scale, bias, out_dtype, smooth, rotate_group, lora_a, lora_b)


def int8_linear_unchecked(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    smooth: torch.Tensor | None,
    rotate_group: int,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
) -> torch.Tensor:
    n = q.shape[0]
    lead = x.shape[:-1]
    xq, xs = quantize_rows_unchecked(x, smooth, rotate_group)
    h = lora_hidden(as_rows(x), lora_a) if lora_a is not None else None
    y = epilogue(int8_matmul(xq, q), xs, scale, bias, out_dtype, h, lora_b)
    return y.reshape(*lead, n)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, *, rotate_group: int = 0, validate: bool = True
) -> torch.Tensor:
    """``w = q * scale`` in ``dtype``; with ``rotate_group`` the ConvRot rotation is undone.

    q int8 ``[N, K]``; scale float32 ``[]``, ``[N]`` or ``[N, 1]``. Returns ``[N, K]``.
    """
    check_dequantize_args(q, scale, dtype, rotate_group)
    if validate:
        _checks.check_values(scale)
    return dequantize_unchecked(q, scale, dtype, rotate_group)


def check_dequantize_args(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rotate_group: int) -> None:
    n, k = _checks.check_int8_weight(q, "q")
    _checks.check_scale(scale, n, "scale")
    _checks.check_out_dtype(dtype, dtype)
    _checks.check_rotate_group(rotate_group, k)


def dequantize_unchecked(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rotate_group: int) -> torch.Tensor:
    n = q.shape[0]
    per_row = scale.dim() > 0
    w = q.float() * (scale.reshape(n, 1) if per_row else scale)
    if rotate_group:
        w = rotate(w, rotate_group)  # H is symmetric and orthonormal: W = W_rot @ H
    return w.to(dtype)
