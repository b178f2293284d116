"""INT8 GEMM for Hopper written in Gluon, with each wgmma product left in flight while the next is issued.

``out[m, n] = ((acc[m, n] * x_scale[m]) * w_scale[n or 0]) + bias[n]``, ``acc = xq @ wq.T`` in int32 (the
epilogue of ``triton_gemm``, the same order of float operations).

Why a second kernel: Triton 3.6's Hopper pipeliner makes a wgmma "properly async" (issued while the previous
K step's product is still running, ``wgmma.wait_group 1``) only when its accumulator is float32 (its
``dotCanBeProperlyAsync``, rule 2.1). An INT8 product accumulates in int32, so every K step of
``triton_gemm``'s kernels waits for its own wgmma before the next is issued (``wgmma.wait_group 0``: checked
offline with ``bench/check_ptx_attention.wgmma_overlap``; an fp16 GEMM of the same shape gets ``wait_group 1``).
Gluon, Triton's lower-level language, states the wait itself: here ``warpgroup_mma(..., is_async=True)`` and
``warpgroup_mma_wait(num_outstanding=1)``, so one product is always queued behind the running one.

Form: one program per [BLOCK_M, BLOCK_N] output tile in grouped order (or, ``persistent``, a fixed grid walking
the tiles with the next tile's first loads issued before this tile's epilogue), operands through TMA descriptors
into a ring of ``stages`` shared-memory buffers (one mbarrier each), both operands K-major (``wq`` is [N, K]),
the epilogue in registers and stored through pointers with masks. TMA zero-fills reads past M, N and K.

Dispatched as Hopper's large-M row (``configs.HOPPER_GLUON_LARGE``: the 128 x 128 x 128 tiled form, 3 stages,
registers capped at 128 for two programs per SM; bench/NOTES.md item 60; past 8192 rows ``HOPPER_GLUON_XL``, 128 x
256 x 128 tiles, one program an SM, item 92) through ``triton_gemm.gemm``, which
records its launches for replay (``launch_args``); the other forms are for the benchmarks. ``_gluon_glu_kernel``
is that row's form for a SwiGLU's gate and up projections on the same rows: one wgmma of width 128 computes 64
columns of each, and the epilogue writes only ``silu(g) * u`` (``glu_launch_args``; ``kernels.fused.glu_gemm``).
Needs SM 9.0, a compiled (not interpreted) Triton, and TMA-legal operands: ``xq`` [M, K] and ``wq`` [N, K]
with unit column stride, K % 16 == 0 and 16-byte aligned rows (``supports``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .configs import gluon_tile_problem
from .launch import tma_ok
from .triton_fused import TIMES_SIGMOID_PTX

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class GluonGemmConfig:
    """Tile and launch of the Gluon GEMM: ``block_m`` = 16 * num_warps rows (every warp owns 16 rows of the
    wgmma layout), ``block_n`` 64, 128 or 256 (an 8-bit wgmma's N is at most 224: 256 runs as two of 128),
    ``block_k`` a multiple of 32, ``stages`` TMA buffers in the ring (>= 2: one product in flight needs its
    buffer kept while the next one's is read). ``persistent``: ``ctas_per_sm`` programs per SM walk the tiles, the
    next tile's first loads issued before this tile's epilogue (``_gluon_gemm_persistent_kernel``).
    ``max_registers`` (0: the compiler's choice) caps each thread's registers (ptxas ``maxnreg``): 128 at 8 warps
    lets two programs share an SM (65,536 registers), so one's epilogue runs under the other's K loop; the
    epilogue then spills a few registers (the K loop does not: checked in the SASS, bench/NOTES.md item 59)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    stages: int = 4
    num_warps: int = 8
    group_m: int = 8
    persistent: bool = False
    ctas_per_sm: int = 1
    max_registers: int = 0

    def __post_init__(self) -> None:
        problem = gluon_tile_problem(self.block_m, self.block_n, self.block_k, self.num_warps, self.stages,
                                     self.max_registers, stages_field="stages")
        if problem is not None:
            raise ValueError(f"GluonGemmConfig: {problem}")
        if self.group_m < 1 or self.ctas_per_sm < 1:
            raise ValueError(f"GluonGemmConfig: group_m >= 1 and ctas_per_sm >= 1, got {self.group_m}, "
                             f"{self.ctas_per_sm}")

    def launch_options(self) -> dict:
        """Compiler options of the launch beyond num_warps: ``maxnreg`` where ``max_registers`` is set."""
        return {"maxnreg": self.max_registers} if self.max_registers else {}

    @property
    def shared_bytes(self) -> int:
        """Shared memory of the operand ring (the epilogue's layout conversion reuses it)."""
        return self.stages * (self.block_m + self.block_n) * self.block_k


DEFAULT = GluonGemmConfig()
# No mul + add contracted into an FMA: the epilogue rounds each product and sum as the twin and triton_gemm do
# (with contraction, 1 ulp off in float32 outputs and a rounding flip in a few bf16 ones: bench/NOTES.md item 58).
FP_FUSION = False


@gluon.jit
def _tile_offsets(tile, M, N, BM: gl.constexpr, BN: gl.constexpr, GROUP_M: gl.constexpr):
    """The (row, column) origin of output tile ``tile`` in grouped order: GROUP_M rows of tiles walk the N tiles
    together, so their weight tiles are reused from L2."""
    grid_m = gl.cdiv(M, BM)
    width = GROUP_M * gl.cdiv(N, BN)
    first_m = (tile // width) * GROUP_M
    size_m = gl.minimum(grid_m - first_m, GROUP_M)
    return (first_m + (tile % width) % size_m) * BM, ((tile % width) // size_m) * BN


@gluon.jit
def _ring(a_desc, b_desc, STAGES: gl.constexpr, PAIR: gl.constexpr = False):
    """The operand ring: ``STAGES`` buffers of each operand's tile and one initialized mbarrier per buffer (PAIR:
    B buffers of two of b_desc's tiles, the SwiGLU GEMM's gate and up rows)."""
    a_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES, a_desc.block_type.shape[0], a_desc.block_type.shape[1]],
                                    a_desc.layout)
    b_rows: gl.constexpr = b_desc.block_type.shape[0] * (2 if PAIR else 1)
    b_s = gl.allocate_shared_memory(b_desc.dtype, [STAGES, b_rows, b_desc.block_type.shape[1]], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    return a_s, b_s, ready


@gluon.jit
def _load_step(a_desc, b_desc, a_s, b_s, ready, stage, off_m, off_n, k, u_desc=None, PAIR: gl.constexpr = False,
               off_u=0):
    """TMA loads of one K step's operand tiles into ring buffer ``stage``, signalled on its barrier. PAIR: the B
    tiles of ``b_desc`` at row ``off_n`` and of ``u_desc`` at row ``off_u`` into the two halves of the B buffer
    (the SwiGLU GEMM's gate and up rows, or two halves of a wider tile: one wgmma for both)."""
    if PAIR:
        half: gl.constexpr = b_desc.block_type.shape[0]
        mbarrier.expect(ready.index(stage), a_desc.block_type.nbytes + 2 * b_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(a_desc, [off_m, k], ready.index(stage), a_s.index(stage))
        tma.async_copy_global_to_shared(b_desc, [off_n, k], ready.index(stage), b_s.index(stage).slice(0, half))
        tma.async_copy_global_to_shared(u_desc, [off_u, k], ready.index(stage), b_s.index(stage).slice(half, half))
    else:
        mbarrier.expect(ready.index(stage), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(a_desc, [off_m, k], ready.index(stage), a_s.index(stage))
        tma.async_copy_global_to_shared(b_desc, [off_n, k], ready.index(stage), b_s.index(stage))


@gluon.jit
def _tile_product(a_desc, b_desc, off_m, off_n, K, STAGES: gl.constexpr, num_warps: gl.constexpr, u_desc=None,
                  PAIR: gl.constexpr = False, off_u=0):
    """The int32 product of one output tile over all of K: its ring, the first ``STAGES - 1`` loads, then per K step
    a wgmma left in flight while the previous one's buffer takes the next load (the tiled kernels' main loop).
    PAIR: ``b_desc``'s rows from ``off_n`` and ``u_desc``'s from ``off_u`` side by side, one wgmma twice as wide
    (``_load_step``)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0] * (2 if PAIR else 1)
    a_s, b_s, ready = _ring(a_desc, b_desc, STAGES, PAIR)
    acc = gl.zeros((BM, BN), gl.int32, layout=_mma_layout(BN, num_warps))
    k_tiles = gl.cdiv(K, BK)
    for i in gl.static_range(STAGES - 1):  # the ring's first loads
        if i < k_tiles:
            _load_step(a_desc, b_desc, a_s, b_s, ready, i, off_m, off_n, i * BK, u_desc, PAIR, off_u)
    for kt in range(k_tiles):
        s = kt % STAGES
        mbarrier.wait(ready.index(s), (kt // STAGES) & 1)
        acc = warpgroup_mma(a_s.index(s), b_s.index(s).permute((1, 0)), acc, is_async=True)
        # the previous K step's product is done (this one stays in flight), so its buffer takes the next load
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        nk = kt + STAGES - 1
        if nk < k_tiles:
            _load_step(a_desc, b_desc, a_s, b_s, ready, nk % STAGES, off_m, off_n, nk * BK, u_desc, PAIR, off_u)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
    return acc


@gluon.jit
def _epilogue(acc, out_ptr, xs_ptr, ws_ptr, bias_ptr, gate_ptr, M, N, stride_om, stride_gb, rows_per_batch,
              off_m, off_n, PER_ROW: gl.constexpr, HAS_BIAS: gl.constexpr, RESIDUAL: gl.constexpr,
              num_warps: gl.constexpr):
    """``((acc * x_scale) * w_scale) + bias`` (the twin's order) of one finished tile, stored with masks; with
    RESIDUAL ``out`` holds a residual and becomes ``residual + gate[row // rows_per_batch] * y`` in float32,
    rounded once (``triton_gemm._gated``'s order)."""
    mma: gl.constexpr = acc.type.layout
    BM: gl.constexpr = acc.type.shape[0]
    BN: gl.constexpr = acc.type.shape[1]
    rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
    xs = gl.load(xs_ptr + rows, mask=rows < M, other=0.0)
    if PER_ROW:
        ws = gl.load(ws_ptr + cols, mask=cols < N, other=0.0)
        y = (acc.to(gl.float32) * xs[:, None]) * ws[None, :]
    else:
        y = (acc.to(gl.float32) * xs[:, None]) * gl.load(ws_ptr)
    if HAS_BIAS:
        y = y + gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)[None, :]
    # loads and stores of 16 bytes per thread along a row instead of the wgmma layout's pairs (the residual's
    # addresses in the wgmma layout took the kernel past 255 registers)
    store: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    if RESIDUAL:
        y = gl.convert_layout(y, store)
    else:
        y = gl.convert_layout(y.to(out_ptr.dtype.element_ty), store)
    rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, store))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, store))
    ok = (rows[:, None] < M) & (cols[None, :] < N)
    ptrs = out_ptr + rows.to(gl.int64)[:, None] * stride_om + cols[None, :]
    if RESIDUAL:
        batch = (rows // rows_per_batch).to(gl.int64)
        g = gl.load(gate_ptr + batch[:, None] * stride_gb + cols[None, :], mask=ok, other=0.0)
        y = (gl.load(ptrs, mask=ok, other=0.0).to(gl.float32) + g.to(gl.float32) * y).to(out_ptr.dtype.element_ty)
    gl.store(ptrs, y, mask=ok)


@gluon.constexpr_function
def _mma_layout(block_n, num_warps):
    # an 8-bit wgmma's N is at most 224: a 256-wide tile runs as two 128-wide products
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                     instr_shape=[16, 128 if block_n > 128 else block_n, 32])


@gluon.jit
def _gluon_gemm_kernel(a_desc, b_desc, out_ptr, xs_ptr, ws_ptr, bias_ptr, gate_ptr, M, N, K, stride_om, stride_gb,
                       rows_per_batch, PER_ROW: gl.constexpr, HAS_BIAS: gl.constexpr, RESIDUAL: gl.constexpr,
                       STAGES: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
    """One program per output tile."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    off_m, off_n = _tile_offsets(gl.program_id(0), M, N, BM, BN, GROUP_M)
    acc = _tile_product(a_desc, b_desc, off_m, off_n, K, STAGES, num_warps)
    _epilogue(acc, out_ptr, xs_ptr, ws_ptr, bias_ptr, gate_ptr, M, N, stride_om, stride_gb, rows_per_batch, off_m,
              off_n, PER_ROW, HAS_BIAS, RESIDUAL, num_warps)


@gluon.jit
def _next_load(lk, lt, lm, ln, first, programs, k_tiles, M, N, BM: gl.constexpr, BN: gl.constexpr,
               GROUP_M: gl.constexpr):
    """The load cursor one K step on: (K step, tile number, tile origin) of this program's next load. The tile's
    origin is recomputed only when the cursor enters the next tile (its integer divisions once a tile, not once a
    K step)."""
    lk += 1
    if lk == k_tiles:
        lk = 0
        lt += 1
        lm, ln = _tile_offsets(first + lt * programs, M, N, BM, BN, GROUP_M)
    return lk, lt, lm, ln


@gluon.jit
def _gluon_gemm_persistent_kernel(a_desc, b_desc, out_ptr, xs_ptr, ws_ptr, bias_ptr, gate_ptr, M, N, K, stride_om,
                                  stride_gb, rows_per_batch, PER_ROW: gl.constexpr, HAS_BIAS: gl.constexpr,
                                  RESIDUAL: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                                  num_warps: gl.constexpr):
    """A fixed grid of programs, each walking the tiles ``pid, pid + programs, ...``. One counter ``c`` numbers
    this program's (tile, K step) pairs across tiles, so the ring's loads run ``STAGES - 1`` steps ahead over tile
    boundaries: the next tile's first K steps are loaded before this tile's epilogue and land while it runs. The
    loads follow a cursor (``_next_load``) instead of dividing the step number by K's tiles at every step.

    The tiles and their K steps are two nested loops, the epilogue after the inner one: with one flat loop and the
    epilogue under a branch in it, the accumulator reached the loop head from two places and ptxas waited for
    every wgmma there (its note C7517; 0.33-0.72x the tiled form on the H200, bench/NOTES.md item 58). Without the
    note it still ran at 0.54-0.69x (item 59), with ~5 integer divisions a K step for the loads' tile origin."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    first = gl.program_id(0)
    programs = gl.num_programs(0)
    k_tiles = gl.cdiv(K, BK)
    my_tiles = gl.cdiv(gl.cdiv(M, BM) * gl.cdiv(N, BN) - first, programs)
    steps = my_tiles * k_tiles  # this program's (tile, K step) pairs
    a_s, b_s, ready = _ring(a_desc, b_desc, STAGES)
    lk = 0
    lt = 0
    lm, ln = _tile_offsets(first, M, N, BM, BN, GROUP_M)
    for i in gl.static_range(STAGES - 1):
        if i < steps:
            _load_step(a_desc, b_desc, a_s, b_s, ready, i, lm, ln, lk * BK)
            lk, lt, lm, ln = _next_load(lk, lt, lm, ln, first, programs, k_tiles, M, N, BM, BN, GROUP_M)
    c = 0
    for t in range(my_tiles):
        acc = gl.zeros((BM, BN), gl.int32, layout=_mma_layout(BN, num_warps))
        for _kt in range(k_tiles):
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            acc = warpgroup_mma(a_s.index(s), b_s.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if c + STAGES - 1 < steps:  # into the buffer of step c - 1, whose product is done
                _load_step(a_desc, b_desc, a_s, b_s, ready, (c + STAGES - 1) % STAGES, lm, ln, lk * BK)
                lk, lt, lm, ln = _next_load(lk, lt, lm, ln, first, programs, k_tiles, M, N, BM, BN, GROUP_M)
            c += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        off_m, off_n = _tile_offsets(first + t * programs, M, N, BM, BN, GROUP_M)
        _epilogue(acc, out_ptr, xs_ptr, ws_ptr, bias_ptr, gate_ptr, M, N, stride_om, stride_gb, rows_per_batch,
                  off_m, off_n, PER_ROW, HAS_BIAS, RESIDUAL, num_warps)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))


@gluon.jit
def _glu_epilogue(acc, out_ptr, xs_ptr, gs_ptr, us_ptr, gb_ptr, ub_ptr, M, F, stride_om, off_m, off_f,
                  PER_ROW: gl.constexpr, HAS_BIAS: gl.constexpr, num_warps: gl.constexpr):
    """The SwiGLU of one finished tile: ``acc [BM, 2 * BH]`` holds the gate's products for outputs
    ``off_f + c`` in columns ``c < BH`` and the up projection's in ``BH + c``. Each half becomes
    ``((acc * x_scale) * w_scale) + bias`` rounded to the output dtype (what the two GEMMs would write), then
    ``h = g * sigmoid(g) * u`` in float32, rounded once and stored as ``out [M, F]`` with masks."""
    mma: gl.constexpr = acc.type.layout
    BM: gl.constexpr = acc.type.shape[0]
    BN: gl.constexpr = acc.type.shape[1]
    BH: gl.constexpr = BN // 2
    rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    c = gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
    up = c >= BH
    f = off_f + gl.where(up, c - BH, c)
    ok = f < F
    xs = gl.load(xs_ptr + rows, mask=rows < M, other=0.0)
    if PER_ROW:
        ws = gl.where(up, gl.load(us_ptr + f, mask=up & ok, other=0.0), gl.load(gs_ptr + f, mask=(~up) & ok, other=0.0))
    else:
        ws = gl.where(up, gl.load(us_ptr + c * 0), gl.load(gs_ptr + c * 0))
    y = (acc.to(gl.float32) * xs[:, None]) * ws[None, :]
    if HAS_BIAS:
        b = gl.where(up, gl.load(ub_ptr + f, mask=up & ok, other=0.0), gl.load(gb_ptr + f, mask=(~up) & ok, other=0.0))
        y = y + b.to(gl.float32)[None, :]
    y = y.to(out_ptr.dtype.element_ty).to(gl.float32)  # the rounding of the two GEMMs' outputs
    # column c and c + BH sit in one thread's registers (the wgmma layout repeats every 8 columns): the split is free
    g, u = gl.split(gl.permute(gl.reshape(y, [BM, 2, BH]), [0, 2, 1]))
    # silu(g) as the SwiGLU quantizer's fast form computes it (``triton_fused.TIMES_SIGMOID_PTX``: 5 instructions
    # instead of exp's and the division's range fix-ups, ~12; bench/NOTES.md item 90)
    h = gl.inline_asm_elementwise(TIMES_SIGMOID_PTX, "=r,r,r", [g, g], dtype=gl.float32, is_pure=True, pack=1) * u
    store: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    h = gl.convert_layout(h.to(out_ptr.dtype.element_ty), store)
    rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, store))
    cols = off_f + gl.arange(0, BH, layout=gl.SliceLayout(0, store))
    ptrs = out_ptr + rows.to(gl.int64)[:, None] * stride_om + cols[None, :]
    gl.store(ptrs, h, mask=(rows[:, None] < M) & (cols[None, :] < F))


@gluon.jit
def _gluon_glu_kernel(a_desc, g_desc, u_desc, out_ptr, xs_ptr, gs_ptr, us_ptr, gb_ptr, ub_ptr, M, F, K, stride_om,
                      G_ROW, U_ROW, head_ptr, hs_ptr, hb_ptr, HEAD_N, stride_hm, PER_ROW: gl.constexpr,
                      HAS_BIAS: gl.constexpr, HEAD: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                      num_warps: gl.constexpr):
    """One program per [BM, BH] tile of ``h = silu(x @ w_gate.T) * (x @ w_up.T)``: each K step loads the gate's BH
    weight rows (``g_desc`` from row ``G_ROW``) and the up projection's (``u_desc`` from ``U_ROW``) into the two
    halves of one [2 * BH, BK] buffer, so one wgmma of width 2 * BH computes both (``_tile_product`` with PAIR: the
    tiled form of ``_gluon_gemm_kernel``, its ring and its wait).

    HEAD (one weight ``[HEAD_N | gate | up]`` behind both descriptors, FLUX.2's single-block linear1): the first
    programs compute the plain GEMM of its first HEAD_N rows into ``head [M, HEAD_N]`` (its scales ``hs``, bias
    ``hb``) in [BM, 2 * BH] tiles, the tile's two halves loaded as the SwiGLU's are, with the plain epilogue; one
    launch for both parts, so their tiles share the waves (two launches would add a partial one)."""
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BH: gl.constexpr = g_desc.block_type.shape[0]
    pid = gl.program_id(0)
    if HEAD:
        head_tiles = gl.cdiv(M, BM) * gl.cdiv(HEAD_N, 2 * BH)
        if pid < head_tiles:
            off_m, off_n = _tile_offsets(pid, M, HEAD_N, BM, 2 * BH, GROUP_M)
            row_g = off_n
            row_u = off_n + BH
        else:
            off_m, off_n = _tile_offsets(pid - head_tiles, M, F, BM, BH, GROUP_M)
            row_g = G_ROW + off_n
            row_u = U_ROW + off_n
        acc = _tile_product(a_desc, g_desc, off_m, row_g, K, STAGES, num_warps, u_desc, True, row_u)
        if pid < head_tiles:
            _epilogue(acc, head_ptr, xs_ptr, hs_ptr, hb_ptr, hs_ptr, M, HEAD_N, stride_hm, 0, 1, off_m, off_n,
                      PER_ROW, HAS_BIAS, False, num_warps)
        else:
            _glu_epilogue(acc, out_ptr, xs_ptr, gs_ptr, us_ptr, gb_ptr, ub_ptr, M, F, stride_om, off_m, off_n,
                          PER_ROW, HAS_BIAS, num_warps)
    else:
        off_m, off_f = _tile_offsets(pid, M, F, BM, BH, GROUP_M)
        acc = _tile_product(a_desc, g_desc, off_m, G_ROW + off_f, K, STAGES, num_warps, u_desc, True, U_ROW + off_f)
        _glu_epilogue(acc, out_ptr, xs_ptr, gs_ptr, us_ptr, gb_ptr, ub_ptr, M, F, stride_om, off_m, off_f, PER_ROW,
                      HAS_BIAS, num_warps)


def supports(xq: torch.Tensor, wq: torch.Tensor) -> str | None:
    """Why the Gluon GEMM cannot take these operands (None: it can): TMA needs int8 rows with unit column
    stride, row strides and base addresses that are multiples of 16 bytes, and K % 16 == 0; a CUDA SM 9.x GPU."""
    for name, t in (("xq", xq), ("wq", wq)):
        if t.dtype != torch.int8 or t.dim() != 2:
            return f"{name}: expected a 2-D int8 tensor"
        if not tma_ok(t):
            return f"{name}: rows must be contiguous and 16-byte aligned (TMA)"
    if xq.shape[1] % 16 or xq.shape[1] != wq.shape[1]:
        return f"K = {xq.shape[1]}: must match the weight's and be a multiple of 16 (TMA)"
    if xq.device.type != "cuda" or torch.cuda.get_device_capability(xq.device)[0] != 9:
        return "needs an SM 9.x (Hopper) GPU"
    return None


def gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
         bias: torch.Tensor | None, out_dtype: torch.dtype, cfg: GluonGemmConfig = DEFAULT,
         residual: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """``out [M, N]`` in ``out_dtype`` (bf16/fp16/fp32) = ``((xq @ wq.T) * x_scale[m]) * w_scale + bias``.

    xq int8 ``[M, K]``, x_scale float32 ``[M]`` or ``[M, 1]``; wq int8 ``[N, K]``; w_scale float32 ``[N]``,
    ``[N, 1]`` or ``[]``; bias ``[N]`` (any float dtype) or None. With ``residual`` ``[M, N]`` (unit column
    stride; its dtype is the output's) and ``gate`` ``[B, N]`` (M divisible by B), ``residual`` is updated in
    place to ``residual + gate[row // (M / B)] * y`` and returned (``triton_gemm.gemm``'s gated residual add).
    Raises ValueError for operands ``supports`` rejects or a bad dtype."""
    why = supports(xq, wq)
    if why is not None:
        raise ValueError(f"gluon_gemm: {why}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"gluon_gemm: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if (residual is None) != (gate is None):
        raise ValueError("gluon_gemm: give residual and gate together, or neither")
    if residual is None:
        return launch(xq, x_scale, wq, w_scale, bias, torch.empty((xq.shape[0], wq.shape[0]), dtype=out_dtype,
                                                                  device=xq.device), cfg)
    m, n = xq.shape[0], wq.shape[0]
    if (tuple(residual.shape) != (m, n) or residual.stride(1) != 1 or residual.dtype != out_dtype
            or gate.dim() != 2 or gate.shape[1] != n or gate.stride(1) != 1 or m % gate.shape[0]):
        raise ValueError(f"gluon_gemm: residual must be [{m}, {n}] in {out_dtype} with unit column stride and gate "
                         f"[B, {n}] with M divisible by B; got {list(residual.shape)} and {list(gate.shape)}")
    return launch(xq, x_scale, wq, w_scale, bias, residual, cfg, gate)


def launch(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None, out: torch.Tensor, cfg: GluonGemmConfig = DEFAULT,
           gate: torch.Tensor | None = None) -> torch.Tensor:
    """``gemm`` into ``out [M, N]`` (unit column stride; with ``gate`` it holds the residual) without its checks
    (``bench_gluon_gemm --check`` compiles this launch for sm_90 on CPU tensors); returns out."""
    m, n = xq.shape[0], wq.shape[0]
    if m == 0 or n == 0:
        return out
    kernel, grid, args, kwargs = launch_args(xq, x_scale, wq, w_scale, bias, out, cfg, gate,
                                             m // gate.shape[0] if gate is not None else 1)
    kernel[grid](*args, **kwargs)
    return out


def launch_args(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out: torch.Tensor, cfg: GluonGemmConfig, gate: torch.Tensor | None,
                rows_per_batch: int) -> tuple:
    """``(kernel, grid, args, kwargs)`` of the launch ``kernel[grid](*args, **kwargs)`` for ``out [M, N]`` (M, N > 0):
    what ``launch`` runs, and what ``triton_gemm.gemm`` hands its recording launcher (``launch.FastLauncher``,
    whose replays substitute the descriptors' bases). ``rows_per_batch``: rows per entry of ``gate``'s batch."""
    m, k = xq.shape
    n = wq.shape[0]
    xs = x_scale.reshape(-1).float().contiguous()
    ws = w_scale.reshape(-1).float().contiguous()  # per-tensor: one element, read once
    a_desc = TensorDescriptor(xq, [m, k], [xq.stride(0), 1], [cfg.block_m, cfg.block_k],
                              _shared_layout(cfg.block_m, cfg.block_k))
    b_desc = TensorDescriptor(wq, [n, k], [wq.stride(0), 1], [cfg.block_n, cfg.block_k],
                              _shared_layout(cfg.block_n, cfg.block_k))
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    kernel, grid = _gluon_gemm_kernel, (tiles,)
    if cfg.persistent:  # (the offline launch check binds CPU tensors: an H200's 132 SMs there)
        sms = torch.cuda.get_device_properties(xq.device).multi_processor_count if xq.is_cuda else 132
        kernel, grid = _gluon_gemm_persistent_kernel, (min(tiles, sms * cfg.ctas_per_sm),)
    args = (a_desc, b_desc, out, xs, ws, bias if bias is not None else xs, gate if gate is not None else xs,
            m, n, k, out.stride(0), gate.stride(0) if gate is not None else 0, rows_per_batch)
    kwargs = dict(PER_ROW=w_scale.dim() > 0, HAS_BIAS=bias is not None, RESIDUAL=gate is not None,
                  STAGES=cfg.stages, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION,
                  **cfg.launch_options())
    return kernel, grid, args, kwargs


def glu_launch_args(xq: torch.Tensor, x_scale: torch.Tensor, gate: tuple, up: tuple, out: torch.Tensor,
                    cfg: GluonGemmConfig) -> tuple:
    """``(kernel, grid, args, kwargs)`` of the SwiGLU GEMM ``out [M, F] = silu(g) * u`` (M, F > 0; unit column
    stride), as ``launch_args`` gives them for the plain GEMM: ``g`` and ``u`` the GEMMs ``launch`` would write (each
    rounded to out's dtype) for ``gate = (wq [F, K] int8, w_scale, bias or None)`` and ``up`` likewise, both per-row
    or both per-tensor, a bias on both or neither; ``cfg.block_n`` is the wgmma's width, half gate columns, half up
    (the twin: ``reference_fused.glu_gemm``). What ``triton_gemm.gemm_glu`` launches; its rules are
    ``fused.glu_kernel_rule``'s (``supports`` for each weight) and its arguments ``fused.glu_gemm``'s checks."""
    (gq, gs, gb), (uq, us, ub) = gate, up
    return _glu_args(xq, x_scale, gq, uq, (gs, us), (gb, ub), out, cfg, 0, 0)


def split_glu_launch_args(xq: torch.Tensor, x_scale: torch.Tensor, weight: tuple, head: int, out_head: torch.Tensor,
                          out: torch.Tensor, cfg: GluonGemmConfig) -> tuple:
    """The SwiGLU GEMM's launch for one weight ``(wq [head + 2F, K] int8, w_scale [], [N] or [N, 1], bias [N] or
    None)`` whose rows are ``[head | gate | up]`` (head >= 1): ``out_head [M, head]`` its first rows' GEMM
    (``launch``'s values) and ``out [M, F] = silu(g) * u`` of the rest (the twin: ``reference_fused.split_glu_gemm``),
    one launch (``_gluon_glu_kernel`` with HEAD)."""
    wq, ws, bias = weight
    f = out.shape[1]
    per_row = ws.dim() > 0

    def part(t, start, size):
        return t.reshape(-1)[start:start + size] if t is not None and (t is bias or per_row) else t

    return _glu_args(xq, x_scale, wq, wq, (part(ws, head, f), part(ws, head + f, f)),
                     (part(bias, head, f), part(bias, head + f, f)), out, cfg, head, head + f,
                     (out_head, part(ws, 0, head), part(bias, 0, head)) if head else None)


def _glu_args(xq, x_scale, gq, uq, scales, biases, out, cfg, g_row, u_row, head=None) -> tuple:
    """The launch of ``_gluon_glu_kernel``: gate rows from ``g_row`` of ``gq``, up rows from ``u_row`` of ``uq``
    (two weights, or one weight twice), their scales and biases, and ``head`` = (out_head, scales, bias) or None."""
    m, k = xq.shape
    f = out.shape[1]
    half = cfg.block_n // 2
    xs = x_scale.reshape(-1).float().contiguous()
    a_desc = TensorDescriptor(xq, [m, k], [xq.stride(0), 1], [cfg.block_m, cfg.block_k],
                              _shared_layout(cfg.block_m, cfg.block_k))
    g_desc, u_desc = (TensorDescriptor(w, [w.shape[0], k], [w.stride(0), 1], [half, cfg.block_k],
                                       _shared_layout(half, cfg.block_k)) for w in (gq, uq))
    gs, us = (s.reshape(-1).float().contiguous() for s in scales)
    gb, ub = (b if b is not None else xs for b in biases)
    tiles = -(-m // cfg.block_m) * -(-f // half)
    if head is not None:
        out_head, hs, hb = head
        tiles += -(-m // cfg.block_m) * -(-out_head.shape[1] // cfg.block_n)
        head_args = (out_head, hs.reshape(-1).float().contiguous(), hb if hb is not None else xs, out_head.shape[1],
                     out_head.stride(0))
    else:
        head_args = (out, xs, xs, 0, 0)
    args = (a_desc, g_desc, u_desc, out, xs, gs, us, gb, ub, m, f, k, out.stride(0), g_row, u_row, *head_args)
    kwargs = dict(PER_ROW=scales[0].dim() > 0, HAS_BIAS=biases[0] is not None, HEAD=head is not None,
                  STAGES=cfg.stages, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, enable_fp_fusion=FP_FUSION,
                  **cfg.launch_options())
    return _gluon_glu_kernel, (tiles,), args, kwargs


@functools.cache
def _shared_layout(rows: int, cols: int):
    """The swizzled shared-memory layout of an int8 ``[rows, cols]`` TMA tile (one object per shape: it is part
    of the launch's specialization key)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.int8)
