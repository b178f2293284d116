"""Triton kernels: per-row INT8 quantization (activations and weights) and dequantization.

One program quantizes ``BLOCK_M`` rows. When a row fits in one tile (``K <= 16384``) it is read
once and kept in registers; longer rows are read twice, once for the absmax and once to quantize,
and the second read is served from L2. Optional per-channel smoothing and a group Hadamard rotation
(ConvRot) are applied to each tile before both uses, so they cost no extra pass over memory.

The arithmetic follows ``reference.py`` operation for operation (IEEE division through ``div_rn``,
no FMA contraction) so that, without rotation, the int8 values and scales equal the twin's bit for
bit. With rotation the group sums are accumulated in float32 by a tensor-core dot, so a value lying
within rounding of a .5 boundary may round the other way (off by one in rare elements).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .hadamard import hadamard_pm1_cached
from .launch import FastLauncher, TileTooLargeError, first_fit, keep
from .reference import _SEED_MASK, INV_127, TINY_SCALE, as_rows


def interpreting() -> bool:
    """True when kernels run on the CPU under ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Globals read inside @triton.jit functions must be tl.constexpr.
FLT_MAX = tl.constexpr(3.4028234663852886e38)
_INV_127 = tl.constexpr(INV_127)
_TINY = tl.constexpr(TINY_SCALE)
# Elements per program tile: 32 float32 registers per thread at 4 warps, so many programs fit on an
# SM and keep enough loads in flight (8192-element tiles at 8 warps ran at a third of bandwidth).
TILE_ELEMS = 4096
QUANT_WARPS = 4
# Two-pass rows are read again right after the absmax pass; the rows all programs hold at once must
# fit in L2 (50 MB on H100/H200, 40 MB on A100, 72-96 MB on Ada/Blackwell) or the second read goes
# to HBM. 4608 rows of 32 KB in flight ran at 2.5 TB/s on the H200 instead of ~4.
TWO_PASS_L2_BYTES = 24 << 20
# Single-pass rows by ``_quantize_parts``' LEAN form (bench/NOTES.md item 83): the same bits, fewer instructions. H200,
# session 25 (item 86): [4608, 3072] 20.6 -> 12.5 us, [4608, 4096] 24.0 -> 16.9 us; Wan's two-pass rows unchanged.
LEAN_ROWS = True


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _mul32(h, c: tl.constexpr):
    """Wrapping uint32 multiply by a constant."""
    return h * tl.full(h.shape, c, tl.uint32)


@triton.jit
def _fmix32(h):
    """MurmurHash3 32-bit finalizer (see ``reference._fmix32``)."""
    h ^= h >> 16
    h = _mul32(h, 0x85EBCA6B)
    h ^= h >> 13
    h = _mul32(h, 0xC2B2AE35)
    h ^= h >> 16
    return h


@triton.jit
def _uniform(seed, rows, cols):
    """Uniform [0, 1) float32 noise [BLOCK_M, BLOCK_K], equal to ``reference.uniform_noise``."""
    seed_h = _fmix32(seed.to(tl.uint32))
    row_h = _fmix32(rows.to(tl.uint32) ^ seed_h)
    h = _fmix32(_mul32(cols.to(tl.uint32), 0x9E3779B1)[None, :] ^ row_h[:, None])
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def round_half_even(y):
    """Round float32 to the nearest integer, ties to even (``torch.round``), as float32.

    ``libdevice.rint`` would do this in one instruction but does not run in the interpreter.
    Exact for |y| < 2**22, which holds after scaling to [-127, 127].
    """
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _to_int(y, STOCHASTIC: tl.constexpr, FAST_ROUND: tl.constexpr):
    """float32 -> int32: round half to even, or floor for stochastic rounding (``y`` has noise added).

    FAST_ROUND uses one PTX conversion (``cvt.rni``/``cvt.rmi``; NaN becomes 0); the interpreter,
    which cannot run inline assembly, takes the floor-based path.
    """
    if FAST_ROUND:
        if STOCHASTIC:
            r = tl.inline_asm_elementwise("cvt.rmi.s32.f32 $0, $1;", "=r,r", [y], dtype=tl.int32, is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise("cvt.rni.s32.f32 $0, $1;", "=r,r", [y], dtype=tl.int32, is_pure=True, pack=1)
    else:
        if STOCHASTIC:
            f = tl.floor(y)
        else:
            f = round_half_even(y)
        f = tl.where(tl.abs(f) <= 2147483520.0, f, 0.0)  # keep the cast defined; callers clamp after
        r = f.to(tl.int32)
    return r


@triton.jit
def _rotate(v, h_ptr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
            INV_SQRT_G: tl.constexpr, KRON: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """Group rotation of a [BLOCK_M, BLOCK_K] tile: each group of GROUP columns times H (+-1), / sqrt(G).

    KRON (G = 256): H256 = H16 (x) H16, so a group viewed as X [16, 16] rotates as H16^T X H16: two
    16-deep dots instead of one 256-deep dot, and a 1 KB matrix instead of 128-256 KB of shared memory.
    float16/bfloat16 operands times +-1 are exact with float32 accumulation; float32 operands (and the
    second Kronecker factor, which multiplies float32 partial sums) use PRECISION: "tf32x3" (three tf32
    products, float32-accurate; the quantizer of bf16/fp32 tensors) or "tf32" (operands rounded to a
    10-bit mantissa, still 8x finer than a bf16 activation; the fused quantizers, whose float32 rows are
    computed in registers: 1.6-2.2x faster there, bench/NOTES.md item 15).
    """
    if KRON:
        g = tl.arange(0, 16)
        h = tl.load(h_ptr + g[:, None] * 16 + g[None, :])
        R: tl.constexpr = BLOCK_M * BLOCK_K // 256
        x2 = tl.reshape(v, (R * 16, 16))
        if DOT_FP32:
            y = tl.dot(x2.to(tl.float32), h.to(tl.float32), input_precision=PRECISION)
        else:
            y = tl.dot(x2, h)
        hf = tl.broadcast_to(h.to(tl.float32)[None, :, :], (R, 16, 16))
        z = tl.dot(hf, tl.reshape(y, (R, 16, 16)), input_precision=PRECISION)  # H16 is symmetric
        out = tl.reshape(z, (BLOCK_M, BLOCK_K))
    else:
        g = tl.arange(0, GROUP)
        h = tl.load(h_ptr + g[:, None] * GROUP + g[None, :])
        vg = tl.reshape(v, (BLOCK_M * BLOCK_K // GROUP, GROUP))
        if DOT_FP32:
            vg = tl.dot(vg.to(tl.float32), h, input_precision=PRECISION)
        else:
            vg = tl.dot(vg, h)
        out = tl.reshape(vg, (BLOCK_M, BLOCK_K))
    return out * INV_SQRT_G


@triton.jit
def _load_rows(
    x_ptr, smooth_ptr, h_ptr, rows, row_ok, cols, K, stride_xm, stride_xk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SMOOTH: tl.constexpr,
    GROUP: tl.constexpr, INV_SQRT_G: tl.constexpr, KRON: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Load a [BLOCK_M, BLOCK_K] tile, smooth and rotate it; returns float32 (0 outside the tensor)."""
    col_ok = cols < K
    ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols.to(tl.int64)[None, :] * stride_xk
    v = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if HAS_SMOOTH:
        s = tl.load(smooth_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)
        v = tl.math.div_rn(v.to(tl.float32), s[None, :])
    if GROUP > 0:
        v = _rotate(v, h_ptr, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON, DOT_FP32, "tf32x3")
    return v.to(tl.float32)


@triton.jit
def _row_stats(v, absmax, nonfinite):
    finite = tl.abs(v) <= FLT_MAX  # false for NaN and +-Inf
    absmax = tl.maximum(absmax, tl.max(tl.where(finite, tl.abs(v), 0.0), axis=1))
    nonfinite += tl.sum((~finite).to(tl.int32), axis=1)
    return absmax, nonfinite


@triton.jit
def _store_row_scale(scale_ptr, rows, row_ok, absmax, nonfinite):
    """scale = max(absmax / 127, tiny), stored (NaN for rows with NaN/Inf); returns the finite scale."""
    scale = tl.maximum(absmax * _INV_127, _TINY)
    tl.store(scale_ptr + rows, tl.where(nonfinite > 0, float("nan"), scale), mask=row_ok)
    return scale


@triton.jit
def _quantize_store(v, inv, seed, rows, row_ok, cols, K, q_ptr, stride_qm,
                    STOCHASTIC: tl.constexpr, FAST_ROUND: tl.constexpr):
    y = v * inv[:, None]
    if STOCHASTIC:
        y = y + _uniform(seed, rows, cols)
    r = _to_int(y, STOCHASTIC, FAST_ROUND)
    r = tl.minimum(tl.maximum(r, -128), 127)  # clamp before the cast to int8
    r = tl.where(tl.abs(v) <= FLT_MAX, r, 0)  # non-finite inputs store 0; their row scale is NaN
    ptrs = q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :]
    tl.store(ptrs, r.to(tl.int8), mask=row_ok[:, None] & (cols < K)[None, :])


@triton.jit
def _store_scale(scale_ptr, rows, row_ok, absmax, nonfinite):
    """Store the row scales (``triton_quant``'s rule) and return their reciprocals for quantizing."""
    scale = _store_row_scale(scale_ptr, rows, row_ok, absmax, nonfinite)
    return tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _max_nan(a, b):
    """NaN-propagating max: a reduction's combine (one ``FMNMX.NAN`` a value, NaN and +-Inf reach the result)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _store_codes(v, inv, rows, row_ok, cols, K, q_ptr, stride_qm, FAST_ROUND: tl.constexpr):
    """``_quantize_store`` for a tile whose rows hold only finite values, each |v| at most the absmax that set its
    row's ``inv``: the clamp and the non-finite select are no-ops there (|v * inv| <= 127 within a few ulp), so
    this stores the same codes with ~4 fewer instructions a value (the kernels are issue-bound)."""
    r = _to_int(v * inv[:, None], False, FAST_ROUND)
    tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], r.to(tl.int8),
             mask=row_ok[:, None] & (cols < K)[None, :])


@triton.jit
def _quantize_parts(ya, yb, rows, row_ok, ca, cb, K, scale_ptr, q_ptr, stride_qm, BLOCK_M: tl.constexpr,
                    BLOCK_K2: tl.constexpr, FAST_ROUND: tl.constexpr, LEAN: tl.constexpr = False):
    """Store the row scales and int8 codes of rows held as one tile ``ya`` (columns ``ca``) or, with BLOCK_K2 > 0,
    one row as two parts ``ya | yb`` (columns ``ca | cb``, scalar statistics: the parts' layouts never meet).

    LEAN: each row's absmax by one NaN-propagating max a value, and, where every row of the tile is finite, the
    codes by ``_store_codes``; a tile with a NaN or Inf (its row scale is NaN) takes ``_quantize_exact``. The
    same scales and codes either way, with ~8 fewer instructions a value (bench/NOTES.md item 77)."""
    if LEAN:
        if BLOCK_K2 > 0 or BLOCK_M == 1:  # one row: its absmax is the tile's (a scalar)
            amax = tl.reduce(tl.abs(ya), None, _max_nan)
            if BLOCK_K2 > 0:
                amax = tl.maximum(amax, tl.reduce(tl.abs(yb), None, _max_nan), propagate_nan=tl.PropagateNan.ALL)
            absmax = tl.zeros((BLOCK_M,), tl.float32) + amax
        else:
            absmax = tl.reduce(tl.abs(ya), 1, _max_nan)
            # the tile's max from the tile again, not from ``absmax``: a reduction of that [BLOCK_M] vector crashes
            # Triton 3.6's sm_100 pipeline (its TMEM layout pass) after the rotation's dot
            amax = tl.reduce(tl.abs(ya), None, _max_nan)
        if amax <= FLT_MAX:  # false for NaN and +-Inf
            inv = _store_scale(scale_ptr, rows, row_ok, absmax, tl.zeros((BLOCK_M,), tl.int32))
            _store_codes(ya, inv, rows, row_ok, ca, K, q_ptr, stride_qm, FAST_ROUND)
            if BLOCK_K2 > 0:
                _store_codes(yb, inv, rows, row_ok, cb, K, q_ptr, stride_qm, FAST_ROUND)
        else:
            _quantize_exact(ya, yb, rows, row_ok, ca, cb, K, scale_ptr, q_ptr, stride_qm, BLOCK_M, BLOCK_K2,
                            FAST_ROUND)
    else:
        _quantize_exact(ya, yb, rows, row_ok, ca, cb, K, scale_ptr, q_ptr, stride_qm, BLOCK_M, BLOCK_K2, FAST_ROUND)


@triton.jit
def _quantize_exact(ya, yb, rows, row_ok, ca, cb, K, scale_ptr, q_ptr, stride_qm, BLOCK_M: tl.constexpr,
                    BLOCK_K2: tl.constexpr, FAST_ROUND: tl.constexpr):
    """``_quantize_parts`` with the finite absmax and the NaN/Inf count of each row (``_row_stats``' rule) and the
    general store (``_quantize_store``: clamped, non-finite values stored as 0)."""
    if BLOCK_K2 > 0:
        fa = tl.abs(ya) <= FLT_MAX  # false for NaN and +-Inf (``_row_stats``)
        fb = tl.abs(yb) <= FLT_MAX
        amax = tl.maximum(tl.max(tl.where(fa, tl.abs(ya), 0.0)), tl.max(tl.where(fb, tl.abs(yb), 0.0)))
        bad = tl.sum((~fa).to(tl.int32)) + tl.sum((~fb).to(tl.int32))
        absmax = tl.zeros((BLOCK_M,), tl.float32) + amax
        nonfinite = tl.zeros((BLOCK_M,), tl.int32) + bad
    else:
        absmax, nonfinite = _row_stats(ya, tl.zeros((BLOCK_M,), tl.float32), tl.zeros((BLOCK_M,), tl.int32))
    inv = _store_scale(scale_ptr, rows, row_ok, absmax, nonfinite)
    _quantize_store(ya, inv, 0, rows, row_ok, ca, K, q_ptr, stride_qm, False, FAST_ROUND)
    if BLOCK_K2 > 0:
        _quantize_store(yb, inv, 0, rows, row_ok, cb, K, q_ptr, stride_qm, False, FAST_ROUND)


@triton.jit
def _quantize_rows_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr, smooth_ptr, h_ptr, fixed_scale_ptr,
    # sizes and strides
    M, K, stride_xm, stride_xk, stride_qm, seed,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, GROUP: tl.constexpr, INV_SQRT_G: tl.constexpr, KRON: tl.constexpr,
    DOT_FP32: tl.constexpr, FIXED_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr, FAST_ROUND: tl.constexpr,
    FIXED_PER_ROW: tl.constexpr, LEAN: tl.constexpr = False,
):
    """q[m, k] = clamp(round(t(x)[m, k] / scale[m])), scale[m] = max(absmax_k t(x)[m, :] / 127, tiny).

    t = smoothing then group rotation. With FIXED_SCALE every row uses *fixed_scale_ptr and no
    scale is written. A row holding NaN/Inf stores scale NaN. Programs loop over row blocks, so the
    launcher can bound how many rows are in flight (two-pass rows must stay in L2 between passes).
    """
    for rb in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        _quantize_row_block(
            x_ptr, q_ptr, scale_ptr, smooth_ptr, h_ptr, fixed_scale_ptr, rb, M, K, stride_xm, stride_xk,
            stride_qm, seed, BLOCK_M, BLOCK_K, SINGLE_PASS, HAS_SMOOTH, GROUP, INV_SQRT_G, KRON, DOT_FP32,
            FIXED_SCALE, STOCHASTIC, FAST_ROUND, FIXED_PER_ROW, LEAN,
        )


@triton.jit
def _quantize_row_block(
    x_ptr, q_ptr, scale_ptr, smooth_ptr, h_ptr, fixed_scale_ptr, rb, M, K, stride_xm, stride_xk, stride_qm, seed,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, GROUP: tl.constexpr, INV_SQRT_G: tl.constexpr, KRON: tl.constexpr,
    DOT_FP32: tl.constexpr, FIXED_SCALE: tl.constexpr, STOCHASTIC: tl.constexpr, FAST_ROUND: tl.constexpr,
    FIXED_PER_ROW: tl.constexpr, LEAN: tl.constexpr,
):
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    if FIXED_SCALE:
        if FIXED_PER_ROW:
            scale = tl.load(fixed_scale_ptr + rows, mask=row_ok, other=1.0)
        else:
            scale = tl.load(fixed_scale_ptr + rows * 0)
    if SINGLE_PASS:
        v = _load_rows(x_ptr, smooth_ptr, h_ptr, rows, row_ok, cols, K, stride_xm, stride_xk,
                       BLOCK_M, BLOCK_K, HAS_SMOOTH, GROUP, INV_SQRT_G, KRON, DOT_FP32)
        if LEAN and not FIXED_SCALE and not STOCHASTIC:  # rows with their own scales: the lean statistics and store
            _quantize_parts(v, v, rows, row_ok, cols, cols, K, scale_ptr, q_ptr, stride_qm, BLOCK_M, 0, FAST_ROUND,
                            True)
        else:
            if not FIXED_SCALE:
                absmax, nonfinite = _row_stats(v, tl.zeros((BLOCK_M,), tl.float32), tl.zeros((BLOCK_M,), tl.int32))
                scale = _store_row_scale(scale_ptr, rows, row_ok, absmax, nonfinite)
            inv = tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), scale)
            _quantize_store(v, inv, seed, rows, row_ok, cols, K, q_ptr, stride_qm, STOCHASTIC, FAST_ROUND)
    else:
        # Two passes over the row: absmax, then quantize. The second read of this program's rows
        # (BLOCK_M x K elements) is served from L2.
        if not FIXED_SCALE:
            absmax = tl.zeros((BLOCK_M,), tl.float32)
            nonfinite = tl.zeros((BLOCK_M,), tl.int32)
            for k0 in range(0, K, BLOCK_K):
                v = _load_rows(x_ptr, smooth_ptr, h_ptr, rows, row_ok, k0 + cols, K, stride_xm, stride_xk,
                               BLOCK_M, BLOCK_K, HAS_SMOOTH, GROUP, INV_SQRT_G, KRON, DOT_FP32)
                absmax, nonfinite = _row_stats(v, absmax, nonfinite)
            scale = _store_row_scale(scale_ptr, rows, row_ok, absmax, nonfinite)
        inv = tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), scale)
        for k0 in range(0, K, BLOCK_K):
            v = _load_rows(x_ptr, smooth_ptr, h_ptr, rows, row_ok, k0 + cols, K, stride_xm, stride_xk,
                           BLOCK_M, BLOCK_K, HAS_SMOOTH, GROUP, INV_SQRT_G, KRON, DOT_FP32)
            _quantize_store(v, inv, seed, rows, row_ok, k0 + cols, K, q_ptr, stride_qm, STOCHASTIC, FAST_ROUND)


_QUANTIZE = FastLauncher(_quantize_rows_kernel, interpreting())


@triton.jit
def _dequantize_kernel(
    q_ptr, scale_ptr, out_ptr, N, K, stride_qn, stride_qk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PER_ROW: tl.constexpr,
):
    """out[n, k] = q[n, k] * scale[n or 0], written contiguously in out's dtype."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qn + cols[None, :] * stride_qk, mask=mask, other=0)
    if PER_ROW:
        s = tl.load(scale_ptr + rows, mask=rows < N, other=0.0)[:, None]
    else:
        s = tl.load(scale_ptr)
    w = q.to(tl.float32) * s
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers (no argument validation: callers in api.py validated already)
# --------------------------------------------------------------------------------------------
def rotation_min_tile(group: int) -> int:
    """Elements a tile needs for ``_rotate``'s dots: 16 rows of groups for a full G x G matrix; H16 (x) H16
    (group 256) needs one group (0: no rotation)."""
    return 0 if not group else 256 if group == 256 else 16 * group


def rotation_args(group: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor | None, dict]:
    """The +-1 Hadamard matrix ``_rotate`` loads (in ``dtype``; H16 for group 256, applied as H16 (x) H16) and
    the kernels' rotation meta-parameters GROUP, INV_SQRT_G, KRON for ConvRot ``group`` (0: none, no matrix)."""
    if not group:
        return None, {"GROUP": 0, "INV_SQRT_G": 1.0, "KRON": False}
    kron = group == 256
    h = hadamard_pm1_cached(16 if kron else group, device, dtype)
    return h, {"GROUP": group, "INV_SQRT_G": 1.0 / math.sqrt(group), "KRON": kron}


def quant_blocks(k: int, group: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_K, SINGLE_PASS, num_warps) for rows of length ``k``.

    Rows that fit one TILE_ELEMS tile are read once; longer rows take two passes over K. The tile holds
    at least ``rotation_min_tile(group)`` elements.
    """
    block_k = min(max(16, triton.next_power_of_2(k), group), TILE_ELEMS)
    block_m = max(1, TILE_ELEMS // block_k, rotation_min_tile(group) // block_k)
    return block_m, block_k, k <= block_k, QUANT_WARPS


def launch_quantize(
    x2: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor | None,
    *,
    smooth: torch.Tensor | None = None,
    rotate_group: int = 0,
    fixed_scale: torch.Tensor | None = None,
    seed: int | None = None,
    lean: bool | None = None,
) -> None:
    """Quantize rows of ``x2 [M, K]`` (any strides) into ``q [M, K]`` and ``scale [M]`` (float32).

    ``lean``: single-pass rows with their own scales (no ``fixed_scale``, no ``seed``) take ``_quantize_parts``' LEAN
    statistics and store (the same scales and codes; None: ``LEAN_ROWS``).

    With ``fixed_scale`` (float32, 0-d or one per row, contiguous) the rows use it and ``scale`` is not
    written. A tile the GPU rejects for resources (a rotation's matrix in shared memory) is retried smaller;
    raises ``launch.TileTooLargeError`` when none fits (callers then run the torch twin).
    """
    m, k = x2.shape
    if m == 0 or k == 0:
        return
    lean = LEAN_ROWS if lean is None else lean
    block_m, block_k, _, warps = quant_blocks(k, rotate_group)
    # The interpreter stores bfloat16 as raw uint16 and multiplies those bits in tl.dot, so under
    # TRITON_INTERPRET the rotation runs in float32 (tf32x3) for every input dtype.
    dot_fp32 = x2.dtype == torch.float32 or smooth is not None or interpreting()
    h, rot = rotation_args(rotate_group, x2.device, torch.float32 if dot_fp32 else x2.dtype)
    keep(h)  # cached per group, device and dtype: a recorded launch may keep its address (direct.Replayer)
    dummy = q

    def launch(tile: tuple[int, int]) -> None:
        block_m, block_k = tile
        single = k <= block_k
        blocks = triton.cdiv(m, block_m)
        if not single and x2.is_cuda:
            blocks = min(blocks, max(num_sms(x2.device), TWO_PASS_L2_BYTES // (block_m * k * x2.element_size())))
        _QUANTIZE(
            (blocks,),
            x2, q, scale if scale is not None else dummy, smooth if smooth is not None else dummy,
            h if h is not None else dummy,
            fixed_scale if fixed_scale is not None else dummy,
            m, k, x2.stride(0), x2.stride(1), q.stride(0), 0 if seed is None else seed & _SEED_MASK,
            BLOCK_M=block_m, BLOCK_K=block_k, SINGLE_PASS=single,
            HAS_SMOOTH=smooth is not None, **rot, DOT_FP32=dot_fp32,
            FIXED_SCALE=fixed_scale is not None, STOCHASTIC=seed is not None, FAST_ROUND=not interpreting(),
            FIXED_PER_ROW=fixed_scale is not None and fixed_scale.dim() > 0, LEAN=lean,
            num_warps=warps, enable_fp_fusion=False,
        )

    spec = (x2.dtype, k, rotate_group, dot_fp32, x2.device)  # the rotation's matrix takes most of the memory
    first_fit("quantize_rows", spec, (block_m, block_k), smaller_tile(rotate_group), launch,
              "these rows are quantized by the torch twin")


def smaller_tile(group: int):
    """``first_fit``'s rule for the quantizers' (BLOCK_M, BLOCK_K) tiles: half the columns, down to the
    fewest elements the rotation's dot takes (``rotation_min_tile``); long rows then take two passes.
    Group 128 float32 rows need 167,936 bytes at 4096 columns and 149,504 at 2048 with Triton 3.6 (sm_80 allows
    166,912), 245,760 at 4096 with 3.8 (sm_90 allows 232,448)."""
    min_tile = rotation_min_tile(group)

    def smaller(tile: tuple[int, int]) -> tuple[int, int] | None:
        block_m, block_k = tile
        nk = block_k // 2
        if nk < max(16, group):
            return None
        nm = max(1, min_tile // nk)
        return (nm, nk) if nm * nk < block_m * block_k else None

    return smaller


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (4 under the interpreter: a small persistent grid)."""
    if interpreting() or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_scales(m: int, k: int, device, column: bool = False) -> torch.Tensor:
    """The float32 [m] buffer (``column``: [m, 1], the same memory) a quantizer writes row scales into; rows of no
    elements (k = 0) get the smallest scale, as in the twin, since no kernel runs for them."""
    shape = (m, 1) if column else (m,)
    if k == 0:
        return torch.full(shape, TINY_SCALE, dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def quantize_rows(
    x: torch.Tensor, *, smooth: torch.Tensor | None = None, rotate_group: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``quantize_rows`` (unchecked). x [..., K] -> (q int8 [M, K], scale float32 [M, 1]); neither is a
    view (the ``quantize_rows`` custom op returns them as they are)."""
    k = x.shape[-1]
    x2 = as_rows(x)
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = row_scales(m, k, x.device, column=True)  # the kernel writes one float per row: [M, 1] is [M]'s memory
    try:
        launch_quantize(x2, q, scale, smooth=smooth, rotate_group=rotate_group)
    except TileTooLargeError:  # logged once by first_fit
        from .reference import quantize_rows_unchecked

        return quantize_rows_unchecked(x2, smooth, rotate_group)
    return q, scale


def quantize_weight(
    w: torch.Tensor,
    *,
    per_row: bool = True,
    seed: int | None = None,
    rotate_group: int = 0,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``quantize_weight`` (unchecked). w [N, K] -> (q int8 [N, K], scale [N, 1] or []); the torch twin
    when no quantizer tile fits the GPU (logged once)."""
    try:
        return _quantize_weight(w, per_row, seed, rotate_group, scale)
    except TileTooLargeError:
        from .reference import quantize_weight_unchecked

        return quantize_weight_unchecked(w, per_row, seed, rotate_group, scale)


def _quantize_weight(w, per_row, seed, rotate_group, scale):
    from .reference import per_tensor_scale

    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.int8, device=w.device)
    if per_row and scale is not None:
        launch_quantize(w, q, None, rotate_group=rotate_group, seed=seed, fixed_scale=scale.reshape(-1).contiguous())
        return q, scale.clone()
    if per_row:
        out = row_scales(n, k, w.device)
        launch_quantize(w, q, out, rotate_group=rotate_group, seed=seed)
        return q, out[:, None]
    fixed = scale if scale is not None else per_tensor_scale(w.abs().amax() if w.numel() else w.new_zeros(()))
    launch_quantize(w, q, None, fixed_scale=fixed, seed=seed)
    return q, fixed


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton ``dequantize`` without rotation (unchecked). q [N, K] -> w [N, K] in ``dtype``."""
    n, k = q.shape
    out = torch.empty((n, k), dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_n, block_k = 16, 256
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        q, scale.reshape(-1), out, n, k, q.stride(0), q.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, PER_ROW=scale.dim() > 0, num_warps=4,
    )
    return out
