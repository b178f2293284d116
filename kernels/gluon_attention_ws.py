"""8-bit attention for Hopper in Gluon, warp-specialized: a TMA producer warp and two consumer warpgroups (issue 14).

The numbers of ``triton_attention``'s 16-bit P V form (``pv = "16bit"``: INT8 Q K^T with per-token Q and
per-block K scales, P = exp2(t - m) rounded to V's bf16/fp16, V as given, the float32 accumulator on the tensor
cores), on the inputs of its quantization pass (``triton_attention.quantize``). What differs is the structure, the
one cuDNN's and FlashAttention-3's Hopper kernels share and Triton 3.6 does not produce (bench/NOTES.md items 70-72:
the Triton kernel is latency-bound at two warps per scheduler, with three CTA barriers per key block around its own
TMA loads)::

    producer (1 warp):      Q once; per key block j: wait until both consumers released stage j % STAGES, then
                            TMA K[j] and V[j] into it (one transaction barrier per stage)
    consumer w (4 warps):   rows [64 w, 64 w + 64) of the program's 128-row Q tile; per block j: wait for the
                            stage, S = Q K[j]^T (int8 wgmma), online softmax, O = O * alpha + P V[j] (16-bit wgmma,
                            P from registers), release the stage

Both consumers read each K/V stage (half the L2 traffic of two 64-row programs), nothing waits on a CTA barrier, and
the two warpgroups drift apart by themselves: one's softmax runs while the other's products do. Each product is
waited for inside its own iteration (the form ptxas keeps: item 59). Every block's scores are masked past S_kv (K's
rows there belong to the next head; V is read through its [B, H, S, D] descriptor, so its rows there are TMA's
zeros).

``defer`` (the default) issues block j's Q K^T and block j - 1's P V back to back, waits for the scores only, and runs
block j's softmax under the P V product (FlashAttention-3's intra-warpgroup overlap; both products still finish in the
iteration that issued them, and a stage is released one block later, so it takes >= 3 stages). In the SASS only the
row max runs under it: ptxas places the product's wait before the exponentials (item 75; holding the product across
the loop's back edge instead makes ptxas serialize every wgmma, C7512/C7514). On the H200 (bench/
NOTES.md item 74): kernel alone 1.06-1.09x the Triton kernel (6.05 vs 6.55 ms at Wan's H = 40, S = 14040), bit for
bit its output; without ``defer`` 0.94-0.95x. ``pingpong`` (the default) adds FlashAttention-3's inter-warpgroup
schedule: the consumers take turns issuing their products (a pair of mbarriers), so one's softmax runs while the other's
products do: 5.86 vs 6.08 ms at Wan's shape (item 75). Whole key blocks skip the per-key mask, and each row's max is
taken over the int32 scores: 5.60 ms, 1.27x cuDNN kernel alone, bit for bit the Triton kernel. The row sums in 8
partial sums (``row_sum_parts``, item 78; another summation order, so no longer bit for bit: row_sum_parts = 0 is):
5.45 ms, 1.31x cuDNN.
``kernels.attention`` dispatches it on SM 9.0 where Triton's Gluon runs.
Needs SM 9.0 and a Triton with Gluon (3.6); D = 64 or 128; a V that TMA cannot read is copied (``launch.tma_ok``), as
the Triton kernel does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .attention_configs import AttentionConfig
from .gluon_attention import check_inputs, store_rows
from .launch import tma_ok
from .reference_attention import LOG2E, QuantizedQKV

BLOCK_M = 128  # one program's Q rows: 64 per consumer warpgroup
HALF_M: gl.constexpr = gl.constexpr(64)
NUM_WARPS = 4  # the default partition: consumer 0
ROW_SUM_PARTS = (0, 4, 8, 16, 32)  # GluonWsAttentionConfig.row_sum_parts


@dataclass(frozen=True)
class GluonWsAttentionConfig:
    """block_n keys per stage (the K scales' block: quantize with ``quant_config()``), stages K/V buffers,
    consumer_regs / producer_regs: the partitions' register budgets (``setmaxnreg``; 2 x 128 x consumer + 128 x
    producer <= 65,536); row_sum_parts (``_row_sum``): 0 sums each row of P as the Triton kernel does (bit for bit
    its output), P in 4 .. 32 as P partial sums then their sum (shorter dependent add chains, another rounding of
    the row sum: offline at D = 128 the longest chain of dependent FADDs in the key loop is 33 for 0, 18 for 4 and
    8, 12 for 16 and 32; 4 adds two shuffles)."""

    block_n: int = 128
    stages: int = 4
    consumer_regs: int = 240  # 232: ptxas spilled 5 registers of the two-loop consumer to the stack
    producer_regs: int = 24
    defer: bool = True
    pingpong: bool = True
    # 0: the row sum as gl.sum; P: P partial sums of BN / P keys each, then their sum. 8 on the H200 (session 23):
    # kernel alone 5.446 vs 5.612 ms at Wan's H 40, S 14040 and 5.964 vs 6.254 at H 32, S 16896 (NOTES item 78)
    row_sum_parts: int = 8

    def __post_init__(self) -> None:
        if self.block_n not in (64, 128) or not 2 <= self.stages <= 4:
            raise ValueError(f"GluonWsAttentionConfig: block_n 64 or 128 and 2-4 stages, got {self.block_n}, "
                             f"{self.stages}")
        if self.defer and self.stages < 3:
            raise ValueError("GluonWsAttentionConfig: defer keeps a stage one block longer: stages >= 3")
        if self.pingpong and not self.defer:
            raise ValueError("GluonWsAttentionConfig: pingpong orders defer's product issues: needs defer")
        if self.row_sum_parts not in ROW_SUM_PARTS:
            raise ValueError(f"GluonWsAttentionConfig: row_sum_parts one of {ROW_SUM_PARTS}, got {self.row_sum_parts}")
        if 2 * 128 * self.consumer_regs + 128 * self.producer_regs > 65536:
            raise ValueError("GluonWsAttentionConfig: the partitions' registers exceed 65,536 per SM")

    def quant_config(self) -> AttentionConfig:
        """The quantization pass's config for this kernel's inputs (16-bit P V, rotation)."""
        return AttentionConfig(block_m=64, block_n=self.block_n, num_warps=4, num_stages=self.stages, pv="16bit")

    @property
    def name(self) -> str:
        return (f"gluon-ws-128x{self.block_n}-s{self.stages}" + ("-defer" if self.defer else "")
                + ("-pp" if self.pingpong else "") + (f"-rs{self.row_sum_parts}" if self.row_sum_parts else ""))


DEFAULT = GluonWsAttentionConfig()


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_s, k_s, v_s, q_bar, ready, empty, q_row, kv_row, bh, H, n_blocks,
              STAGES: gl.constexpr):
    """Q's two halves once, then K and V block by block into the ring of stages."""
    BN: gl.constexpr = k_desc.block_type.shape[0]
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_s.index(0))
    tma.async_copy_global_to_shared(q_desc, [q_row + HALF_M, 0], q_bar, q_s.index(1))
    kv_bytes: gl.constexpr = k_desc.block_type.nbytes + v_desc.block_type.nbytes
    for j in range(n_blocks):
        s = j % STAGES
        # the stage's previous round (j - STAGES) released by both consumers
        mbarrier.wait(empty.index(s), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
        mbarrier.expect(ready.index(s), kv_bytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + j * BN, 0], ready.index(s), k_s.index(s))
        tma.async_copy_global_to_shared(v_desc, [bh // H, bh % H, j * BN, 0], ready.index(s), v_s.index(s))


@gluon.jit
def _softmax(sc, col_ok, rm, m_i, l_i, MASK: gl.constexpr = True, ROW_SUM_PARTS: gl.constexpr = 0):
    """One block's int32 scores -> (x = exp2(t - m_new) in float32, alpha, l, m): the Triton kernel's ``_softmax16``
    (the same operations in the same order, the row sum's too with ROW_SUM_PARTS = 0: ``_row_sum``); with MASK, keys
    where ``col_ok`` is false are -inf (a compare and a select per score, 16 % of the loop's instructions: whole
    blocks skip it). x is rounded to 16 bits where the P V product is issued (``_issue_pv``): a 16-bit P carried
    across iterations cost ptxas a PRMT per register."""
    qk = sc.to(gl.float32)
    sm = sc
    if MASK:
        qk = gl.where(col_ok[None, :], qk, float("-inf"))
        sm = gl.where(col_ok[None, :], sm, -2147483647 - 1)
    # the row max of the int32 scores, converted once: the same value as the max of the converted scores (the
    # conversion is exact and monotone; rm >= 0 commutes with max), found by 3-input integer max instructions that
    # do not wait for the conversions (H200: 3.5-6.8 % faster kernel, NOTES item 75)
    m_new = gl.maximum(m_i, gl.max(sm, 1).to(gl.float32) * rm)
    alpha = gl.exp2(m_i - m_new)
    x = gl.exp2(qk * rm[:, None] - m_new[:, None])
    return x, alpha, l_i * alpha + _row_sum(x, l_i, ROW_SUM_PARTS), m_new


@gluon.jit
def _row_sum(x, l_i, PARTS: gl.constexpr):
    """x's row sums in l_i's layout: PARTS 0, ``gl.sum(x, 1)`` (the Triton kernel's order: one sequential chain of
    adds over a thread's keys of the row, then the shuffles across the row's lanes); else PARTS partial sums, each
    over the keys k with k % PARTS equal (x seen as [rows, BN / PARTS, PARTS]), then their sum: the wgmma layout
    keeps key k's lane and register pair in k % 8 and its 8-key group in k // 8, so with PARTS >= 8 each partial is
    a thread's own registers (shorter dependent chains, no more shuffles; 4 splits k % 8: two more shuffles per
    thread). Another summation order than the Triton kernel's."""
    if PARTS == 0:
        s = gl.sum(x, 1)
    else:
        parts = gl.sum(gl.reshape(x, [x.shape[0], x.shape[1] // PARTS, PARTS]), 1)
        s = gl.convert_layout(gl.sum(parts, 1), l_i.type.layout, assert_trivial=True)
    return s


@gluon.jit
def _issue_scores(q, k_s, ready, zero_s, j, STAGES: gl.constexpr):
    """Wait for key block j's stage, then issue its int8 Q K^T (not waited for)."""
    s = j % STAGES
    mbarrier.wait(ready.index(s), (j // STAGES) & 1)
    return warpgroup_mma(q, k_s.index(s).permute((1, 0)), zero_s, use_acc=False, is_async=True)


@gluon.jit
def _issue_pv(acc, x, alpha, v_s, j, row_o: gl.constexpr, STAGES: gl.constexpr):
    """Issue ``acc * alpha + P V[j]`` (P = x rounded to V's 16-bit type, from registers; 16-bit wgmma, not waited
    for) on key block j's stage."""
    BN: gl.constexpr = v_s.shape[3]
    HEAD_DIM: gl.constexpr = v_s.shape[4]
    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
    p = gl.convert_layout(x.to(v_s.dtype), gl.DotOperandLayout(operand_index=0, parent=acc.type.layout, k_width=2))
    return warpgroup_mma(p, v_s.index(j % STAGES).reshape([BN, HEAD_DIM]), acc, is_async=True)


@gluon.jit
def _take_turn(turn, j, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """With PINGPONG, wait until the other consumer has issued its products of this round (round j)."""
    if PINGPONG:
        mbarrier.wait(turn.index(WG), j & 1)


@gluon.jit
def _pass_turn(turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """With PINGPONG, let the other consumer issue its products of this round."""
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG), count=1)


@gluon.jit
def _deferred_step(q, k_s, v_s, ready, empty, turn, zero_s, ks_base, acc, x, alpha, l_i, m_i, cols, rm_q, S_kv, j,
                   row_o: gl.constexpr, STAGES: gl.constexpr, MASK: gl.constexpr, WG: gl.constexpr,
                   PINGPONG: gl.constexpr, ROW_SUM_PARTS: gl.constexpr):
    """``defer``'s iteration j >= 1: issue S[j], issue P[j-1] V[j-1], wait for S[j] only, the softmax of S[j] under
    P[j-1] V[j-1] (in the SASS only its row max: ptxas moves the wait up, item 75), wait for it, release stage j - 1
    (both products finish in the iteration that issued them: the form ptxas keeps, item 59). With PINGPONG the two
    consumers issue their products in turns (FlashAttention-3's inter-warpgroup schedule: one's softmax runs while the
    other's products do). Returns block j's (x, alpha, l, m) and the accumulator through block j - 1."""
    BN: gl.constexpr = k_s.shape[1]
    k_scale = gl.load(ks_base + j)
    _take_turn(turn, j, WG, PINGPONG)
    sc = _issue_scores(q, k_s, ready, zero_s, j, STAGES)
    acc = _issue_pv(acc, x, alpha, v_s, j - 1, row_o, STAGES)
    _pass_turn(turn, WG, PINGPONG)
    sc = warpgroup_mma_wait(num_outstanding=1, deps=(sc,))
    x, alpha, l_i, m_i = _softmax(sc, cols < S_kv - j * BN, rm_q * k_scale, m_i, l_i, MASK, ROW_SUM_PARTS)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index((j - 1) % STAGES), count=1)
    return x, alpha, l_i, m_i, acc


@gluon.jit
def _consumer(q_s, k_s, v_s, q_bar, ready, empty, turn, qs_ptr, ks_ptr, out_ptr, qk_mult, S_q, S_kv, n_blocks, H,
              bh, pid_m, stride_ob, stride_oh, stride_os, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
              DEFER: gl.constexpr, PINGPONG: gl.constexpr, ROW_SUM_PARTS: gl.constexpr, WG: gl.constexpr):
    """Rows [64 WG, 64 WG + 64) of the program's Q tile: the 16-bit P V online softmax over every key block."""
    BN: gl.constexpr = k_s.shape[1]
    s_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
    o_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, HEAD_DIM, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_mma)
    row_o: gl.constexpr = gl.SliceLayout(1, o_mma)

    rows = pid_m * 128 + WG * HALF_M + gl.arange(0, HALF_M, layout=row_s)
    rm_q = gl.load(qs_ptr + bh.to(gl.int64) * S_q + rows, mask=rows < S_q, other=0.0) * qk_mult
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, s_mma))
    ks_base = ks_ptr + bh * n_blocks
    zero_s = gl.zeros((HALF_M, BN), gl.int32, layout=s_mma)
    acc = gl.zeros((HALF_M, HEAD_DIM), gl.float32, layout=o_mma)
    m_i = gl.full((HALF_M,), float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros((HALF_M,), gl.float32, layout=row_s)
    q = q_s.index(WG)
    mbarrier.wait(q_bar, 0)
    k_scale = gl.load(ks_base)
    if DEFER:
        # block 0's scores and softmax, then ``_deferred_step`` for blocks 1 .. n_blocks - 1 (the whole blocks
        # unmasked, then the partial last one if any), then the last P V; with PINGPONG consumer 0 takes the first
        # turn of each of the n_blocks + 1 rounds of issues
        if WG == 1:
            _pass_turn(turn, WG, PINGPONG)
        _take_turn(turn, 0, WG, PINGPONG)
        sc = _issue_scores(q, k_s, ready, zero_s, 0, STAGES)
        _pass_turn(turn, WG, PINGPONG)
        sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc,))
        x, alpha, l_i, m_i = _softmax(sc, cols < S_kv, rm_q * k_scale, m_i, l_i, True, ROW_SUM_PARTS)
        n_whole = S_kv // BN
        for j in range(1, n_whole):
            x, alpha, l_i, m_i, acc = _deferred_step(q, k_s, v_s, ready, empty, turn, zero_s, ks_base, acc, x, alpha,
                                                     l_i, m_i, cols, rm_q, S_kv, j, row_o, STAGES, False, WG,
                                                     PINGPONG, ROW_SUM_PARTS)
        for j in range(gl.maximum(n_whole, 1), n_blocks):
            x, alpha, l_i, m_i, acc = _deferred_step(q, k_s, v_s, ready, empty, turn, zero_s, ks_base, acc, x, alpha,
                                                     l_i, m_i, cols, rm_q, S_kv, j, row_o, STAGES, True, WG,
                                                     PINGPONG, ROW_SUM_PARTS)
        _take_turn(turn, n_blocks, WG, PINGPONG)
        acc = _issue_pv(acc, x, alpha, v_s, n_blocks - 1, row_o, STAGES)
        if WG == 0:  # consumer 1's last round needs this turn; consumer 0 has none left to wait for
            _pass_turn(turn, WG, PINGPONG)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index((n_blocks - 1) % STAGES), count=1)
    else:
        for j in range(n_blocks):
            k_next = gl.load(ks_base + gl.minimum(j + 1, n_blocks - 1))  # one block ahead: its latency hidden
            sc = _issue_scores(q, k_s, ready, zero_s, j, STAGES)
            sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc,))
            x, alpha, l_i, m_i = _softmax(sc, cols < S_kv - j * BN, rm_q * k_scale, m_i, l_i, True, ROW_SUM_PARTS)
            acc = _issue_pv(acc, x, alpha, v_s, j, row_o, STAGES)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index(j % STAGES), count=1)
            k_scale = k_next

    store_rows(acc * gl.convert_layout(1.0 / l_i, row_o)[:, None], out_ptr, pid_m * 128 + WG * HALF_M, bh, H, S_q,
               stride_ob, stride_oh, stride_os, 4)


@gluon.jit
def _gluon_ws_attention_kernel(q_desc, k_desc, v_desc, qs_ptr, ks_ptr, out_ptr, qk_mult, S_q, S_kv, n_blocks, H,
                               stride_ob, stride_oh, stride_os, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr,
                               CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, DEFER: gl.constexpr,
                               PINGPONG: gl.constexpr, ROW_SUM_PARTS: gl.constexpr, num_warps: gl.constexpr):
    BN: gl.constexpr = k_desc.block_type.shape[0]
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    q_s = gl.allocate_shared_memory(q_desc.dtype, [2, HALF_M, HEAD_DIM], q_desc.layout)
    k_s = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BN, HEAD_DIM], k_desc.layout)
    v_s = gl.allocate_shared_memory(v_desc.dtype, [STAGES, 1, 1, BN, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # PINGPONG: consumer w's turn
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers release a stage
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    q_row = bh * S_q + pid_m * 128
    kv_row = bh * S_kv
    gl.warp_specialize([
        (_consumer, (q_s, k_s, v_s, q_bar, ready, empty, turn, qs_ptr, ks_ptr, out_ptr, qk_mult, S_q, S_kv, n_blocks,
                     H, bh, pid_m, stride_ob, stride_oh, stride_os, HEAD_DIM, STAGES, DEFER, PINGPONG, ROW_SUM_PARTS,
                     0)),
        (_consumer, (q_s, k_s, v_s, q_bar, ready, empty, turn, qs_ptr, ks_ptr, out_ptr, qk_mult, S_q, S_kv, n_blocks,
                     H, bh, pid_m, stride_ob, stride_oh, stride_os, HEAD_DIM, STAGES, DEFER, PINGPONG, ROW_SUM_PARTS,
                     1)),
        (_producer, (q_desc, k_desc, v_desc, q_s, k_s, v_s, q_bar, ready, empty, q_row, kv_row, bh, H, n_blocks,
                     STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
        mbarrier.invalidate(empty.index(i))
    for i in gl.static_range(2):
        mbarrier.invalidate(turn.index(i))


def attention_quantized(qa: QuantizedQKV, sm_scale: float, out: torch.Tensor,
                        cfg: GluonWsAttentionConfig = DEFAULT) -> torch.Tensor:
    """The kernel on ``triton_attention.quantize(q, k, v, cfg.quant_config())``'s output into ``out [B, H, S_q, D]``
    (unit stride along D) on an SM 9.x GPU; returns out. Raises ValueError for other inputs."""
    check_inputs("gluon_attention_ws", qa, out, "16bit", cfg.block_n)
    return launch(qa, sm_scale, out, cfg)


def launch(qa: QuantizedQKV, sm_scale: float, out: torch.Tensor,
           cfg: GluonWsAttentionConfig = DEFAULT) -> torch.Tensor:
    """``attention_quantized`` without its checks (the offline check compiles this launch for sm_90 on CPU
    tensors); returns out."""
    b, h, s_q, s_kv, d = qa.shape
    if s_q == 0 or b * h == 0 or s_kv == 0:
        return out
    v = qa.v if tma_ok(qa.v) else qa.v.contiguous()  # [B, H, S_kv, D]: keys past S_kv read as 0 per head
    i8 = gl.int8
    vdt = gl.bfloat16 if v.dtype == torch.bfloat16 else gl.float16
    q_desc = TensorDescriptor(qa.q, list(qa.q.shape), [d, 1], [HALF_M.value, d],
                              gl.NVMMASharedLayout.get_default_for([HALF_M.value, d], i8))
    k_desc = TensorDescriptor(qa.k, list(qa.k.shape), [d, 1], [cfg.block_n, d],
                              gl.NVMMASharedLayout.get_default_for([cfg.block_n, d], i8))
    v_desc = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, cfg.block_n, d],
                              gl.NVMMASharedLayout.get_default_for([1, 1, cfg.block_n, d], vdt))
    n_blocks = qa.k_scale.shape[1]
    grid = (-(-s_q // BLOCK_M), b * h)
    _gluon_ws_attention_kernel[grid](q_desc, k_desc, v_desc, qa.q_scale, qa.k_scale, out, float(sm_scale * LOG2E),
                                     s_q, s_kv, n_blocks, h, out.stride(0), out.stride(1), out.stride(2),
                                     HEAD_DIM=d, STAGES=cfg.stages, CONSUMER_REGS=cfg.consumer_regs,
                                     PRODUCER_REGS=cfg.producer_regs, DEFER=cfg.defer, PINGPONG=cfg.pingpong,
                                     ROW_SUM_PARTS=cfg.row_sum_parts, num_warps=NUM_WARPS)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
              cfg: GluonWsAttentionConfig = DEFAULT) -> torch.Tensor:
    """Quantize (``triton_attention.quantize``), then attend: ``[B, H, S_q, D]`` in q's dtype."""
    from . import triton_attention

    out = torch.empty_like(q)
    return attention_quantized(triton_attention.quantize(q, k, v, cfg.quant_config()), sm_scale, out, cfg)
