"""Triton kernels that fuse the memory-bound work around a transformer block's INT8 linears.

In an eager FLUX.2 step these ops, not the GEMMs, are most of the non-attention time (profile in
bench/NOTES.md): each one reads and writes a whole bf16 activation. Fused here:

* ``_norm_mod_quant_kernel``: LayerNorm (no affine) or RMSNorm (with or without its weight) ->
  ``* (1 + scale) (+ shift)`` -> per-row INT8.
  The modulated activation only feeds a linear layer, so it is never written in bf16.
* ``_glu_quant_kernel``: the input rows of a block's output linear, ``[prefix | act(h)]`` with the
  MLP's activation function ``act`` chosen by ``ACT`` (``ACT_CODES``): SwiGLU ``silu(g) * u``
  (FLUX.2, Z-Image) or GELU-tanh (FLUX.1, Chroma, Qwen-Image, Wan). Single blocks: attention output
  next to the activated MLP half; double blocks: the activation alone. Quantized per row without
  materializing the activation or the concatenation.
* ``_norm_gate_add_kernel``: a post-normalized sublayer output added to the residual through its gate,
  ``x + gate * RMSNorm(y) * w`` (Z-Image's sandwich norms), in one pass.
* ``_qk_norm_rope_kernel``: per-head RMSNorm of q and k, rotary embedding, and the copy of q, k, v
  from the q/k/v projections (three column slices of a fused qkv projection, or three separate
  projections as Qwen-Image's) into ``[B, H, S, D]`` buffers (at a sequence offset, so the two streams
  of a double block land in one buffer without ``torch.cat``).

The two quantizing kernels optionally rotate each group of GROUP columns by a Hadamard matrix before
quantizing (ConvRot weights expect rotated activations), with ``triton_quant._rotate`` (tf32 dots) on
the float32 values in registers. All arithmetic is float32 with one rounding at the end, so
results differ from ComfyUI's op-by-op bf16 path by that path's intermediate roundings; the torch
twins are in ``reference_fused.py``.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import triton
import triton.language as tl

from . import norm_configs
from .launch import (
    FastLauncher,
    TileTooLargeError,  # noqa: F401  (raised here, caught as triton_fused.TileTooLargeError)
    first_fit,
    keep,
    no_smaller,
)
from .reference_fused import heads_view_of
from .triton_quant import (
    FLT_MAX,
    _max_nan,
    _quantize_parts,
    _quantize_store,
    _rotate,
    _row_stats,
    _store_codes,
    _store_scale,
    interpreting,
    num_sms,
    rotation_args,
    rotation_min_tile,
    row_scales,
    smaller_tile,
)

logger = logging.getLogger(__name__)


@triton.jit
def _maybe_rotate(v, h_ptr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                  INV_SQRT_G: tl.constexpr, KRON: tl.constexpr):
    """``v`` (float32 [BLOCK_M, BLOCK_K], zero outside the tensor) with each GROUP-column group rotated, the
    dots in tf32: rows rounded to a 10-bit mantissa (finer than the bf16 activation the unfused quantizer
    rotates; the error stays ~10x below the int8 step) at 1.6-2.2x the speed of tf32x3 here."""
    if GROUP > 0:
        v = _rotate(v, h_ptr, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON, True, "tf32")
    return v


@triton.jit
def _load_part(x_ptr, rows, row_ok, cols, K, stride_xm):
    """x[rows, cols] as stored (0 outside the tensor): a tile of one row part, converted where it is used."""
    ok = row_ok[:, None] & (cols < K)[None, :]
    return tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0)


@triton.jit
def _rms_rstd(a, b, K, eps, BLOCK_M: tl.constexpr, BLOCK_K2: tl.constexpr):
    """Reciprocal RMS (float32 [BLOCK_M]) of rows held as one tile ``a`` or, with BLOCK_K2 > 0, one row as two
    parts ``a | b`` (a scalar sum: the parts' layouts never meet; ``b`` is unused otherwise)."""
    if BLOCK_K2 > 0:
        rstd = tl.zeros((BLOCK_M,), tl.float32) + 1.0 / tl.sqrt_rn((tl.sum(a * a) + tl.sum(b * b)) / K + eps)
    else:
        rstd = 1.0 / tl.sqrt_rn(tl.sum(a * a, axis=1) / K + eps)
    return rstd


@triton.jit
def _modulate_part(d, rstd, rows, row_ok, cols, K, shift_ptr, mscale_ptr, w_ptr, h_ptr, rows_per_batch, stride_mb,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, INV_SQRT_G: tl.constexpr,
                   KRON: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SHIFT: tl.constexpr, EVEN: tl.constexpr = False):
    """rot(d * rstd (* w) * (1 + mscale[b]) (+ shift[b])) of one row part (float32, 0 outside the tensor).

    EVEN: the part has no padding columns (K fills the row's tiles), so no select is needed: rows past M load 0
    everywhere and give 0 (but with eps = 0, whose 0 * inf the quantizers treat as any non-finite row)."""
    col_ok = cols < K
    ok = row_ok[:, None] & col_ok[None, :]
    y = d * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mod = (rows // rows_per_batch).to(tl.int64)[:, None] * stride_mb + cols[None, :]
    sc = tl.load(mscale_ptr + mod, mask=ok, other=0.0).to(tl.float32)
    y = y * (1.0 + sc)
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + mod, mask=ok, other=0.0).to(tl.float32)
    if not EVEN:
        y = tl.where(ok, y, 0.0)
    return _maybe_rotate(y, h_ptr, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON)


@triton.jit
def _norm_mod_quant_kernel(
    x_ptr, shift_ptr, mscale_ptr, w_ptr, q_ptr, scale_ptr, h_ptr,
    M, K, rows_per_batch, stride_xm, stride_mb, stride_qm, eps,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr, PREFETCH: tl.constexpr,
    FAST_ROUND: tl.constexpr, GROUP: tl.constexpr, INV_SQRT_G: tl.constexpr, KRON: tl.constexpr,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SHIFT: tl.constexpr, LEAN: tl.constexpr = False,
    EVEN: tl.constexpr = False,
):
    """q, scale = quant(rot(norm(x) * (1 + mscale[b]) + shift[b])), b = row // rows_per_batch.

    norm: LayerNorm without affine (RMS false; FLUX, Qwen-Image, Wan) or RMSNorm (RMS true; Z-Image), times the
    weight w when HAS_WEIGHT; without HAS_SHIFT there is no shift. A row is held in registers (read once,
    statistics and quantization from registers) as one tile of BLOCK_K columns (K <= BLOCK_K), or with
    BLOCK_K2 > 0 as two parts, columns [0, BLOCK_K) and [BLOCK_K, BLOCK_K + BLOCK_K2) (K <= their sum; a
    power-of-two tile each, less padding: ``norm_configs.row_parts``). PREFETCH: each program loads its next
    tile's rows before it reduces and stores the current one (a persistent grid keeps its loads in flight).
    rot: the group rotation when GROUP > 0 (K % GROUP == 0, each part a multiple of GROUP), else the identity.
    The kernel is bound by instruction issue (~40 SASS instructions a value at Wan's rows, bench/NOTES.md item 77):
    LEAN takes ``_quantize_parts``' lean statistics and stores; EVEN (K == BLOCK_K + BLOCK_K2: no padding
    columns) drops the selects that keep padding out of the statistics. Neither changes a scale or a code.
    """
    ca = tl.arange(0, BLOCK_K)
    step = tl.num_programs(0)
    cb = ca  # the second part's columns (BLOCK_K2 > 0); unused otherwise
    if BLOCK_K2 > 0:
        cb = BLOCK_K + tl.arange(0, BLOCK_K2)
    if PREFETCH:
        first = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        xa_next = _load_part(x_ptr, first, first < M, ca, K, stride_xm)
        if BLOCK_K2 > 0:
            xb_next = _load_part(x_ptr, first, first < M, cb, K, stride_xm)
    for rb in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), step):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        if PREFETCH:
            after = rows + step * BLOCK_M
            xa = xa_next.to(tl.float32)
            xa_next = _load_part(x_ptr, after, after < M, ca, K, stride_xm)
            if BLOCK_K2 > 0:
                xb = xb_next.to(tl.float32)
                xb_next = _load_part(x_ptr, after, after < M, cb, K, stride_xm)
        else:
            xa = _load_part(x_ptr, rows, row_ok, ca, K, stride_xm).to(tl.float32)
            if BLOCK_K2 > 0:
                xb = _load_part(x_ptr, rows, row_ok, cb, K, stride_xm).to(tl.float32)
        da = xa
        db = xa  # the second part (BLOCK_K2 > 0); unused otherwise
        if BLOCK_K2 > 0:  # one row (BLOCK_M = 1): scalar statistics, so the two parts' layouts never meet
            db = xb
            if not RMS:
                mean = (tl.sum(xa) + tl.sum(xb)) / K
                da = xa - mean  # EVEN: no padding columns, and rows past M load 0 (0 - 0)
                db = xb - mean
                if not EVEN:
                    da = tl.where(row_ok[:, None] & (ca < K)[None, :], da, 0.0)
                    db = tl.where(row_ok[:, None] & (cb < K)[None, :], db, 0.0)
        elif not RMS:
            mean = tl.sum(xa, axis=1) / K
            da = xa - mean[:, None]
            if not EVEN:
                da = tl.where(row_ok[:, None] & (ca < K)[None, :], da, 0.0)
        rstd = _rms_rstd(da, db, K, eps, BLOCK_M, BLOCK_K2)
        ya = _modulate_part(da, rstd, rows, row_ok, ca, K, shift_ptr, mscale_ptr, w_ptr, h_ptr, rows_per_batch,
                            stride_mb, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON, HAS_WEIGHT, HAS_SHIFT, EVEN)
        yb = ya
        if BLOCK_K2 > 0:
            yb = _modulate_part(db, rstd, rows, row_ok, cb, K, shift_ptr, mscale_ptr, w_ptr, h_ptr, rows_per_batch,
                                stride_mb, BLOCK_M, BLOCK_K2, GROUP, INV_SQRT_G, KRON, HAS_WEIGHT, HAS_SHIFT, EVEN)
        _quantize_parts(ya, yb, rows, row_ok, ca, cb, K, scale_ptr, q_ptr, stride_qm, BLOCK_M, BLOCK_K2, FAST_ROUND,
                        LEAN)


# ``_glu_quant_kernel``'s ACT meta-parameter for each of ``reference_fused.ACTIVATIONS``
ACT_CODES = {"swiglu": 0, "gelu_tanh": 1, "identity": 2}
_GELU_2C = tl.constexpr(2.0 * 0.7978845608028654)  # 2 * sqrt(2 / pi)
# |gelu_tanh(x)| for x < 0 peaks at 0.170040 (x = -0.75179); a row absmax above this bound is set by its positive side
_GELU_NEG_BOUND = tl.constexpr(0.171)


# ``x * sigmoid(z)`` as one inline-PTX block ($0 = out, $1 = x, $2 = z; float32): ``_times_sigmoid``'s FAST_ACT form,
# also the Gluon SwiGLU GEMM's epilogue (``gluon_gemm._glu_epilogue``). 0fBFB8AA3B: -log2(e), the float32 Triton's
# exp multiplies by (negated: exact)
TIMES_SIGMOID_PTX: tl.constexpr = tl.constexpr(
    "{ .reg .f32 t; mul.rn.f32 t, $2, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; "
    "add.rn.f32 t, t, 0f3F800000; rcp.approx.ftz.f32 t, t; mul.rn.f32 $0, $1, t; }")


@triton.jit
def _times_sigmoid(x, z, FAST_ACT: tl.constexpr):
    """``x * sigmoid(z)``, float32.

    FAST_ACT: ``x * rcp(1 + ex2(z * -log2 e))`` in one inline-PTX block (4-5 instructions a value), the same
    operations in the same order as ``x * tl.sigmoid(z)`` (Triton's exp is ex2.approx of the scaled argument;
    ``1 / y`` with ``div.full`` is MUFU.RCP of y for 1 <= y <= 2**126) without their range fix-ups (~12
    instructions): ex2/rcp flush subnormals, which only changes results where ``1 + exp(-z) > 2**126``
    (z < -87.3), there ``x * sigmoid(z)`` is 0 instead of |x| * 1e-38 or less. The interpreter, which cannot
    run PTX, takes the Triton form."""
    if FAST_ACT:
        return tl.inline_asm_elementwise(TIMES_SIGMOID_PTX, "=r,r,r", [x, z], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return x * tl.sigmoid(z)


@triton.jit
def _glu_tile(g_ptr, u_ptr, rows, row_ok, cols, F, stride_gm, stride_um, ACT: tl.constexpr,
              FAST_ACT: tl.constexpr):
    """act(h) for a [BLOCK_M, BLOCK_K] tile (0 outside the tensor).

    ACT 0, SwiGLU: silu(g) * u with g = columns [0, F) of g's rows, u = columns [0, F) of u's rows (the second
    half of the same rows for a fused gate|up projection, or a separate one: Z-Image's w1 / w3). ACT 1, GELU-tanh:
    0.5 * x * (1 + tanh(c * (x + 0.044715 * x^3))) on columns [0, F), written as x * sigmoid(2c * (...))
    (the same function; Triton has no tanh that runs in the interpreter). ``_times_sigmoid`` (FAST_ACT). ACT 2:
    g itself (an activation the SwiGLU GEMM computed)."""
    ok = row_ok[:, None] & (cols < F)[None, :]
    base = g_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :]
    g = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    if ACT == 0:
        u = tl.load(u_ptr + rows.to(tl.int64)[:, None] * stride_um + cols[None, :], mask=ok, other=0.0)
        u = u.to(tl.float32)
        out = _times_sigmoid(g, g, FAST_ACT) * u
    elif ACT == 1:
        out = _gelu_tile(g, FAST_ACT)
    else:
        out = g
    return out


@triton.jit
def _prefix_tile(p_ptr, rows, row_ok, cols, P, stride_pm):
    ok = row_ok[:, None] & (cols < P)[None, :]
    return tl.load(p_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _glu_row_stats(p_ptr, g_ptr, u_ptr, h_ptr, rows, row_ok, cols, P, F, stride_pm, stride_gm, stride_um,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, INV_SQRT_G: tl.constexpr,
                   KRON: tl.constexpr, ACT: tl.constexpr, FAST_ACT: tl.constexpr):
    """(absmax of the finite values, count of NaN/Inf) [BLOCK_M] of rows ``rot([p | act(g)])``: each tile
    reduced across the program's threads (two barriers a tile)."""
    absmax = tl.zeros((BLOCK_M,), tl.float32)
    nonfinite = tl.zeros((BLOCK_M,), tl.int32)
    for k0 in range(0, P, BLOCK_K):
        v = _prefix_tile(p_ptr, rows, row_ok, k0 + cols, P, stride_pm)
        v = _maybe_rotate(v, h_ptr, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON)
        absmax, nonfinite = _row_stats(v, absmax, nonfinite)
    for k0 in range(0, F, BLOCK_K):
        v = _glu_tile(g_ptr, u_ptr, rows, row_ok, k0 + cols, F, stride_gm, stride_um, ACT, FAST_ACT)
        v = _maybe_rotate(v, h_ptr, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON)
        absmax, nonfinite = _row_stats(v, absmax, nonfinite)
    return absmax, nonfinite


@triton.jit
def _glu_lane_stats(p_ptr, g_ptr, u_ptr, h_ptr, rows, row_ok, cols, P, F, stride_pm, stride_gm, stride_um,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, INV_SQRT_G: tl.constexpr,
                    KRON: tl.constexpr, ACT: tl.constexpr, FAST_ACT: tl.constexpr):
    """``_glu_row_stats`` with one reduction a row instead of one a tile: each thread keeps the running max of
    |v| of its own columns (NaN-propagating: one FMNMX a value, no barrier in the loop), reduced after the row.
    Exact for rows of finite values (max is order-free); a row whose lanes saw a NaN or Inf (rare: its scale
    is NaN) takes ``_glu_row_stats`` again for the finite absmax its finite values are quantized with."""
    am = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for k0 in range(0, P, BLOCK_K):
        v = _prefix_tile(p_ptr, rows, row_ok, k0 + cols, P, stride_pm)
        v = _maybe_rotate(v, h_ptr, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON)
        am = tl.maximum(am, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
    for k0 in range(0, F, BLOCK_K):
        v = _glu_tile(g_ptr, u_ptr, rows, row_ok, k0 + cols, F, stride_gm, stride_um, ACT, FAST_ACT)
        v = _maybe_rotate(v, h_ptr, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON)
        am = tl.maximum(am, tl.abs(v), propagate_nan=tl.PropagateNan.ALL)
    nonfinite = tl.sum((~(am <= FLT_MAX)).to(tl.int32), axis=1)  # lanes that saw NaN or Inf
    absmax = tl.max(am, axis=1)
    if tl.max(nonfinite, axis=0) > 0:
        absmax, nonfinite = _glu_row_stats(p_ptr, g_ptr, u_ptr, h_ptr, rows, row_ok, cols, P, F, stride_pm,
                                           stride_gm, stride_um, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON, ACT,
                                           FAST_ACT)
    return absmax, nonfinite


@triton.jit
def _gelu_tile(g, FAST_ACT: tl.constexpr):
    """gelu_tanh of float32 ``g`` (any shape), as ``_glu_tile`` computes it: x * sigmoid(2c * (x + 0.044715 x^3))."""
    return _times_sigmoid(g, _GELU_2C * (g + 0.044715 * (g * g * g)), FAST_ACT)


@triton.jit
def _gelu_max_stats(p_ptr, g_ptr, u_ptr, h_ptr, rows, row_ok, cols, P, F, stride_pm, stride_gm, stride_um,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FAST_ACT: tl.constexpr):
    """``_glu_row_stats`` of rows ``[p | gelu_tanh(g)]`` (no rotation) without evaluating the activation.

    gelu_tanh is increasing for x >= 0 (each float32 step of ``_gelu_tile`` is monotone there, fp fusion off), and
    |gelu_tanh(x)| <= 0.1701 for x < 0, so where max(|p|, gelu(max g)) exceeds ``_GELU_NEG_BOUND`` it is the row's
    absmax: the row's largest g is its largest activation, computed by the same operations. The pass then reads g
    with two maxima a value (max g; max |g|, NaN-propagating, which finds NaN and +-Inf) instead of the activation's
    ~12 instructions and two MUFU operations. A tile with a row below the bound (all-negative or tiny rows) or a
    NaN or Inf takes ``_glu_row_stats``. The same scales as the other forms wherever the hardware's ex2 / rcp
    approximations are monotone (FAST_ACT; exact arithmetic in the interpreter); the GPU tests compare them."""
    pm = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for k0 in range(0, P, BLOCK_K):
        pm = tl.maximum(pm, tl.abs(_prefix_tile(p_ptr, rows, row_ok, k0 + cols, P, stride_pm)),
                        propagate_nan=tl.PropagateNan.ALL)
    gm = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)  # 0 outside the tensor: gelu(0) = 0 is below the bound
    am = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for k0 in range(0, F, BLOCK_K):
        g = _prefix_tile(g_ptr, rows, row_ok, k0 + cols, F, stride_gm)  # the activation's input, as loaded
        gm = tl.maximum(gm, g, propagate_nan=tl.PropagateNan.ALL)
        am = tl.maximum(am, tl.abs(g), propagate_nan=tl.PropagateNan.ALL)
    pmax = tl.reduce(pm, 1, _max_nan)
    absmax = tl.maximum(pmax, _gelu_tile(tl.reduce(gm, 1, _max_nan), FAST_ACT))
    fast = (pmax <= FLT_MAX) & (tl.reduce(am, 1, _max_nan) <= FLT_MAX) & (absmax > _GELU_NEG_BOUND)
    nonfinite = tl.zeros((BLOCK_M,), tl.int32)
    if tl.min((fast | ~row_ok).to(tl.int32), axis=0) == 0:
        absmax, nonfinite = _glu_row_stats(p_ptr, g_ptr, u_ptr, h_ptr, rows, row_ok, cols, P, F, stride_pm,
                                           stride_gm, stride_um, BLOCK_M, BLOCK_K, 0, 1.0, False, 1, FAST_ACT)
    return absmax, nonfinite


@triton.jit
def _glu_quant_kernel(
    p_ptr, g_ptr, u_ptr, q_ptr, scale_ptr, h_ptr,
    M, P, F, stride_pm, stride_gm, stride_um, stride_qm,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FAST_ROUND: tl.constexpr,
    GROUP: tl.constexpr, INV_SQRT_G: tl.constexpr, KRON: tl.constexpr, ACT: tl.constexpr,
    FAST_ACT: tl.constexpr = False, LANE_STATS: tl.constexpr = False, FINITE_STORE: tl.constexpr = False,
    MAX_STATS: tl.constexpr = False, SPLIT_STORE: tl.constexpr = False,
):
    """Rows ``rot([p[m, :P] | act(g[m])])`` -> q [M, P + F] int8 and scale [M] (``_glu_tile``: act by ACT).

    Two passes over each row (absmax, then quantize); the second is served mostly from L2, which holds
    the rows of the programs resident on the SMs. With GROUP > 0 both passes rotate each tile (P and F
    multiples of GROUP, BLOCK_K a multiple of GROUP: groups never straddle tiles or the prefix/GLU boundary).
    The kernel is bound by instruction issue, not memory (bench/NOTES.md, "The GLU quantizer is issue-bound"):
    FAST_ACT computes the sigmoid without its range fix-ups (``_times_sigmoid``), LANE_STATS reduces the absmax
    once a row instead of once a tile (``_glu_lane_stats``); both give the same codes and scales as without them
    (FAST_ACT: but for sigmoid arguments below -87.3, see there). FINITE_STORE: the second pass stores the codes of
    tiles whose rows are all finite by ``_store_codes`` (no clamp, no select: the same codes); SPLIT_STORE does so with
    one loop per store (``_glu_store_pass``) instead of a branch in each tile. MAX_STATS (GELU-tanh without rotation
    only): the statistics from the row's largest input, ``_gelu_max_stats``.
    """
    cols = tl.arange(0, BLOCK_K)
    for rb in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        if MAX_STATS:
            absmax, nonfinite = _gelu_max_stats(p_ptr, g_ptr, u_ptr, h_ptr, rows, row_ok, cols, P, F, stride_pm,
                                                stride_gm, stride_um, BLOCK_M, BLOCK_K, FAST_ACT)
        elif LANE_STATS:
            absmax, nonfinite = _glu_lane_stats(p_ptr, g_ptr, u_ptr, h_ptr, rows, row_ok, cols, P, F, stride_pm,
                                                stride_gm, stride_um, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON,
                                                ACT, FAST_ACT)
        else:
            absmax, nonfinite = _glu_row_stats(p_ptr, g_ptr, u_ptr, h_ptr, rows, row_ok, cols, P, F, stride_pm,
                                               stride_gm, stride_um, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON,
                                               ACT, FAST_ACT)
        inv = _store_scale(scale_ptr, rows, row_ok, absmax, nonfinite)
        finite = tl.max(nonfinite, axis=0) == 0  # the tile's rows all finite (FINITE_STORE's store)
        if SPLIT_STORE:  # the branch outside the loops: one store form in each pass
            if finite:
                _glu_store_pass(p_ptr, g_ptr, u_ptr, h_ptr, q_ptr, inv, finite, rows, row_ok, cols, P, F, stride_pm,
                                stride_gm, stride_um, stride_qm, BLOCK_M, BLOCK_K, FAST_ROUND, GROUP, INV_SQRT_G, KRON,
                                ACT, FAST_ACT, True, True)
            else:
                _glu_store_pass(p_ptr, g_ptr, u_ptr, h_ptr, q_ptr, inv, finite, rows, row_ok, cols, P, F, stride_pm,
                                stride_gm, stride_um, stride_qm, BLOCK_M, BLOCK_K, FAST_ROUND, GROUP, INV_SQRT_G, KRON,
                                ACT, FAST_ACT, False, False)
        else:  # FINITE_STORE's branch in each tile
            _glu_store_pass(p_ptr, g_ptr, u_ptr, h_ptr, q_ptr, inv, finite, rows, row_ok, cols, P, F, stride_pm,
                            stride_gm, stride_um, stride_qm, BLOCK_M, BLOCK_K, FAST_ROUND, GROUP, INV_SQRT_G, KRON,
                            ACT, FAST_ACT, FINITE_STORE, False)


@triton.jit
def _glu_store_pass(p_ptr, g_ptr, u_ptr, h_ptr, q_ptr, inv, finite, rows, row_ok, cols, P, F, stride_pm, stride_gm,
                    stride_um, stride_qm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FAST_ROUND: tl.constexpr,
                    GROUP: tl.constexpr, INV_SQRT_G: tl.constexpr, KRON: tl.constexpr, ACT: tl.constexpr,
                    FAST_ACT: tl.constexpr, FINITE_STORE: tl.constexpr, CODES_ONLY: tl.constexpr):
    """The second pass over rows ``[p | act(g)]``: every tile's codes by ``_glu_store`` (CODES_ONLY: by
    ``_store_codes``, the caller knows the rows are all finite, so the loops hold no branch)."""
    for k0 in range(0, P, BLOCK_K):
        v = _prefix_tile(p_ptr, rows, row_ok, k0 + cols, P, stride_pm)
        v = _maybe_rotate(v, h_ptr, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON)
        _glu_store(v, inv, finite, rows, row_ok, k0 + cols, P, q_ptr, stride_qm, FAST_ROUND, FINITE_STORE, CODES_ONLY)
    for k0 in range(0, F, BLOCK_K):
        v = _glu_tile(g_ptr, u_ptr, rows, row_ok, k0 + cols, F, stride_gm, stride_um, ACT, FAST_ACT)
        v = _maybe_rotate(v, h_ptr, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON)
        _glu_store(v, inv, finite, rows, row_ok, k0 + cols, F, q_ptr + P, stride_qm, FAST_ROUND, FINITE_STORE,
                   CODES_ONLY)


@triton.jit
def _glu_store(v, inv, finite, rows, row_ok, cols, K, q_ptr, stride_qm, FAST_ROUND: tl.constexpr,
               FINITE_STORE: tl.constexpr, CODES_ONLY: tl.constexpr = False):
    """One tile's codes: ``_store_codes`` with CODES_ONLY, or where ``finite`` (every row of the tile finite,
    FINITE_STORE); else ``_quantize_store``."""
    if CODES_ONLY:
        _store_codes(v, inv, rows, row_ok, cols, K, q_ptr, stride_qm, FAST_ROUND)
    elif FINITE_STORE:
        if finite:
            _store_codes(v, inv, rows, row_ok, cols, K, q_ptr, stride_qm, FAST_ROUND)
        else:
            _quantize_store(v, inv, 0, rows, row_ok, cols, K, q_ptr, stride_qm, False, FAST_ROUND)
    else:
        _quantize_store(v, inv, 0, rows, row_ok, cols, K, q_ptr, stride_qm, False, FAST_ROUND)


@triton.jit
def _norm_rope_store(src, w_ptr, f00, f01, f10, f11, dst, s_ok, r, BLOCK_S: tl.constexpr, D: tl.constexpr, eps,
                     ROW_NORM: tl.constexpr):
    """RMSNorm (weight w) then rotate pairs (2i, 2i+1) by the 2x2 matrices f; store to dst rows.

    The norm is over this head's D values, or (ROW_NORM) over the token's whole q or k row, whose reciprocal
    RMS ``r`` [BLOCK_S] the caller computed. Rows are read and written whole (coalesced); the pairs are
    separated in registers (reshape + split).
    """
    d = tl.arange(0, D)
    x = tl.load(src + d[None, :], mask=s_ok[:, None], other=0.0).to(tl.float32)
    if not ROW_NORM:
        r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=1) / D + eps)
    y = x * r[:, None] * tl.load(w_ptr + d).to(tl.float32)[None, :]
    y0, y1 = tl.split(tl.reshape(y, (BLOCK_S, D // 2, 2)))
    o = tl.join(f00 * y0 + f01 * y1, f10 * y0 + f11 * y1)
    tl.store(dst + d[None, :], tl.reshape(o, (BLOCK_S, D)).to(dst.dtype.element_ty), mask=s_ok[:, None])


@triton.jit
def _row_rstd(src, s_ok, H, BLOCK_S: tl.constexpr, D: tl.constexpr, eps):
    """Reciprocal RMS of BLOCK_S whole rows of H * D values (one head's D columns at a time)."""
    d = tl.arange(0, D)
    acc = tl.zeros((BLOCK_S,), tl.float32)
    for h in range(0, H):
        x = tl.load(src + h * D + d[None, :], mask=s_ok[:, None], other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    return 1.0 / tl.sqrt_rn(acc / (H * D) + eps)


@triton.jit
def _qk_norm_rope_kernel(
    xq_ptr, xk_ptr, xv_ptr, qw_ptr, kw_ptr, pe_ptr, q_ptr, k_ptr, v_ptr,
    S, H, seq_off, stride_sb, stride_ss, stride_pb, stride_ps, stride_ob, stride_oh, stride_os, eps_q, eps_k,
    BLOCK_S: tl.constexpr, D: tl.constexpr, ROW_NORM: tl.constexpr, COPY_V: tl.constexpr = True,
):
    """BLOCK_S tokens of the q/k/v projections ``x* [B, S, H * D]`` (equal strides): q, k <- rope(rms_norm(.))
    and v copied (unless COPY_V is False: v is its projection's own view), into ``[B, H, seq_off + S, D]``
    outputs. q and k may be their projections' own views (in place): each program reads a tile before it writes
    the same tile, and no other program touches it.

    Per-head norms (weights [D]: FLUX, Qwen-Image, Z-Image): one program per (batch, head). ROW_NORM (weights
    [H * D], RMS over the whole q or k row: Wan): one program per batch entry, looping over the heads after a
    first pass for the row's RMS (the second read comes from L1/L2). ``pe [Bp, seq_off + S, D/2, 2, 2]``
    (float32, or the model's dtype: converted here) holds each pair's rotation matrix (ComfyUI's layout).
    """
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s < S
    if ROW_NORM:
        b = pid_bh
        h0 = 0
        h1 = H
    else:
        b = pid_bh // H
        h0 = pid_bh % H
        h1 = h0 + 1
    tok = b.to(tl.int64) * stride_sb + s.to(tl.int64)[:, None] * stride_ss
    j = tl.arange(0, 2 * D)  # D/2 pairs x 4 matrix entries, contiguous
    pe = tl.load(pe_ptr + b.to(tl.int64) * stride_pb + (seq_off + s).to(tl.int64)[:, None] * stride_ps + j[None, :],
                 mask=s_ok[:, None], other=0.0).to(tl.float32)
    f0, f1 = tl.split(tl.reshape(pe, (BLOCK_S, D // 2, 2, 2)))  # f[..., j, c]: split on c
    f00, f10 = tl.split(f0)
    f01, f11 = tl.split(f1)
    rq = tl.zeros((BLOCK_S,), tl.float32)
    rk = tl.zeros((BLOCK_S,), tl.float32)
    if ROW_NORM:
        rq = _row_rstd(xq_ptr + tok, s_ok, H, BLOCK_S, D, eps_q)
        rk = _row_rstd(xk_ptr + tok, s_ok, H, BLOCK_S, D, eps_k)
    d = tl.arange(0, D)
    for h in range(h0, h1):
        h64 = tl.full((), 0, tl.int64) + h  # the loop variable is a Python int under the interpreter
        row = tok + h64 * D
        if ROW_NORM:  # the weights span the row: this head's D of them
            w_off = h64 * D
        else:
            w_off = h64 * 0
        out = b.to(tl.int64) * stride_ob + h64 * stride_oh + (seq_off + s).to(tl.int64)[:, None] * stride_os
        _norm_rope_store(xq_ptr + row, qw_ptr + w_off, f00, f01, f10, f11, q_ptr + out, s_ok, rq, BLOCK_S, D, eps_q,
                         ROW_NORM)
        _norm_rope_store(xk_ptr + row, kw_ptr + w_off, f00, f01, f10, f11, k_ptr + out, s_ok, rk, BLOCK_S, D, eps_k,
                         ROW_NORM)
        if COPY_V:
            v = tl.load(xv_ptr + row + d[None, :], mask=s_ok[:, None], other=0.0)
            tl.store(v_ptr + out + d[None, :], v, mask=s_ok[:, None])


@triton.jit
def _gate_add_part(x_ptr, y, rstd, w_ptr, gate_ptr, out_ptr, rows, row_ok, cols, N, rows_per_batch, stride_xm,
                   stride_gb, stride_om):
    """out = x + gate[b] * (y * rstd) * w for one row part, stored in out's dtype; returns the stored values in
    float32 (0 outside the tensor), what a kernel reading ``out`` back would see."""
    x = _load_part(x_ptr, rows, row_ok, cols, N, stride_xm).to(tl.float32)
    return _gate_add_values(x, y, rstd, w_ptr, gate_ptr, out_ptr, rows, row_ok, cols, N, rows_per_batch, stride_gb,
                            stride_om)


@triton.jit
def _gate_add_values(x, y, rstd, w_ptr, gate_ptr, out_ptr, rows, row_ok, cols, N, rows_per_batch, stride_gb,
                     stride_om):
    """``_gate_add_part`` on x already loaded (float32)."""
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + (rows // rows_per_batch).to(tl.int64)[:, None] * stride_gb + cols[None, :], mask=ok,
                other=0.0).to(tl.float32)
    out = (x + g * ((y * rstd[:, None]) * w[None, :])).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], out, mask=ok)
    return tl.where(ok, out.to(tl.float32), 0.0)


@triton.jit
def _norm_gate_add_kernel(
    x_ptr, y_ptr, w_ptr, gate_ptr, out_ptr,
    M, N, rows_per_batch, stride_xm, stride_ym, stride_gb, stride_om, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, PREFETCH: tl.constexpr,
):
    """out = x + gate[b] * RMSNorm(y) * w, b = row // rows_per_batch: a post-normalized sublayer output added to
    the residual stream through its gate (Z-Image's attention_norm2 / ffn_norm2), float32, rounded once.

    y's rows are held as one tile (N <= BLOCK_N) or two parts (BLOCK_N2 > 0, as in ``_norm_mod_quant_kernel``);
    PREFETCH: each program loads its next tile of y before it finishes the current one (persistent grid)."""
    ca = tl.arange(0, BLOCK_N)
    step = tl.num_programs(0)
    if BLOCK_N2 > 0:
        cb = BLOCK_N + tl.arange(0, BLOCK_N2)
    if PREFETCH:
        first = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        ya_next = _load_part(y_ptr, first, first < M, ca, N, stride_ym)
        if BLOCK_N2 > 0:
            yb_next = _load_part(y_ptr, first, first < M, cb, N, stride_ym)
    for rb in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), step):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        if PREFETCH:
            after = rows + step * BLOCK_M
            ya = ya_next.to(tl.float32)
            ya_next = _load_part(y_ptr, after, after < M, ca, N, stride_ym)
            if BLOCK_N2 > 0:
                yb = yb_next.to(tl.float32)
                yb_next = _load_part(y_ptr, after, after < M, cb, N, stride_ym)
        else:
            ya = _load_part(y_ptr, rows, row_ok, ca, N, stride_ym).to(tl.float32)
            if BLOCK_N2 > 0:
                yb = _load_part(y_ptr, rows, row_ok, cb, N, stride_ym).to(tl.float32)
        rstd = _rms_rstd(ya, yb if BLOCK_N2 > 0 else ya, N, eps, BLOCK_M, BLOCK_N2)
        _gate_add_part(x_ptr, ya, rstd, w_ptr, gate_ptr, out_ptr, rows, row_ok, ca, N, rows_per_batch, stride_xm,
                       stride_gb, stride_om)
        if BLOCK_N2 > 0:
            _gate_add_part(x_ptr, yb, rstd, w_ptr, gate_ptr, out_ptr, rows, row_ok, cb, N, rows_per_batch,
                           stride_xm, stride_gb, stride_om)


@triton.jit
def _gate_add_norm_quant_kernel(
    x_ptr, y_ptr, wpost_ptr, gate_ptr, out_ptr, mscale_ptr, w_ptr, q_ptr, scale_ptr, h_ptr,
    M, K, rows_per_batch, stride_xm, stride_ym, stride_gb, stride_om, stride_mb, stride_qm, eps_post, eps,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K2: tl.constexpr, PREFETCH: tl.constexpr,
    FAST_ROUND: tl.constexpr, GROUP: tl.constexpr, INV_SQRT_G: tl.constexpr, KRON: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, LEAN: tl.constexpr = False, EVEN: tl.constexpr = False,
):
    """``_norm_gate_add_kernel`` then ``_norm_mod_quant_kernel`` (RMS, no shift) on the row it just wrote:

        out = x + gate[b] * RMSNorm(y) * wpost            (stored in out's dtype)
        q, scale = quant(rot(RMSNorm(out) (* w) * (1 + mscale[b])))

    with the second norm taken over the stored (rounded) ``out``, as the two kernels in turn would see it: Z-Image's
    attention sublayer closing (attention_norm2 and the gated residual add) and its feed-forward sublayer opening
    (ffn_norm1, modulation, quantization for w1/w3). One read of x and y, no read of out. Rows as in
    ``_norm_mod_quant_kernel`` (one tile of BLOCK_K columns, or two parts with BLOCK_K2 > 0), programs stepping
    through the row tiles; PREFETCH (a persistent grid): each program loads its next tile's x and y before it
    reduces and stores the current one. LEAN and EVEN as in ``_norm_mod_quant_kernel``.
    """
    ca = tl.arange(0, BLOCK_K)
    step = tl.num_programs(0)
    cb = ca  # the second part's columns (BLOCK_K2 > 0); unused otherwise
    if BLOCK_K2 > 0:
        cb = BLOCK_K + tl.arange(0, BLOCK_K2)
    if PREFETCH:
        first = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        ya_next = _load_part(y_ptr, first, first < M, ca, K, stride_ym)
        xa_next = _load_part(x_ptr, first, first < M, ca, K, stride_xm)
        if BLOCK_K2 > 0:
            yb_next = _load_part(y_ptr, first, first < M, cb, K, stride_ym)
            xb_next = _load_part(x_ptr, first, first < M, cb, K, stride_xm)
    for rb in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), step):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        if PREFETCH:
            after = rows + step * BLOCK_M
            ya = ya_next.to(tl.float32)
            xa = xa_next.to(tl.float32)
            ya_next = _load_part(y_ptr, after, after < M, ca, K, stride_ym)
            xa_next = _load_part(x_ptr, after, after < M, ca, K, stride_xm)
            if BLOCK_K2 > 0:
                yb = yb_next.to(tl.float32)
                xb = xb_next.to(tl.float32)
                yb_next = _load_part(y_ptr, after, after < M, cb, K, stride_ym)
                xb_next = _load_part(x_ptr, after, after < M, cb, K, stride_xm)
        else:
            ya = _load_part(y_ptr, rows, row_ok, ca, K, stride_ym).to(tl.float32)
            xa = _load_part(x_ptr, rows, row_ok, ca, K, stride_xm).to(tl.float32)
            if BLOCK_K2 > 0:
                yb = _load_part(y_ptr, rows, row_ok, cb, K, stride_ym).to(tl.float32)
                xb = _load_part(x_ptr, rows, row_ok, cb, K, stride_xm).to(tl.float32)
        rstd = _rms_rstd(ya, yb if BLOCK_K2 > 0 else ya, K, eps_post, BLOCK_M, BLOCK_K2)
        xa = _gate_add_values(xa, ya, rstd, wpost_ptr, gate_ptr, out_ptr, rows, row_ok, ca, K, rows_per_batch,
                              stride_gb, stride_om)
        if BLOCK_K2 > 0:
            xb = _gate_add_values(xb, yb, rstd, wpost_ptr, gate_ptr, out_ptr, rows, row_ok, cb, K, rows_per_batch,
                                  stride_gb, stride_om)
        rstd = _rms_rstd(xa, xb if BLOCK_K2 > 0 else xa, K, eps, BLOCK_M, BLOCK_K2)
        ha = _modulate_part(xa, rstd, rows, row_ok, ca, K, mscale_ptr, mscale_ptr, w_ptr, h_ptr, rows_per_batch,
                            stride_mb, BLOCK_M, BLOCK_K, GROUP, INV_SQRT_G, KRON, HAS_WEIGHT, False, EVEN)
        hb = ha
        if BLOCK_K2 > 0:
            hb = _modulate_part(xb, rstd, rows, row_ok, cb, K, mscale_ptr, mscale_ptr, w_ptr, h_ptr, rows_per_batch,
                                stride_mb, BLOCK_M, BLOCK_K2, GROUP, INV_SQRT_G, KRON, HAS_WEIGHT, False, EVEN)
        _quantize_parts(ha, hb, rows, row_ok, ca, cb, K, scale_ptr, q_ptr, stride_qm, BLOCK_M, BLOCK_K2, FAST_ROUND,
                        LEAN)


# A specialization Triton rejects for resources (OutOfResources when it is first loaded) takes the next
# smaller tile where the kernel has one (``launch.first_fit``, the rule the GEMM and the row quantizer share),
# else raises TileTooLargeError and ``fused.py`` runs the torch twin for that call. The rotation's dot operands
# take most of it: e.g. float32 rows with group 128 need 196,608 bytes in the norm quantizer and 167,936 in the
# GLU quantizer at 4096 columns (sm_90 allows 232,448, sm_80 166,912, sm_86/89/120 101,376; bench/NOTES.md
# items 15 and 16).
_TWIN = "these rows are quantized by the torch twin"

_NORM_MOD_QUANT = FastLauncher(_norm_mod_quant_kernel, interpreting())
_GLU_QUANT = FastLauncher(_glu_quant_kernel, interpreting())
_QK_NORM_ROPE = FastLauncher(_qk_norm_rope_kernel, interpreting())
_NORM_GATE_ADD = FastLauncher(_norm_gate_add_kernel, interpreting())
_GATE_ADD_NORM_QUANT = FastLauncher(_gate_add_norm_quant_kernel, interpreting())

# Rows of up to this many features are normalized in one tile (FLUX.2 klein: 3072 and 4096).
NORM_MAX_K = 16384
@dataclasses.dataclass(frozen=True)
class GluLaunch:
    """How ``glu_quantize`` launches ``_glu_quant_kernel``: ``block_k`` columns per tile, ``warps`` per
    program, a persistent grid of ``programs_per_sm`` programs per SM (capped at one per row) and, when
    ``l2_bytes`` > 0, at most ``l2_bytes // row bytes`` programs (rows in flight whose first read the second
    pass finds in L2); ``fast_act`` / ``lane_stats`` / ``finite_store``: the kernel's FAST_ACT / LANE_STATS /
    FINITE_STORE; ``split_store``: SPLIT_STORE; ``max_stats``: its MAX_STATS where it applies (GELU-tanh, no rotation;
    elsewhere the variant's other statistics)."""

    block_k: int = 4096
    warps: int = 8
    programs_per_sm: int = 32
    l2_bytes: int = 0
    fast_act: bool = False
    lane_stats: bool = False
    finite_store: bool = False
    split_store: bool = False
    max_stats: bool = False

    def programs(self, m: int, row_bytes: int, sms: int) -> int:
        """The grid for ``m`` rows of ``row_bytes`` input bytes each on ``sms`` SMs."""
        n = self.programs_per_sm * sms
        if self.l2_bytes:
            n = min(n, max(sms, self.l2_bytes // max(row_bytes, 1)))
        return max(1, min(m, n))


# ``glu_quantize``'s launch variants, all giving the same codes and scales (tests/test_fused.py), timed at the
# real shapes by bench/bench_fused.py (``GLU_RULE`` is the one used). "base": the kernel as measured in a real
# step (bench_blocks.py, warm L2 after the GEMM writing its input, H200, 9B widths): 4096 / 8 / 32 per SM (about
# a row per program) 273 us per double + single block, 16 per SM 282, 4 per SM 323, 8192-column tiles 374;
# rejected: a one-pass kernel holding each row in registers (415 us: 125 registers x 512 threads leave one row
# per SM in flight). Compiled for sm_90 it issues ~59 instructions per output value (30 a pass: the sigmoid's
# range fix-ups ~12, per-tile reductions with 6 barriers), which at 4 warp-instructions per SM-clock is ~85 us
# for Z-Image's [4608, 2 x 10240] against ~60 us of HBM traffic: issue-bound. "lean" issues ~30 (12 + 18;
# ``_times_sigmoid``, ``_glu_lane_stats``) with the same 40 registers and 16-byte loads; "-l2" caps the rows in
# flight at what L2 holds for the second pass, "-w4" takes 2048-column tiles of 4 warps, "-fs" stores the codes of
# finite rows without the clamp and select (FINITE_STORE; bench/NOTES.md item 77). "-ss": that store and the general
# one in separate loops (SPLIT_STORE; offline sm_90, GELU at 2048-column tiles: 15.7 instructions a value in the second
# pass instead of 20.9, whose loop held both stores); "-mx": GELU-tanh's statistics from each row's largest input
# (MAX_STATS): the first pass without the activation, whose two MUFU operations a value per pass made the GELU rows
# MUFU-bound (4.6 instructions a value instead of 14.6). Both bench/NOTES.md item 81; not yet timed on a GPU.
GLU_VARIANTS = {
    "base": GluLaunch(),
    "lean": GluLaunch(fast_act=True, lane_stats=True),
    "lean-l2": GluLaunch(fast_act=True, lane_stats=True, l2_bytes=24 << 20),
    "lean-w4": GluLaunch(block_k=2048, warps=4, fast_act=True, lane_stats=True),
    "lean-w4-l2": GluLaunch(block_k=2048, warps=4, fast_act=True, lane_stats=True, l2_bytes=24 << 20),
    "lean-fs": GluLaunch(fast_act=True, lane_stats=True, finite_store=True),
    "lean-w4-fs": GluLaunch(block_k=2048, warps=4, fast_act=True, lane_stats=True, finite_store=True),
    "lean-fs-ss": GluLaunch(fast_act=True, lane_stats=True, finite_store=True, split_store=True),
    "lean-w4-fs-ss": GluLaunch(block_k=2048, warps=4, fast_act=True, lane_stats=True, finite_store=True,
                               split_store=True),
    "lean-fs-ss-mx": GluLaunch(fast_act=True, lane_stats=True, finite_store=True, split_store=True, max_stats=True),
    "lean-w4-fs-ss-mx": GluLaunch(block_k=2048, warps=4, fast_act=True, lane_stats=True, finite_store=True,
                                  split_store=True, max_stats=True),
    "fast-act": GluLaunch(fast_act=True),
    "lane-stats": GluLaunch(lane_stats=True),
}
# The variant each activation takes. H200, session 23 (`bench_fused`, CUDA graphs): SwiGLU "lean-fs" 88.9 / 105.5 /
# 84.0 us at Z-Image's pair / FLUX.2's single / double block shapes ("lean" 91.6 / 127.2 / 92.2); GELU-tanh, which
# reads half the bytes a value, "lean-w4-fs" 79.0 / 303.3 us at Chroma's / Wan's ("lean" 80.0 / 343.6). Session 25
# (item 86): GELU-tanh's statistics from each row's largest input ("-mx") and the split store: "lean-w4-fs-ss-mx" 59.6 /
# 84.0 / 228.3 us at Chroma's and Qwen-Image's MLP, Chroma's single block and Wan's ("lean-w4-fs" 79.0 / 100.2 / 303.4),
# the same codes and scales as "base" on the GPU; SwiGLU's "-ss" / "-mx" forms were not faster (90.2 vs 84.0 us).
# "identity" (rows the SwiGLU GEMM activated) reads one column a value, as GELU does, without its activation: the
# GELU rule's tiles and stores (its "-mx" statistics are GELU's only); not timed on a GPU yet.
GLU_RULE: dict[str, str] = {"swiglu": "lean-fs", "gelu_tanh": "lean-w4-fs-ss-mx", "identity": "lean-w4-fs-ss"}


# Programs of one whole-row kernel specialization an SM holds at once, by launch key (``_resident``).
_RESIDENT: dict[tuple, int] = {}


def _resident(launcher: FastLauncher, key: tuple, args: tuple, kwargs: dict) -> int:
    """How many programs of this specialization fit on one SM together (registers, threads, shared memory), read
    from its compiled kernel (compiled here, as the launch would; OutOfResources propagates as from the launch);
    0 where unknown (the interpreter, an offline build)."""
    if key in _RESIDENT:
        return _RESIDENT[key]
    found = 0
    if getattr(launcher, "enabled", False):  # a FastLauncher on a GPU (a test's stand-in launcher has none)
        kernel = launcher.fn.warmup(*args, grid=(1,), **kwargs)
        if kernel is not None:
            kernel._init_handles()
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            warps = kwargs["num_warps"]
            regs_per_warp = triton.cdiv(max(kernel.n_regs, 1) * 32, 256) * 256  # allocated per warp, in 256s
            by_regs = getattr(props, "regs_per_multiprocessor", 65536) // regs_per_warp // warps
            by_threads = props.max_threads_per_multi_processor // (32 * warps)
            smem = kernel.metadata.shared
            by_smem = props.shared_memory_per_multiprocessor // (smem + 1024) if smem else by_threads
            found = max(1, min(by_regs, by_threads, by_smem, 32))
    _RESIDENT[key] = found
    return found


def _launch_rows(launcher: FastLauncher, key: tuple, form: norm_configs.RowLaunch, blocks: int, device,
                 *args, fallback: str = _TWIN, **kwargs) -> None:
    """Launch a whole-row kernel: one program per tile of rows, or (``form.programs_per_sm``) a persistent grid
    of at most that many programs per SM and no more than fit on it at once (a program that waits for a free SM
    would run all its tiles late); under the shared resource rule (``launch.first_fit``: TileTooLargeError when
    nothing fits)."""

    def launch(_) -> None:
        grid = blocks
        if form.programs_per_sm:
            per_sm = _resident(launcher, key, args, kwargs) or form.programs_per_sm
            grid = min(blocks, min(per_sm, form.programs_per_sm) * num_sms(device))
        launcher((grid,), *args, **kwargs)

    first_fit(key[0], key[1:], (), no_smaller, launch, fallback)


def norm_modulate_quantize(x2, shift, mscale, rows_per_batch: int, eps: float, rotate_group: int = 0,
                           norm: str = "layer", weight=None, form: norm_configs.RowLaunch | None = None):
    """x2 [M, K] (unit column stride), shift (or None) / mscale [B, K] (unit column stride, equal strides) ->
    q [M, K] int8, scale [M]. ``norm``: "layer" (no affine) or "rms"; ``weight`` [K] or None.

    ``rotate_group``: ConvRot group (K % group == 0) applied before quantizing, or 0. ``form``: the launch
    (``norm_configs.RowLaunch``; None: ``NORM_MOD_QUANT_RULE``'s). Raises TileTooLargeError when the tile does
    not fit the GPU's shared memory."""
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    scale = row_scales(m, k, x2.device)
    if m == 0 or k == 0:
        return q, scale
    form = form or norm_configs.pick(norm_configs.NORM_MOD_QUANT_RULE, k)
    block_m, block_k, block_k2, warps = norm_configs.tile_shape(form, k, max(16, rotate_group),
                                                                rotation_min_tile(rotate_group))
    even = k == block_k + block_k2  # the kernel's EVEN: no padding columns
    h, rot = rotation_args(rotate_group, x2.device, torch.float32)
    keep(h)  # cached per group and device: a recorded launch may keep its address (direct.Replayer)
    key = ("norm_modulate_quantize", x2.dtype, mscale.dtype, block_m, block_k, block_k2, warps,
           form.programs_per_sm > 0, rotate_group, norm, None if weight is None else weight.dtype, shift is not None,
           form.lean, even, x2.device)
    _launch_rows(
        _NORM_MOD_QUANT, key, form, triton.cdiv(m, block_m), x2.device, x2,
        shift if shift is not None else mscale, mscale, weight if weight is not None else mscale, q, scale,
        h if h is not None else q, m, k, rows_per_batch, x2.stride(0), mscale.stride(0), q.stride(0), float(eps),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_K2=block_k2, PREFETCH=form.programs_per_sm > 0,
        FAST_ROUND=not interpreting(), **rot, RMS=norm == "rms", HAS_WEIGHT=weight is not None,
        HAS_SHIFT=shift is not None, LEAN=form.lean, EVEN=even, num_warps=warps,
        enable_fp_fusion=False,
    )
    return q, scale


def glu_quantize(prefix, glu, f: int, block_k: int = 0, warps: int = 0, rows_in_flight: int = 0,
                 rotate_group: int = 0, activation: str = "swiglu", up=None, variant: str | GluLaunch = ""):
    """prefix [M, P] or None, glu [M, 2F] (SwiGLU) or [M, F] (GELU-tanh, or SwiGLU's gate with ``up`` [M, F]
    its up projection), unit column strides -> q [M, P + F] int8, scale [M]; ``activation`` one of
    ``ACT_CODES``.

    ``rotate_group``: ConvRot group (P and F multiples of it) applied before quantizing, or 0. Raises
    TileTooLargeError when the tile does not fit the GPU's shared memory.
    ``variant``: a ``GLU_VARIANTS`` name or a ``GluLaunch`` ("": ``GLU_RULE``'s for the activation); ``block_k``,
    ``warps``, ``rows_in_flight``: overrides of it for benchmarks (0: the variant's)."""
    m = glu.shape[0]
    p = 0 if prefix is None else prefix.shape[1]
    q = torch.empty((m, p + f), dtype=torch.int8, device=glu.device)
    scale = row_scales(m, p + f, glu.device)
    if m == 0 or p + f == 0:
        return q, scale
    rule = variant if isinstance(variant, GluLaunch) else GLU_VARIANTS[variant or GLU_RULE[activation]]
    block_k = block_k or min(max(16, triton.next_power_of_2(max(p, f))), rule.block_k)
    block_k = max(block_k, rotation_min_tile(rotate_group))  # one row per program: the tile holds the groups
    block_m = 1
    h, rot = rotation_args(rotate_group, glu.device, torch.float32)
    keep(h)
    row_bytes = (p * (prefix.element_size() if prefix is not None else 0)
                 + f * glu.element_size() * (2 if activation == "swiglu" else 1))
    blocks = min(m, rows_in_flight) if rows_in_flight else rule.programs(m, row_bytes, num_sms(glu.device))
    pre = prefix if prefix is not None else glu
    u = up if up is not None else glu[:, f:] if activation == "swiglu" else glu
    fast = not interpreting()  # inline PTX: the interpreter takes the plain forms

    def launch(tile: tuple[int, int]) -> None:
        _GLU_QUANT(
            (blocks,), pre, glu, u, q, scale, h if h is not None else q, m, p, f, pre.stride(0), glu.stride(0),
            u.stride(0), q.stride(0), BLOCK_M=tile[0], BLOCK_K=tile[1], FAST_ROUND=fast, **rot,
            ACT=ACT_CODES[activation], FAST_ACT=rule.fast_act and fast, LANE_STATS=rule.lane_stats,
            FINITE_STORE=rule.finite_store,
            MAX_STATS=rule.max_stats and activation == "gelu_tanh" and not rotate_group,
            SPLIT_STORE=rule.split_store,
            num_warps=warps or rule.warps, enable_fp_fusion=False,
        )

    # the one fused kernel with a smaller tile: fewer columns per tile (down to what the rotation needs)
    first_fit("glu_quantize", (glu.dtype, rotate_group, activation, rule, glu.device), (block_m, block_k),
              smaller_tile(rotate_group), launch, _TWIN)
    return q, scale


def qk_norm_rope(xq, xk, xv, q_weight, k_weight, pe, q, k, v, seq_off: int, heads: int, eps_q: float,
                 eps_k: float, row_norm: bool = False):
    """xq, xk, xv [B, S, H*D] (unit last stride, equal strides) -> q, k, v [B, H, S_total, D] at ``seq_off``;
    pe [Bp, 1, S_total, D/2, 2, 2] float (each position's D/2 x 2 x 2 entries contiguous); ``row_norm``: q/k
    RMS over the whole row (weights [H*D]) instead of per head (weights [D]). q/k/v may be their projections'
    own per-head views (``reference_fused.heads_view_of``: in place, v not copied)."""
    bsz, s, width = xq.shape
    d = width // heads
    if bsz == 0 or s == 0:
        return
    block_s = 16
    stride_pb = 0 if pe.shape[0] == 1 else pe.stride(0)
    _QK_NORM_ROPE(
        (triton.cdiv(s, block_s), bsz if row_norm else bsz * heads), xq, xk, xv, q_weight, k_weight, pe, q, k, v,
        s, heads, seq_off, xq.stride(0), xq.stride(1), stride_pb, pe.stride(2), q.stride(0), q.stride(1),
        q.stride(2), float(eps_q), float(eps_k), BLOCK_S=block_s, D=d, ROW_NORM=row_norm,
        COPY_V=not heads_view_of(v, xv, heads), num_warps=4, enable_fp_fusion=False,
    )


def rms_norm_gate_add(x2, y2, weight, gate, rows_per_batch: int, eps: float,
                      form: norm_configs.RowLaunch | None = None):
    """x2 [M, N], y2 [M, N] (unit column strides), weight [N], gate [B, N] (unit column stride) -> new [M, N] in
    x2's dtype: ``x2 + gate[b] * rms_norm(y2) * weight``. ``form``: the launch (None: ``NORM_GATE_ADD_RULE``'s)."""
    m, n = x2.shape
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 0 or n == 0:
        return out
    form = form or norm_configs.pick(norm_configs.NORM_GATE_ADD_RULE, n)
    block_m, block_n, block_n2, warps = norm_configs.tile_shape(form, n)
    key = ("rms_norm_gate_add", x2.dtype, y2.dtype, weight.dtype, gate.dtype, block_m, block_n, block_n2, warps,
           form.programs_per_sm > 0, x2.device)
    _launch_rows(
        _NORM_GATE_ADD, key, form, triton.cdiv(m, block_m), x2.device, x2, y2, weight, gate, out, m, n,
        rows_per_batch, x2.stride(0), y2.stride(0), gate.stride(0), out.stride(0), float(eps), BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_N2=block_n2, PREFETCH=form.programs_per_sm > 0, num_warps=warps, enable_fp_fusion=False,
    )
    return out


def rms_norm_gate_add_quantize(x2, y2, post_weight, gate, mscale, rows_per_batch: int, eps_post: float, eps: float,
                               rotate_group: int = 0, weight=None, form: norm_configs.RowLaunch | None = None):
    """x2, y2 [M, K] (unit column strides), post_weight [K], gate / mscale [B, K] (unit column strides), weight [K]
    or None -> (out [M, K] in x2's dtype, q [M, K] int8, scale [M]): ``rms_norm_gate_add`` and then
    ``norm_modulate_quantize(out, None, mscale, norm="rms", weight=weight)`` in one pass
    (``_gate_add_norm_quant_kernel``). ``form``: the launch (None: ``GATE_ADD_NORM_QUANT_RULE``'s). Raises
    TileTooLargeError when the tile does not fit the GPU's shared memory (e.g. ConvRot group 256 at 3840 columns
    on a 99-KB GPU: ``fused.py`` then runs the two kernels in turn)."""
    m, k = x2.shape
    out = torch.empty((m, k), dtype=x2.dtype, device=x2.device)
    q = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    scale = row_scales(m, k, x2.device)
    if m == 0 or k == 0:
        return out, q, scale
    form = form or norm_configs.pick(norm_configs.GATE_ADD_NORM_QUANT_RULE, k)
    block_m, block_k, block_k2, warps = norm_configs.tile_shape(form, k, max(16, rotate_group),
                                                                rotation_min_tile(rotate_group))
    even = k == block_k + block_k2  # the kernel's EVEN: no padding columns
    h, rot = rotation_args(rotate_group, x2.device, torch.float32)
    keep(h)  # cached per group and device: a recorded launch may keep its address (direct.Replayer)
    key = ("rms_norm_gate_add_quantize", x2.dtype, y2.dtype, post_weight.dtype, gate.dtype, mscale.dtype, block_m,
           block_k, block_k2, warps, form.programs_per_sm > 0, rotate_group,
           None if weight is None else weight.dtype, form.lean, even, x2.device)
    _launch_rows(
        _GATE_ADD_NORM_QUANT, key, form, triton.cdiv(m, block_m), x2.device, x2, y2, post_weight, gate, out, mscale,
        weight if weight is not None else mscale, q, scale, h if h is not None else q, m, k, rows_per_batch,
        x2.stride(0), y2.stride(0), gate.stride(0), out.stride(0), mscale.stride(0), q.stride(0), float(eps_post),
        float(eps), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_K2=block_k2, PREFETCH=form.programs_per_sm > 0,
        FAST_ROUND=not interpreting(), **rot, HAS_WEIGHT=weight is not None, LEAN=form.lean,
        EVEN=even, num_warps=warps, enable_fp_fusion=False,
        fallback="rms_norm_gate_add and norm_modulate_quantize run in turn",
    )
    return out, q, scale
