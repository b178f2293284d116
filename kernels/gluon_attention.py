"""8-bit attention for Hopper written in Gluon, with FlashAttention-3's intra-warpgroup overlap (issue 14).

The same numbers as ``triton_attention``'s default form (INT8 Q K^T with per-block K scales, P rounded to
0..254 relative to each block's row max and stored as int8 minus 127, INT8 V per channel, each block's P V
added to the float32 accumulator on its own, the column sums restoring the shift: ``reference_attention``),
on the inputs of its quantization pass (``triton_attention.quantize``, ``block_n`` = 64). What differs is the
schedule. Triton 3.6 waits for every INT8 wgmma as soon as it is issued (bench/NOTES.md item 56), so in
``triton_attention`` a warpgroup's softmax never runs under its own products. Here, per block j of keys::

    load K, V of block j + stages - 1 into block j - 1's buffer
    issue S[j+1] = Q K[j+1]^T                       (in flight)
    softmax of S[j] -> P[j], the row max and sum    (under S[j+1])
    issue P[j] V[j]                                  (P from registers)
    wait for both; acc = acc * alpha[j] + (P[j] V[j]) * beta[j]

The first version also kept P[j-1] V[j-1] in flight across the next softmax (FlashAttention-3's full
intra-warpgroup order); ptxas serialized every wgmma of it (its note C7514: a product in flight across the loop's
back edge; ``bench/probe_wgmma_pipeline.py`` reproduces it), and it measured 0.73-0.79x the Triton kernel on the
H200 (bench/NOTES.md items 58-59). This form is the one ptxas keeps: only the next scores' product overlaps.

One warpgroup of 64 query rows per program, K/V through TMA into a ring of ``stages`` buffers; every block's
scores are masked past S_kv (K's rows there belong to the next head). The last iteration computes one score
block again (the next index is clamped): ~1/n_blocks of the Q K^T work.

Opt-in, not dispatched: this form is not yet measured on a GPU.
Needs SM 9.0 and a compiled Triton; D = 64 or 128.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .attention_configs import AttentionConfig
from .reference_attention import LOG2E, MAGIC_F, MAX_MARGIN, P_INT8_MAX, QuantizedQKV

_MAGIC: gl.constexpr = gl.constexpr(MAGIC_F - 127.0)
_LOG2_P: gl.constexpr = gl.constexpr(math.log2(P_INT8_MAX))
_MARGIN: gl.constexpr = gl.constexpr(MAX_MARGIN)


@dataclass(frozen=True)
class GluonAttentionConfig:
    """block_n keys per block (the K scales' block: quantize with ``quant_config()``), stages K/V buffers.

    64-key blocks only: with 128 the next block's scores, the in-flight P V and the accumulator (64 registers each
    per thread) no longer fit 255 registers in this schedule (ptxas spills 380 bytes; bench/NOTES.md item 59)."""

    block_n: int = 64
    stages: int = 3

    def __post_init__(self) -> None:
        if self.block_n != 64 or self.stages < 3:
            raise ValueError(f"GluonAttentionConfig: block_n 64 and stages >= 3 (block j + 1 is loaded before "
                             f"iteration j), got {self.block_n}, {self.stages}")

    def quant_config(self) -> AttentionConfig:
        """The quantization pass's config for this kernel's inputs (int8 P V, rotation, K/V split)."""
        return AttentionConfig(block_m=64, block_n=self.block_n, num_warps=4, num_stages=self.stages, pv="int8",
                               split_quant_kv=True)


DEFAULT = GluonAttentionConfig()
BLOCK_M = 64  # one warpgroup's wgmma rows
NUM_WARPS = 4


@gluon.jit
def _softmax(s, col_ok, rm, m_i, l_i):
    """One block's scores (int32 [BM, BN]) -> (P as int8 round(x) - 127, alpha, beta, new max, new row sum)."""
    qk = gl.where(col_ok[None, :], s.to(gl.float32), float("-inf"))
    m_blk = gl.max(qk, 1) * rm  # the block's row max in log2 units (rm >= 0 commutes with max)
    m_new = gl.maximum(m_i, m_blk)
    m_safe = m_blk + gl.abs(m_blk) * _MARGIN  # x can never round past 254 (see triton_attention._attn_block)
    x = gl.exp2(qk * rm[:, None] + (_LOG2_P - m_safe)[:, None])
    p = (x + _MAGIC).to(gl.int32, bitcast=True).to(gl.int8)
    alpha = gl.exp2(m_i - m_new)
    beta = gl.exp2(m_blk - m_new)
    return p, alpha, beta, m_new, l_i * alpha + gl.sum(x, 1) * beta


@gluon.jit
def _gluon_attention_kernel(q_desc, k_desc, v_desc, qs_ptr, ks_ptr, vs_ptr, vcs_ptr, out_ptr,
                      qk_mult, S_q, S_kv, n_blocks, H, stride_ob, stride_oh, stride_os,
                      HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = q_desc.block_type.shape[0]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    s_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BN, 32])
    o_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, HEAD_DIM, 32])
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_mma, k_width=4)
    row_s: gl.constexpr = gl.SliceLayout(1, s_mma)
    row_o: gl.constexpr = gl.SliceLayout(1, o_mma)

    q_s = gl.allocate_shared_memory(q_desc.dtype, [BM, HEAD_DIM], q_desc.layout)
    k_s = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, HEAD_DIM], k_desc.layout)
    v_s = gl.allocate_shared_memory(v_desc.dtype, [STAGES, HEAD_DIM, BN], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_bar.index(i), count=1)
    kv_bytes: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
    kv_row = bh * S_kv
    vt_row = bh * HEAD_DIM
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [bh * S_q + pid_m * BM, 0], q_bar, q_s)
    for i in gl.static_range(STAGES - 1):
        if i < n_blocks:
            mbarrier.expect(kv_bar.index(i), kv_bytes)
            tma.async_copy_global_to_shared(k_desc, [kv_row + i * BN, 0], kv_bar.index(i), k_s.index(i))
            tma.async_copy_global_to_shared(v_desc, [vt_row, i * BN], kv_bar.index(i), v_s.index(i))

    rows = pid_m * BM + gl.arange(0, BM, layout=row_s)
    rm_q = gl.load(qs_ptr + bh.to(gl.int64) * S_q + rows, mask=rows < S_q, other=0.0) * qk_mult
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_mma))
    d_o = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_mma))
    ks_base = ks_ptr + bh * n_blocks
    vcs_base = vcs_ptr + bh.to(gl.int64) * n_blocks * HEAD_DIM
    zero_s = gl.zeros((BM, BN), gl.int32, layout=s_mma)
    zero_o = gl.zeros((BM, HEAD_DIM), gl.int32, layout=o_mma)
    acc = gl.zeros((BM, HEAD_DIM), gl.float32, layout=o_mma)
    m_i = gl.full((BM,), float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros((BM,), gl.float32, layout=row_s)

    # block 0's scores, then per block j: its softmax runs under the next block's Q K^T, and its P V is finished
    # in the same iteration (a P V left in flight across the back edge makes ptxas serialize every wgmma: item 59)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(kv_bar.index(0), 0)
    s = warpgroup_mma(q_s, k_s.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    for j in range(n_blocks):
        nk = j + STAGES - 1
        if nk < n_blocks:  # into block j - 1's buffer, free since its P V finished
            ns = nk % STAGES
            mbarrier.expect(kv_bar.index(ns), kv_bytes)
            tma.async_copy_global_to_shared(k_desc, [kv_row + nk * BN, 0], kv_bar.index(ns), k_s.index(ns))
            tma.async_copy_global_to_shared(v_desc, [vt_row, nk * BN], kv_bar.index(ns), v_s.index(ns))
        jn = gl.minimum(j + 1, n_blocks - 1)  # the last iteration computes its own block's scores again
        mbarrier.wait(kv_bar.index(jn % STAGES), (jn // STAGES) & 1)
        s_next = warpgroup_mma(q_s, k_s.index(jn % STAGES).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p, alpha, beta, m_i, l_i = _softmax(s, cols < S_kv - j * BN, rm_q * gl.load(ks_base + j), m_i, l_i)
        pv = warpgroup_mma(gl.convert_layout(p, p_op), v_s.index(j % STAGES).permute((1, 0)), zero_o,
                           use_acc=False, is_async=True)
        pv, s = warpgroup_mma_wait(num_outstanding=0, deps=(pv, s_next))
        cs = gl.load(vcs_base + j * HEAD_DIM + d_o) * 127
        pvf = (pv + cs[None, :]).to(gl.float32)  # exact: |sum| <= 254 * 128 * D < 2**24
        acc = acc * gl.convert_layout(alpha, row_o)[:, None] + pvf * gl.convert_layout(beta, row_o)[:, None]
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(kv_bar.index(i))

    vs = gl.load(vs_ptr + bh * HEAD_DIM + d_o)
    store_rows(acc * gl.convert_layout(1.0 / l_i, row_o)[:, None] * vs[None, :], out_ptr, pid_m * BM, bh, H, S_q,
               stride_ob, stride_oh, stride_os, num_warps)


@gluon.jit
def store_rows(o, out_ptr, row0, bh, H, S_q, stride_ob, stride_oh, stride_os, num_warps: gl.constexpr):
    """Store float32 ``o [ROWS, D]`` (any distributed layout) as rows ``row0 + i`` of head ``bh`` of ``out [B, H, S_q,
    D]`` in its dtype (unit stride along D), 16 bytes per thread; rows past S_q are not stored."""
    ROWS: gl.constexpr = o.shape[0]
    D: gl.constexpr = o.shape[1]
    store: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    o = gl.convert_layout(o.to(out_ptr.dtype.element_ty), store)
    r = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, store))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, store))
    b = bh // H
    h = bh % H
    ptrs = (out_ptr + b.to(gl.int64) * stride_ob + h.to(gl.int64) * stride_oh + r.to(gl.int64)[:, None] * stride_os
            + d[None, :])
    gl.store(ptrs, o, mask=(r < S_q)[:, None])


def check_inputs(who: str, qa: QuantizedQKV, out: torch.Tensor, pv: str, block_n: int) -> None:
    """The Gluon attention kernels' input rules (``who`` names the kernel in the message): inputs quantized in the
    ``pv`` form with ``block_n``-key K scales, D = 64 or 128, ``out`` with unit stride along D, an SM 9.x GPU.
    Raises ValueError naming what is wrong."""
    d = qa.shape[4]
    if qa.pv != pv or qa.block_n != block_n:
        raise ValueError(f"{who}: needs {pv} P V inputs quantized with block_n={block_n}, got pv={qa.pv}, "
                         f"block_n={qa.block_n}")
    if d not in (64, 128) or out.stride(3) != 1:
        raise ValueError(f"{who}: head dim 64 or 128 with unit stride in out, got {d}, {out.stride()}")
    if not qa.q.is_cuda or torch.cuda.get_device_capability(qa.q.device)[0] != 9:
        raise ValueError(f"{who}: needs an SM 9.x (Hopper) GPU, got inputs on {qa.q.device}")


def attention_quantized(qa: QuantizedQKV, sm_scale: float, out: torch.Tensor,
                        cfg: GluonAttentionConfig = DEFAULT) -> torch.Tensor:
    """The kernel on ``triton_attention.quantize(q, k, v, cfg.quant_config())``'s output into ``out [B, H, S_q, D]``
    (unit stride along D) on an SM 9.x GPU; returns out. Raises ValueError for other inputs."""
    check_inputs("gluon_attention", qa, out, "int8", cfg.block_n)
    return launch(qa, sm_scale, out, cfg)


def launch(qa: QuantizedQKV, sm_scale: float, out: torch.Tensor, cfg: GluonAttentionConfig = DEFAULT) -> torch.Tensor:
    """``attention_quantized`` without its checks (``check_ptx_attention`` compiles this launch for sm_90 on CPU
    tensors); returns out."""
    b, h, s_q, s_kv, d = qa.shape
    if s_q == 0 or b * h == 0 or s_kv == 0:
        return out
    i8 = gl.int8
    q_desc = TensorDescriptor(qa.q, list(qa.q.shape), [d, 1], [BLOCK_M, d],
                              gl.NVMMASharedLayout.get_default_for([BLOCK_M, d], i8))
    k_desc = TensorDescriptor(qa.k, list(qa.k.shape), [d, 1], [cfg.block_n, d],
                              gl.NVMMASharedLayout.get_default_for([cfg.block_n, d], i8))
    v_desc = TensorDescriptor(qa.v, [qa.v.shape[0], s_kv], [qa.v.stride(0), 1], [d, cfg.block_n],
                              gl.NVMMASharedLayout.get_default_for([d, cfg.block_n], i8))
    n_blocks = qa.k_scale.shape[1]
    grid = (-(-s_q // BLOCK_M), b * h)
    _gluon_attention_kernel[grid](q_desc, k_desc, v_desc, qa.q_scale, qa.k_scale, qa.v_scale, qa.v_colsum, out,
                            float(sm_scale * LOG2E), s_q, s_kv, n_blocks, h, out.stride(0), out.stride(1),
                            out.stride(2), HEAD_DIM=d, STAGES=cfg.stages, num_warps=NUM_WARPS)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
              cfg: GluonAttentionConfig = DEFAULT) -> torch.Tensor:
    """Quantize (``triton_attention.quantize``), then attend: ``[B, H, S_q, D]`` in q's dtype."""
    from . import triton_attention

    out = torch.empty_like(q)
    return attention_quantized(triton_attention.quantize(q, k, v, cfg.quant_config()), sm_scale, out, cfg)
