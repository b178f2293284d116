"""Triton 8-bit attention for Hopper: INT8 Q K^T and a 16-bit or 8-bit P V on wgmma, with its quantization pass.

Four quantization kernels read the bf16/fp16 inputs (any strides) and write the formats of
``reference_attention.QuantizedQKV`` (numerics there; the configuration in ``attention_configs.py``):

* ``_kv_stats_kernel``: per (head, chunk of keys) the column sums of K and the channel absmax of V, a plain
  streaming reduction (the rotation is linear, so the sum is rotated once afterwards, not every key);
* ``_kv_finalize_kernel``: per head the chunks reduced in a fixed order: the mean of the rotated keys and the V
  scale, so the blocks of the next kernel read two vectors instead of reducing every chunk themselves;
* ``_quant_q_kernel``: Q rows -> int8 + one scale per token;
* ``_quant_kv_kernel``: one block of ``block_n`` keys per program: K minus the mean -> int8 + one scale,
  V -> int8 or e4m3 with the per-channel scale, written transposed (wgmma reads 8-bit B operands K-major),
  plus the block's int8 column sums of V.

With ``pv = "16bit"`` (the default on Hopper) V is not quantized: the statistics sum K only, the K/V kernel runs its
K half only, and the attention kernel reads V as given through a rank-4 ``[B, H, S, D]`` descriptor.

``_attention_kernel`` is the forward pass of FlashAttention-2 with one program per (query tile, head):
the Q tile stays in shared memory; K and V^T tiles arrive through TMA descriptors in a software-pipelined
loop (``num_stages``); both products run on wgmma (s8 x s8 -> s32 for Q K^T; bf16/f16, s8 or e4m3 for P V); softmax
statistics are float32. A last, partial block of keys is a separate, masked copy of the loop body, so the
full blocks carry no masks. Tiles read past a head's last query or key land in the next head's rows (or
TMA's zero fill at the end of the tensor): those queries are not stored and those keys are masked.

Without ``warp_spec`` each warpgroup waits for its own wgmma, and the CTA barriers the pipeliner places before
reusing a TMA buffer keep a program's warpgroups in step, so softmax overlaps the tensor cores only across
programs (64-row tiles: two or three programs per SM). ``warp_spec`` (128-row tiles at 4 warps) has Triton 3.6's
Hopper pass split a program into a TMA producer warpgroup and two 64-row consumer warpgroups that share each
K/V tile; the consumers still wait for their own wgmma (no ping-pong). Per score the loop issues ~14
instructions for int8 P V, ~10 for e4m3 and ~9 for 16-bit (offline SASS, bench/check_ptx_attention.py), against
1/16 of an SM clock of 8-bit tensor-core work: the ALU, not the tensor cores, bounds this kernel. Switches that
took ALU work out of the int8 loop measured no gain and were removed (bench/NOTES.md items 20 and 23).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .attention_configs import AttentionConfig
from .hadamard import hadamard_pm1_cached
from .launch import FastLauncher, device_descriptors, tma_ok
from .reference_attention import (
    INV_448,
    LOG2E,
    MAX_MARGIN,
    P_FP8_MAX,
    P_INT8_MAX,
    QuantizedQKV,
    padded_kv_len,
)
from .reference_attention import MAGIC_F as _MAGIC_F
from .triton_quant import (
    _INV_127,
    _TINY,
    FLT_MAX,
    _max_nan,
    _quantize_parts,
    _quantize_store,
    _rotate,
    _store_codes,
    _to_int,
    interpreting,
    round_half_even,
)

# 1.5 * 2**23: a float32 in [2**23, 2**24) has unit spacing, so adding x in [0, 2**22) to this constant
# rounds x to an integer held in the low bits of the sum (int8 P).
MAGIC_F = tl.constexpr(_MAGIC_F)
_LOG2_P_INT8 = tl.constexpr(math.log2(P_INT8_MAX))
_LOG2_P_FP8 = tl.constexpr(math.log2(P_FP8_MAX))
_INV_448 = tl.constexpr(INV_448)
_MAX_MARGIN = tl.constexpr(MAX_MARGIN)

QUANT_ROWS = 64  # token rows per tile in the quantization kernels (64 x 128 float32: 64 registers at 4 warps)
QUANT_WARPS = 4
STATS_CHUNKS = 16  # chunks of keys per head in the statistics pass (``_kv_finalize_kernel`` reduces that many rows)
# key rows per tile of the statistics pass: its [32, 128] float32 sums and maxima at 4 warps take 100 registers, five
# programs per SM (offline sm_90): 16 chunks x 40 heads (Wan) run in one wave on 132 SMs
STATS_ROWS = 32
# The Q and K kernels' LEAN forms (the same bits as the general ones, about half the instructions: bench/NOTES.md
# item 80). H200, session 25: the GPU tests bit for bit, and the pass 326.0 -> 275.9 us at Wan's H 40, S 14040,
# 315.2 -> 266.5 at H 32, S 16896, 77.6 -> 68.4 at H 24, S 4608 (general form -> LEAN; item 86).
LEAN_PASS = True


def quant_q_options(lean: bool) -> dict:
    """Launch options of ``_quant_q_kernel``. Its LEAN form is capped at 128 registers: the fast path needs 118
    (776 instructions a 64 x 128 tile offline on sm_90, against 1,496 for the general form), the rare exact branch
    would otherwise set the allocation at 181, and 128 lets four programs share an SM (their 48 KB of shared
    memory allows four) instead of three (bench/NOTES.md item 80)."""
    return {"num_warps": QUANT_WARPS, "maxnreg": 128} if lean else {"num_warps": QUANT_WARPS}


def quant_kv_options(block_n: int, head_dim: int, part: int) -> dict:
    """Launch options of ``_quant_kv_kernel`` for ``PART`` = part (0: K and V, 1: K, 2: V).

    Its float32 K and V tiles hold block_n x D values each (at 4 warps a 128 x 128 tile alone takes 128 registers per
    thread), so a 128 x 128 block of K, or of both in one launch, runs at 8 warps. The split launches stream one
    block each with nothing in flight across blocks, and were timed on the H200 at Wan's shape (bench/NOTES.md item
    64): K capped at 128 registers (174 -> 116 offline, no spills: two blocks per SM instead of one) and V at 4 warps
    (242 registers, 16 16-byte loads per thread) ran the pass fastest; V at 8 warps capped at 64 registers (four
    blocks per SM) was the slowest: the V half is bound by the loads each thread has in flight, not by occupancy.
    """
    warps = 8 if block_n * head_dim >= 128 * 128 else 4
    if part == 2:
        return {"num_warps": 4}
    if part == 1:
        return {"num_warps": warps, "maxnreg": 128}
    return {"num_warps": warps}


# --------------------------------------------------------------------------------------------
# Quantization pass
# --------------------------------------------------------------------------------------------
@triton.jit
def _to_e4m3(x, EMULATE: tl.constexpr):
    """float32 -> float8 e4m3, round to nearest even, saturating at +-448 (``cvt.rn.satfinite`` on the GPU).

    EMULATE (the interpreter, whose conversion truncates and drops the carry into the exponent) rounds to
    the e4m3 grid in float32 first, which its conversion then keeps exactly: 3 mantissa bits for normal
    values, steps of 2**-9 below 2**-6.
    """
    if EMULATE:
        bits = x.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
        small = round_half_even(x * 512.0) * 0.001953125
        x = tl.where(tl.abs(x) < 0.015625, small, normal)
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    return x.to(tl.float8e4nv)


@triton.jit
def _to_16bit(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """float32 x in [0, 1] -> ``dtype`` (bf16 or fp16), round to nearest even (``cvt.rn`` on the GPU).

    EMULATE (the interpreter, whose conversion truncates) rounds to the target's grid in float32 first, which its
    conversion then keeps exactly: 8 significant bits for bf16; 11 for fp16, steps of 2**-24 below 2**-14."""
    if EMULATE:
        bits = x.to(tl.int32, bitcast=True)
        if dtype == tl.bfloat16:
            x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        else:
            normal = ((bits + 0xFFF + ((bits >> 13) & 1)) & -8192).to(tl.float32, bitcast=True)
            small = round_half_even(x * 16777216.0) * 5.9604644775390625e-08
            x = tl.where(x < 6.103515625e-05, small, normal)
    return x.to(dtype)


@triton.jit
def _load_tile(ptr, b, h, rows, row_ok, sb, sh, ss, sd, D: tl.constexpr):
    """A [ROWS, D] tile of a [B, H, S, D] tensor with any strides, float32 (0 outside)."""
    d = tl.arange(0, D)
    base = ptr + b.to(tl.int64) * sb + h.to(tl.int64) * sh
    x = tl.load(base + rows.to(tl.int64)[:, None] * ss + d[None, :] * sd, mask=row_ok[:, None], other=0.0)
    return x


@triton.jit
def _maybe_rotate_qk(x, h_ptr, ROWS: tl.constexpr, D: tl.constexpr, ROT_SCALE: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    """x @ H * ROT_SCALE in float32 (H: the +-1 Hadamard matrix of order D, ROT_SCALE = 1 / sqrt(D); 0: no
    rotation). bf16/fp16 operands times +-1 are exact with float32 sums; DOT_FP32 (the interpreter, whose
    dot cannot multiply bfloat16) rotates in float32 (tf32x3)."""
    if ROT_SCALE > 0:
        y = _rotate(x, h_ptr, ROWS, D, D, ROT_SCALE, False, DOT_FP32, "tf32x3")
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def _kv_stats_kernel(
    k_ptr, v_ptr, ksum_ptr, vmax_ptr,
    S, H, CHUNK, n_chunks, skb, skh, sks, skd, svb, svh, svs, svd,
    D: tl.constexpr, ROWS: tl.constexpr, HAS_V: tl.constexpr = True,
):
    """ksum[bh, c] = column sums of K over chunk c of keys (not rotated: ``_kv_finalize_kernel`` rotates their
    total); vmax[bh, c] = channel absmax of V (NaN where the chunk holds NaN/Inf).

    The tiles are accumulated element-wise in registers ([ROWS, D] sums and maxima) and reduced across rows once at
    the end: a reduction per tile would make every tile wait for a round trip through shared memory. HAS_V False
    (pv "16bit": V is not quantized): K's sums only, nothing read from V or written to vmax."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    ksum = tl.zeros((ROWS, D), tl.float32)
    vmax = tl.zeros((ROWS, D), tl.float32)
    end = tl.minimum(S, (c + 1) * CHUNK)
    for r0 in range(c * CHUNK, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        ok = rows < end
        ksum += _load_tile(k_ptr, b, h, rows, ok, skb, skh, sks, skd, D).to(tl.float32)
        if HAS_V:
            vt = _load_tile(v_ptr, b, h, rows, ok, svb, svh, svs, svd, D).to(tl.float32)
            vmax = tl.maximum(vmax, tl.abs(vt), propagate_nan=tl.PropagateNan.ALL)
    d = tl.arange(0, D)
    out = (bh * n_chunks + c).to(tl.int64) * D + d
    tl.store(ksum_ptr + out, tl.sum(ksum, axis=0))
    if HAS_V:
        # NaN -> Inf before the row reduction (tl.max drops NaN); a non-finite maximum stores NaN
        vmax = tl.max(tl.where(vmax == vmax, vmax, float("inf")), axis=0)
        tl.store(vmax_ptr + out, tl.where(vmax <= FLT_MAX, vmax, float("nan")))


@triton.jit
def _v_scale(vmax, PV_INT8: tl.constexpr):
    """V's per-channel scale from its channel absmax (NaN, for a channel holding NaN/Inf, stays NaN)."""
    if PV_INT8:
        vscale = tl.maximum(vmax * _INV_127, _TINY)
    else:
        vscale = tl.maximum(vmax * _INV_448, _TINY)
    return tl.where(vmax == vmax, vscale, float("nan"))  # NaN survives max()


@triton.jit
def _kv_finalize_kernel(
    ksum_ptr, vmax_ptr, h_ptr, kmean_ptr, vs_ptr, S, n_chunks,
    D: tl.constexpr, ROT_SCALE: tl.constexpr, PV_INT8: tl.constexpr, HAS_V: tl.constexpr = True,
):
    """Per head bh: kmean[bh] = (sum of K) / S, rotated (``(mean @ H) * ROT_SCALE``: the mean of the rotated keys,
    since the rotation is linear; float32 products of the +-1 matrix, exact), and the V scale vs[bh] (NaN for a
    channel holding NaN/Inf), from the chunk partials of ``_kv_stats_kernel`` reduced in chunk order (HAS_V False:
    the mean only)."""
    bh = tl.program_id(0)
    d = tl.arange(0, D)
    ksum = tl.zeros((D,), tl.float32)
    vmax = tl.zeros((D,), tl.float32)
    for c in range(0, n_chunks):
        at = (bh * n_chunks + c).to(tl.int64) * D + d
        ksum += tl.load(ksum_ptr + at)
        if HAS_V:
            vmax = tl.maximum(vmax, tl.load(vmax_ptr + at), propagate_nan=tl.PropagateNan.ALL)
    mean = ksum / S
    if ROT_SCALE > 0:
        hmat = tl.load(h_ptr + d[:, None] * D + d[None, :]).to(tl.float32)
        mean = tl.sum(mean[:, None] * hmat, axis=0) * ROT_SCALE
    tl.store(kmean_ptr + bh * D + d, mean)
    if HAS_V:
        tl.store(vs_ptr + bh * D + d, _v_scale(vmax, PV_INT8))


@triton.jit
def _quant_q_kernel(
    q_ptr, h_ptr, q8_ptr, qs_ptr, S, H, sqb, sqh, sqs, sqd,
    D: tl.constexpr, ROWS: tl.constexpr, ROT_SCALE: tl.constexpr, DOT_FP32: tl.constexpr,
    FAST_ROUND: tl.constexpr, LEAN: tl.constexpr = False,
):
    """Q rows (rotated) -> int8 [BH * S, D] and one float32 scale per row (triton_quant's row rule). LEAN: the
    statistics and store of ``_quantize_parts``' LEAN form (the same scales and codes, fewer instructions)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    s = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = s < S
    x = _maybe_rotate_qk(_load_tile(q_ptr, b, h, s, ok, sqb, sqh, sqs, sqd, D), h_ptr, ROWS, D, ROT_SCALE, DOT_FP32)
    rows = bh.to(tl.int64) * S + s
    d = tl.arange(0, D)
    _quantize_parts(x, x, rows, ok, d, d, D, qs_ptr, q8_ptr, D, ROWS, 0, FAST_ROUND, LEAN)


@triton.jit
def _quant_kv_kernel(
    k_ptr, v_ptr, h_ptr, kmean_ptr, vs_ptr, k8_ptr, ks_ptr, vt_ptr, vcs_ptr,
    S, H, n_blocks, S_pad, skb, skh, sks, skd, svb, svh, svs, svd,
    D: tl.constexpr, BLOCK_N: tl.constexpr, ROT_SCALE: tl.constexpr, DOT_FP32: tl.constexpr,
    PV_INT8: tl.constexpr, FAST_ROUND: tl.constexpr, EMULATE_FP8: tl.constexpr, PART: tl.constexpr = 0,
    LEAN: tl.constexpr = False,
):
    """Keys [j * BLOCK_N, (j + 1) * BLOCK_N) of one head: K - its rotated mean -> int8 + one scale; V -> 8-bit with
    the per-channel scale, stored transposed; int8 V's column sums (PV_INT8). The mean and V's scale come from
    ``_kv_finalize_kernel``. PART: 0 both, 1 K only, 2 V only (two launches, each with the registers of its own
    half: ``quant_kv_options``). LEAN: K's statistics and store in ``_quant_k_block``'s lean form."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    if PART != 2:
        _quant_k_block(k_ptr, h_ptr, kmean_ptr, k8_ptr, ks_ptr, j, bh, S, H, n_blocks, skb, skh, sks, skd,
                       D, BLOCK_N, ROT_SCALE, DOT_FP32, FAST_ROUND, LEAN)
    if PART != 1:
        _quant_v_block(v_ptr, vs_ptr, vt_ptr, vcs_ptr, j, bh, S, H, n_blocks, S_pad, svb, svh, svs, svd,
                       D, BLOCK_N, PV_INT8, FAST_ROUND, EMULATE_FP8)


@triton.jit
def _quant_k_block(k_ptr, h_ptr, kmean_ptr, k8_ptr, ks_ptr, j, bh, S, H, n_blocks, skb, skh, sks, skd,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, ROT_SCALE: tl.constexpr, DOT_FP32: tl.constexpr,
                   FAST_ROUND: tl.constexpr, LEAN: tl.constexpr):
    """K block j of head bh: rotated, minus the head's rotated mean, int8 with one scale for the block (NaN where
    the block holds NaN/Inf). LEAN: the block's absmax by one NaN-propagating max a value and, where it is finite
    (the common case), the codes without clamp and select (``_store_codes``); a block with a NaN or Inf takes
    ``_quant_k_exact``. The same scale and codes either way."""
    b = bh // H
    h = bh % H
    d = tl.arange(0, D)
    mean = tl.load(kmean_ptr + bh * D + d)
    s = j * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = s < S
    kt = _maybe_rotate_qk(_load_tile(k_ptr, b, h, s, ok, skb, skh, sks, skd, D), h_ptr, BLOCK_N, D, ROT_SCALE, DOT_FP32)
    kt = tl.where(ok[:, None], kt - mean[None, :], 0.0)
    rows = bh.to(tl.int64) * S + s
    ks_at = ks_ptr + bh * n_blocks + j
    if LEAN:
        amax = tl.reduce(tl.abs(kt), None, _max_nan)  # NaN and +-Inf reach it
        if amax <= FLT_MAX:  # the block's scale from its absmax, the codes without clamp and select
            kscale = tl.maximum(amax * _INV_127, _TINY)
            tl.store(ks_at, kscale)
            kinv = tl.math.div_rn(tl.full((BLOCK_N,), 1.0, tl.float32), kscale + tl.zeros((BLOCK_N,), tl.float32))
            _store_codes(kt, kinv, rows, ok, d, D, k8_ptr, D, FAST_ROUND)
        else:
            _quant_k_exact(kt, rows, ok, d, ks_at, k8_ptr, D, BLOCK_N, FAST_ROUND)
    else:
        _quant_k_exact(kt, rows, ok, d, ks_at, k8_ptr, D, BLOCK_N, FAST_ROUND)


@triton.jit
def _quant_k_exact(kt, rows, ok, d, ks_at, k8_ptr, D: tl.constexpr, BLOCK_N: tl.constexpr, FAST_ROUND: tl.constexpr):
    """A K block's scale from the absmax of its finite values (NaN where it holds NaN/Inf) and its codes by the
    general store (clamped, non-finite values stored as 0)."""
    fin = tl.abs(kt) <= FLT_MAX
    absmax = tl.max(tl.max(tl.where(fin, tl.abs(kt), 0.0), axis=1), axis=0)
    bad = tl.sum(tl.sum((~fin).to(tl.int32), axis=1), axis=0)
    kscale = tl.maximum(absmax * _INV_127, _TINY)
    tl.store(ks_at, tl.where(bad > 0, float("nan"), kscale))
    kinv = tl.math.div_rn(tl.full((BLOCK_N,), 1.0, tl.float32), kscale + tl.zeros((BLOCK_N,), tl.float32))
    _quantize_store(kt, kinv, 0, rows, ok, d, D, k8_ptr, D, False, FAST_ROUND)


@triton.jit
def _quant_v_block(v_ptr, vs_ptr, vt_ptr, vcs_ptr, j, bh, S, H, n_blocks, S_pad, svb, svh, svs, svd,
                   D: tl.constexpr, BLOCK_N: tl.constexpr, PV_INT8: tl.constexpr, FAST_ROUND: tl.constexpr,
                   EMULATE_FP8: tl.constexpr):
    """V block j of head bh: 8-bit with the per-channel scale of ``_kv_finalize_kernel`` (NaN for a channel holding
    NaN/Inf), stored transposed; int8 V's column sums (PV_INT8)."""
    b = bh // H
    h = bh % H
    d = tl.arange(0, D)
    s = j * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = s < S
    vscale = tl.load(vs_ptr + bh * D + d)
    vinv = tl.math.div_rn(tl.full((D,), 1.0, tl.float32), tl.where(vscale == vscale, vscale, 1.0))
    vt = _load_tile(v_ptr, b, h, s, ok, svb, svh, svs, svd, D).to(tl.float32)
    vfin = tl.abs(vt) <= FLT_MAX
    y = tl.where(vfin, vt * vinv[None, :], 0.0)
    dst = vt_ptr + (bh * D + d).to(tl.int64)[:, None] * S_pad + s[None, :]
    # keys past S up to the padded row length are written too (as zeros: V's tile loads 0 there; the attention
    # kernel never reads them): masked at S_pad, a multiple of 16, the stores are 16 bytes wide, not one
    in_row = (s < S_pad)[None, :]
    if PV_INT8:
        r = tl.minimum(tl.maximum(_to_int(y, False, FAST_ROUND), -128), 127)
        r = tl.where(ok[:, None], r, 0)
        tl.store(vcs_ptr + (bh * n_blocks + j).to(tl.int64) * D + d, tl.sum(r, axis=0))
        tl.store(dst, tl.trans(r.to(tl.int8)), mask=in_row)
    else:
        tl.store(dst, tl.trans(_to_e4m3(y, EMULATE_FP8)), mask=in_row)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
@triton.jit
def _round_p(x):
    """x in [0, 254.5) -> int8 round(x) - 127: adding 1.5 * 2**23 - 127 (odd) rounds x to an integer in the
    low bits, so a tie goes to the even sum, an odd round(x) (x must be exactly k + 0.5 in float32, which the
    twin's half-to-even ``torch.round`` may round the other way)."""
    return (x + (MAGIC_F - 127.0)).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _scores(q, rm_q, desc_k, ks_ptr, j, kv_row, S_kv, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Key block j's scores: the exact int32 Q K^T as float32 and its row factor ``rm`` (q scale * k scale *
    sm_scale * log2(e), >= 0 or NaN); keys past S_kv are -inf when MASK."""
    start_n = j * BLOCK_N
    k = desc_k.load([kv_row + start_n, 0])
    qk = tl.dot(q, k.T).to(tl.float32)  # the int32 product is exact; so is its conversion (|qk| < 2**24)
    if MASK:
        qk = tl.where((start_n + tl.arange(0, BLOCK_N) < S_kv)[None, :], qk, float("-inf"))
    return qk, rm_q * tl.load(ks_ptr + j)


@triton.jit
def _softmax16(qk, rm, m_i, l_i):
    """Online softmax of one block for the 16-bit P V: x = exp2(t - m_new) in [0, 1] (float32), the factor
    ``alpha`` that rescales what acc and l hold, and the updated l and m (log2 units)."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * rm)  # rm >= 0 commutes with max
    alpha = tl.math.exp2(m_i - m_new)
    x = tl.math.exp2(qk * rm[:, None] - m_new[:, None])
    return x, alpha, l_i * alpha + tl.sum(x, 1), m_new


@triton.jit
def _pv16(acc, x, alpha, desc_v, v_b, v_h, j, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
          EMULATE: tl.constexpr):
    """acc * alpha + P @ V for key block j, P = x rounded to V's 16-bit type and V read as given through its
    [B, H, S, D] descriptor (keys past S_kv read as 0). On the tensor cores' float32 accumulator: 16-bit wgmma keeps
    full float32 sums, unlike 8-bit float, and a float32 accumulator lets Triton keep the product in flight (NOTES
    item 56: only non-float32 accumulators are waited for at issue). The rounding is done here, next to the product:
    Triton 3.6 then feeds P from registers (a loop-carried 16-bit P is staged through one shared buffer, which makes
    the product wait at issue)."""
    vb = desc_v.load([v_b, v_h, j * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM)
    p = _to_16bit(x, vb.dtype, EMULATE)
    if EMULATE:  # the interpreter multiplies 16-bit floats' bits as integers in tl.dot: float32 operands
        return tl.dot(p.to(tl.float32), vb.to(tl.float32), acc * alpha[:, None])
    return tl.dot(p, vb, acc * alpha[:, None])


@triton.jit
def _attn_block(
    acc, l_i, m_i, q, rm_q, desc_k, desc_v, ks_ptr, vcs_ptr, j, kv_row, vt_row, v_b, v_h, S_kv,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, PV_INT8: tl.constexpr,
    EMULATE_FP8: tl.constexpr, PV16: tl.constexpr,
):
    """One block of BLOCK_N keys: scores, online softmax update, P @ V into the float32 acc (8-bit, or with PV16
    P in V's own 16-bit type and V read as given through a [B, H, S, D] descriptor at (v_b, v_h)).

    State per query row: acc [BLOCK_M, HEAD_DIM], l (row sum) and m (running max, log2 units), float32.
    """
    start_n = j * BLOCK_N
    qk, rm = _scores(q, rm_q, desc_k, ks_ptr, j, kv_row, S_kv, BLOCK_N, MASK)
    if PV16:
        x, alpha, l_i, m_new = _softmax16(qk, rm, m_i, l_i)
        acc = _pv16(acc, x, alpha, desc_v, v_b, v_h, j, BLOCK_N, HEAD_DIM, EMULATE_FP8)
    elif PV_INT8:
        m_blk = tl.max(qk, 1) * rm  # this block's row max in log2 units (rm >= 0 commutes with max)
        m_new = tl.maximum(m_i, m_blk)
        # x = 254 * exp2(t - m_blk) in (0, 254]: one FMA and one exp2 per score. The block's max is raised by
        # 8 ulps (|m_blk| * 2**-20) so the roundings of the exponent can never lift x past 254.5, which would
        # round to 255 and wrap in int8; the factor it takes off x is the same in acc and l.
        m_safe = m_blk + tl.abs(m_blk) * _MAX_MARGIN
        x = tl.math.exp2(qk * rm[:, None] + (-m_safe + _LOG2_P_INT8)[:, None])
        p = _round_p(x)
        vt = desc_v.load([vt_row, start_n])  # [HEAD_DIM, BLOCK_N] int8
        pv = tl.dot(p, vt.T)  # sum_n (round(x) - 127) * v: int32, exact
        cs = tl.load(vcs_ptr + j * HEAD_DIM + tl.arange(0, HEAD_DIM)) * 127
        pvf = (pv + cs[None, :]).to(tl.float32)  # exact: |sum| <= 254 * 128 * D < 2**24
        s_blk = tl.sum(x, 1)
        alpha = tl.math.exp2(m_i - m_new)
        beta = tl.math.exp2(m_blk - m_new)
        acc = acc * alpha[:, None] + pvf * beta[:, None]
        l_i = l_i * alpha + s_blk * beta
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * rm)
        alpha = tl.math.exp2(m_i - m_new)
        x = tl.math.exp2(qk * rm[:, None] + (-m_new + _LOG2_P_FP8)[:, None])  # 448 * exp2(t - m_new)
        l_i = l_i * alpha + tl.sum(x, 1)
        vt = desc_v.load([vt_row, start_n])  # [HEAD_DIM, BLOCK_N] e4m3
        # this block's product alone, then a float32 add: two-level accumulation (see attention_configs)
        acc = acc * alpha[:, None] + tl.dot(_to_e4m3(x, EMULATE_FP8), vt.T)
    return acc, l_i, m_new


@triton.jit
def _attention_kernel(
    desc_q, desc_k, desc_v, qs_ptr, ks_ptr, vs_ptr, vcs_ptr, out_ptr,
    qk_mult, S_q, S_kv, H, n_blocks, stride_ob, stride_oh, stride_os, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PV_INT8: tl.constexpr,
    EMULATE_FP8: tl.constexpr, WARP_SPEC: tl.constexpr = False, LOOP_STAGES: tl.constexpr = 0,
    NO_ACC_MULTIBUF: tl.constexpr = False, PV16: tl.constexpr = False, DEFER_PV: tl.constexpr = False,
):
    """out[b, h, i] = softmax_j(q_i . k_j * sm_scale) @ v for BLOCK_M queries i of head (b, h).

    DEFER_PV (PV16 only): each iteration issues block j's Q K^T, then block j - 1's P V, then block j's softmax, so
    the softmax's exp2s run while that float32-accumulated product is in flight (FlashAttention-3's
    intra-warpgroup overlap with the products swapped: Triton 3.6 waits for the int8 Q K^T at issue, item 56).
    Every product and rounding is the same as in block order, so the results are bit-identical."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < S_q
    if WARP_SPEC:
        # desc_q is the int8 Q tensor's pointer here, and both per-row operands (Q and its row scales) are read
        # through descriptors made in the kernel. Triton 3.6's Hopper warp specialization splits the tile's rows
        # between its two consumer warpgroups and moves their loads to the producer warps: a pointer load there
        # trips an assertion, and a host descriptor keeps its full block_m-row TMA box while each copy expects
        # half of it; a device descriptor gets the halved box. Rows past the tensor's end read as 0 (not stored).
        n_rows = tl.num_programs(1) * S_q
        dq = tl.make_tensor_descriptor(desc_q, [n_rows, HEAD_DIM], [HEAD_DIM, 1], [BLOCK_M, HEAD_DIM])
        # The scales as one row: the split is along dim 0 (a [BH, S_q] view keeps its full box in dim 1, the same
        # bug); the caller checks S_q % 4 == 0, so every tile's offset is 16-byte aligned (checked by the
        # interpreter; rows past the head's end read the next head's scales and are not stored).
        dqs = tl.make_tensor_descriptor(qs_ptr, [n_rows], [1], [BLOCK_M])
        q = dq.load([bh * S_q + pid_m * BLOCK_M, 0])
        rm_q = dqs.load([bh * S_q + pid_m * BLOCK_M]) * qk_mult
    else:
        q = desc_q.load([bh * S_q + pid_m * BLOCK_M, 0])
        rm_q = tl.load(qs_ptr + bh.to(tl.int64) * S_q + offs_m, mask=m_ok, other=0.0) * qk_mult
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    kv_row = bh * S_kv
    vt_row = bh * HEAD_DIM
    b = bh // H
    h = bh % H
    ks_base = ks_ptr + bh * n_blocks
    vcs_base = vcs_ptr + bh.to(tl.int64) * n_blocks * HEAD_DIM
    if WARP_SPEC:
        # Triton's Hopper warp specialization gives up on a kernel with a conditional tail block, so every block
        # is masked here (one compare and select per score)
        for j in tl.range(0, n_blocks, num_stages=LOOP_STAGES if LOOP_STAGES > 0 else None, warp_specialize=True,
                          disallow_acc_multi_buffer=NO_ACC_MULTIBUF):
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, rm_q, desc_k, desc_v, ks_base, vcs_base, j, kv_row, vt_row,
                                        b, h, S_kv, BLOCK_N, HEAD_DIM, True, PV_INT8, EMULATE_FP8, PV16)
    elif DEFER_PV:
        n_full = S_kv // BLOCK_N
        # before block 0 there is no P V to run: its slot multiplies P = 0 by the block past the last key, which TMA
        # reads as zeros (adding exactly 0 to acc = 0, where a real V block holding Inf would give 0 * Inf = NaN).
        # Peeling block 0 out of the loop instead costs a second set of K/V buffers (16 KB more shared memory:
        # one program per SM instead of two).
        x = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        alpha = tl.full((BLOCK_M,), 1.0, tl.float32)
        for j in tl.range(0, n_full, num_stages=LOOP_STAGES if LOOP_STAGES > 0 else None,
                          disallow_acc_multi_buffer=NO_ACC_MULTIBUF):
            qk, rm = _scores(q, rm_q, desc_k, ks_base, j, kv_row, S_kv, BLOCK_N, False)
            acc = _pv16(acc, x, alpha, desc_v, b, h, tl.where(j > 0, j - 1, n_blocks), BLOCK_N, HEAD_DIM,
                        EMULATE_FP8)
            x, alpha, l_i, m_i = _softmax16(qk, rm, m_i, l_i)
        if n_full < n_blocks:  # the partial last block
            qk, rm = _scores(q, rm_q, desc_k, ks_base, n_full, kv_row, S_kv, BLOCK_N, True)
            acc = _pv16(acc, x, alpha, desc_v, b, h, tl.where(n_full > 0, n_full - 1, n_blocks), BLOCK_N, HEAD_DIM,
                        EMULATE_FP8)
            x, alpha, l_i, m_i = _softmax16(qk, rm, m_i, l_i)
        acc = _pv16(acc, x, alpha, desc_v, b, h, n_blocks - 1, BLOCK_N, HEAD_DIM, EMULATE_FP8)
    else:
        n_full = S_kv // BLOCK_N
        for j in tl.range(0, n_full, num_stages=LOOP_STAGES if LOOP_STAGES > 0 else None,
                          disallow_acc_multi_buffer=NO_ACC_MULTIBUF):
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, rm_q, desc_k, desc_v, ks_base, vcs_base, j, kv_row, vt_row,
                                        b, h, S_kv, BLOCK_N, HEAD_DIM, False, PV_INT8, EMULATE_FP8, PV16)
        if n_full < n_blocks:
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, rm_q, desc_k, desc_v, ks_base, vcs_base, n_full, kv_row,
                                        vt_row, b, h, S_kv, BLOCK_N, HEAD_DIM, True, PV_INT8, EMULATE_FP8, PV16)
    d = tl.arange(0, HEAD_DIM)
    if PV16:
        o = acc * (1.0 / l_i)[:, None]
    else:
        vs = tl.load(vs_ptr + bh * HEAD_DIM + d)
        o = acc * (1.0 / l_i)[:, None] * vs[None, :]
    ptrs = (out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
            + offs_m.to(tl.int64)[:, None] * stride_os + d[None, :] * stride_od)
    tl.store(ptrs, o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


_KV_STATS = FastLauncher(_kv_stats_kernel, interpreting())
_KV_FINALIZE = FastLauncher(_kv_finalize_kernel, interpreting())
_QUANT_Q = FastLauncher(_quant_q_kernel, interpreting())
_QUANT_KV = FastLauncher(_quant_kv_kernel, interpreting())
_ATTENTION = FastLauncher(_attention_kernel, interpreting())


# --------------------------------------------------------------------------------------------
# Launchers (arguments validated by attention.py)
# --------------------------------------------------------------------------------------------
def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(x.stride())


def stats_chunk(s_kv: int) -> int:
    """Keys per chunk of the statistics pass: STATS_CHUNKS chunks per head, whole QUANT_ROWS tiles (so whole
    STATS_ROWS tiles too)."""
    return -(-max(1, -(-s_kv // STATS_CHUNKS)) // QUANT_ROWS) * QUANT_ROWS


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttentionConfig, lean: bool | None = None
             ) -> QuantizedQKV:
    """The quantization pass: ``q [B, H, S_q, D]``, ``k, v [B, H, S_kv, D]`` (bf16/fp16, any strides). ``lean``:
    the Q and K kernels' LEAN forms or their general ones (the same scales and codes; None: ``LEAN_PASS``)."""
    lean = LEAN_PASS if lean is None else lean
    b, h, s_q, d = q.shape
    s_kv = k.shape[2]
    bh = b * h
    dev = q.device
    nk = triton.cdiv(s_kv, cfg.block_n)
    chunk = stats_chunk(s_kv)
    n_chunks = triton.cdiv(s_kv, chunk)
    s_pad = padded_kv_len(s_kv)
    # the interpreter multiplies bfloat16 bits as integers in tl.dot: it rotates in float32
    dot_fp32 = interpreting()
    hmat = hadamard_pm1_cached(d, dev, torch.float32 if dot_fp32 else q.dtype) if cfg.rotate else None
    rot = {"ROT_SCALE": 1.0 / math.sqrt(d) if cfg.rotate else 0.0, "DOT_FP32": dot_fp32}
    q8 = torch.empty((bh * s_q, d), dtype=torch.int8, device=dev)
    qs = torch.empty((bh * s_q,), dtype=torch.float32, device=dev)
    k8 = torch.empty((bh * s_kv, d), dtype=torch.int8, device=dev)
    ks = torch.empty((bh, nk), dtype=torch.float32, device=dev)
    has_v = cfg.quantizes_v
    if has_v:
        vdtype = torch.int8 if cfg.pv == "int8" else torch.float8_e4m3fn
        vt = torch.empty((bh * d, s_pad), dtype=vdtype, device=dev)
        vs = torch.empty((bh, d), dtype=torch.float32, device=dev)
    else:  # the kernel reads V as given
        vt, vs = (v if tma_ok(v) else v.contiguous()), None
    vcs = torch.empty((bh, nk, d), dtype=torch.int32, device=dev) if cfg.pv == "int8" else None
    part = torch.empty((2, bh, n_chunks, d), dtype=torch.float32, device=dev)
    kmean = torch.empty((bh, d), dtype=torch.float32, device=dev)
    fast = not interpreting()
    hm = hmat if hmat is not None else q8
    if s_q and bh:
        _QUANT_Q((triton.cdiv(s_q, QUANT_ROWS), bh), q, hm, q8, qs, s_q, h, *_strides(q), D=d, ROWS=QUANT_ROWS, **rot,
                 FAST_ROUND=fast, LEAN=lean, **quant_q_options(lean))
    _KV_STATS((n_chunks, bh), k, v, part[0], part[1], s_kv, h, chunk, n_chunks, *_strides(k), *_strides(v),
              D=d, ROWS=STATS_ROWS, HAS_V=has_v, num_warps=QUANT_WARPS)
    _KV_FINALIZE((bh,), part[0], part[1], hm, kmean, kmean if vs is None else vs, s_kv, n_chunks, D=d,
                 ROT_SCALE=rot["ROT_SCALE"], PV_INT8=cfg.pv == "int8", HAS_V=has_v, num_warps=QUANT_WARPS)
    for p in ((1, 2) if cfg.split_quant_kv else (0,)) if has_v else (1,):
        _QUANT_KV((nk, bh), k, v, hm, kmean, vs if has_v else kmean, k8, ks, vt if has_v else k8,
                  vcs if vcs is not None else ks, s_kv, h,
                  nk, s_pad, *_strides(k), *_strides(v), D=d, BLOCK_N=cfg.block_n, **rot,
                  PV_INT8=cfg.pv == "int8", FAST_ROUND=fast, EMULATE_FP8=not fast, PART=p, LEAN=lean,
                  **quant_kv_options(cfg.block_n, d, p))
    return QuantizedQKV(q8, qs, k8, ks, vt, vs, vcs, (b, h, s_q, s_kv, d), cfg.block_n, cfg.pv)


def loop_options(cfg: AttentionConfig) -> dict:
    """The key loop's constexprs of ``_attention_kernel`` for ``cfg`` (its ``tl.range`` attributes)."""
    return {"WARP_SPEC": cfg.warp_spec, "LOOP_STAGES": cfg.loop_stages, "NO_ACC_MULTIBUF": cfg.no_acc_multibuf}


def pv_options(cfg: AttentionConfig) -> dict:
    """The P V format's constexprs of ``_attention_kernel`` for ``cfg``."""
    return {"PV_INT8": cfg.pv == "int8", "PV16": not cfg.quantizes_v, "DEFER_PV": cfg.defer_pv}


def attention_quantized(qa: QuantizedQKV, sm_scale: float, out: torch.Tensor, cfg: AttentionConfig) -> torch.Tensor:
    """Run the attention kernel on quantized inputs into ``out [B, H, S_q, D]`` (any strides); returns out."""
    b, h, s_q, s_kv, d = qa.shape
    if cfg.block_n != qa.block_n or cfg.pv != qa.pv:
        raise ValueError(f"cfg: block_n={cfg.block_n}, pv={cfg.pv} do not match the quantized inputs "
                         f"(block_n={qa.block_n}, pv={qa.pv})")
    if s_q == 0 or b * h == 0:
        return out
    desc_q = TensorDescriptor(qa.q, list(qa.q.shape), [d, 1], [cfg.block_m, d])
    desc_k = TensorDescriptor(qa.k, list(qa.k.shape), [d, 1], [cfg.block_n, d])
    if not cfg.quantizes_v:  # [B, H, S_kv, D] as given: keys past S_kv read as 0
        desc_v = TensorDescriptor(qa.v, list(qa.v.shape), list(qa.v.stride()), [1, 1, cfg.block_n, d])
    else:
        desc_v = TensorDescriptor(qa.v, [qa.v.shape[0], s_kv], [qa.v.stride(0), 1], [d, cfg.block_n])
    vcs = qa.v_colsum if qa.v_colsum is not None else qa.k_scale
    vs = qa.v_scale if qa.v_scale is not None else qa.k_scale
    args = ((triton.cdiv(s_q, cfg.block_m), b * h), desc_q, desc_k, desc_v, qa.q_scale, qa.k_scale, vs, vcs,
            out, float(sm_scale * LOG2E), s_q, s_kv, h, qa.k_scale.shape[1], *out.stride())
    kwargs = {"HEAD_DIM": d, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, **pv_options(cfg),
              "EMULATE_FP8": interpreting(), **loop_options(cfg), "num_warps": cfg.num_warps,
              "num_stages": cfg.num_stages}
    if not cfg.warp_spec:
        _ATTENTION(*args, **kwargs)
        return out
    if s_q % 4:
        raise ValueError(f"cfg: {cfg.name} (warp_spec) needs S_q % 4 == 0 (a TMA row of Q scales starts on 16 bytes), "
                         f"got S_q={s_q}; use a config without warp_spec")
    # the kernel makes Q's descriptors itself (see there): it takes Q's pointer, and Triton asks for 256 bytes of
    # global scratch per program to write them to, from the allocator of this context (set for this launch only
    # when the caller has none)
    args = (args[0], qa.q, *args[2:])
    with device_descriptors():
        _ATTENTION(*args, **kwargs)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, cfg: AttentionConfig,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize, then attend: ``[B, H, S_q, D]`` in q's dtype (``torch.empty_like(q)`` unless ``out`` is given)."""
    out = torch.empty_like(q) if out is None else out
    return attention_quantized(quantize(q, k, v, cfg), sm_scale, out, cfg)
