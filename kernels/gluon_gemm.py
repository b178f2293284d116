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

Form: one program per [BLOCK_M, BLOCK_N] output tile in grouped order, operands through TMA descriptors into a
ring of ``stages`` shared-memory buffers (one mbarrier each), both operands K-major (``wq`` is [N, K]), the
epilogue in registers and stored through pointers with masks. TMA zero-fills reads past M, N and K.

Opt-in, not dispatched: measured against ``triton_gemm`` before it enters a table (bench/NOTES.md item 56).
Needs SM 9.0, a compiled (not interpreted) Triton, and TMA-legal operands: ``xq`` [M, K] and ``wq`` [N, K]
with unit column stride, K % 16 == 0 and 16-byte aligned rows (``supports``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class GluonGemmConfig:
    """Tile and launch of the Gluon GEMM: ``block_m`` = 16 * num_warps rows (every warp owns 16 rows of the
    wgmma layout), ``block_n`` 64, 128 or 256 (an 8-bit wgmma's N is at most 224: 256 runs as two of 128),
    ``block_k`` a multiple of 32, ``stages`` TMA buffers in the ring (>= 2: one product in flight needs its
    buffer kept while the next one's is read)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    stages: int = 4
    num_warps: int = 8
    group_m: int = 8

    def __post_init__(self) -> None:
        if self.num_warps not in (4, 8) or self.block_m != 16 * self.num_warps:
            raise ValueError(f"GluonGemmConfig: block_m must be 16 * num_warps with 4 or 8 warps, got block_m "
                             f"{self.block_m}, num_warps {self.num_warps}")
        if self.block_n not in (64, 128, 256) or self.block_k % 32 or not 32 <= self.block_k <= 256:
            raise ValueError(f"GluonGemmConfig: block_n in (64, 128, 256) and block_k a multiple of 32 up to 256, "
                             f"got {self.block_n}, {self.block_k}")
        if self.stages < 2 or self.group_m < 1:
            raise ValueError(f"GluonGemmConfig: stages >= 2 and group_m >= 1, got {self.stages}, {self.group_m}")

    @property
    def shared_bytes(self) -> int:
        """Shared memory of the operand ring (the epilogue's layout conversion reuses it)."""
        return self.stages * (self.block_m + self.block_n) * self.block_k


DEFAULT = GluonGemmConfig()


@gluon.jit
def _gluon_gemm_kernel(a_desc, b_desc, out_ptr, xs_ptr, ws_ptr, bias_ptr, M, N, K, stride_om,
                 PER_ROW: gl.constexpr, HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                 num_warps: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    INSTR_N: gl.constexpr = 128 if BN > 128 else BN  # an 8-bit wgmma's N is at most 224
    # grouped order: GROUP_M rows of tiles walk the N tiles together, so their weight tiles are reused from L2
    pid = gl.program_id(0)
    grid_m = gl.cdiv(M, BM)
    grid_n = gl.cdiv(N, BN)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = gl.minimum(grid_m - first_m, GROUP_M)
    off_m = (first_m + (pid % width) % size_m) * BM
    off_n = ((pid % width) // size_m) * BN

    a_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_s = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, INSTR_N, 32])
    acc = gl.zeros((BM, BN), gl.int32, layout=mma)
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    k_tiles = gl.cdiv(K, BK)
    for i in gl.static_range(STAGES - 1):  # the ring's first loads
        if i < k_tiles:
            mbarrier.expect(ready.index(i), nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, i * BK], ready.index(i), a_s.index(i))
            tma.async_copy_global_to_shared(b_desc, [off_n, i * BK], ready.index(i), b_s.index(i))
    for kt in range(k_tiles):
        s = kt % STAGES
        mbarrier.wait(ready.index(s), (kt // STAGES) & 1)
        acc = warpgroup_mma(a_s.index(s), b_s.index(s).permute((1, 0)), acc, is_async=True)
        # the previous K step's product is done (this one stays in flight), so its buffer takes the next load
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        nk = kt + STAGES - 1
        if nk < k_tiles:
            ns = nk % STAGES
            mbarrier.expect(ready.index(ns), nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, nk * BK], ready.index(ns), a_s.index(ns))
            tma.async_copy_global_to_shared(b_desc, [off_n, nk * BK], ready.index(ns), b_s.index(ns))
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))

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
    # stores of 16 bytes per thread along a row instead of the wgmma layout's pairs
    store: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    y = gl.convert_layout(y.to(out_ptr.dtype.element_ty), store)
    rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, store))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, store))
    ptrs = out_ptr + rows.to(gl.int64)[:, None] * stride_om + cols[None, :]
    gl.store(ptrs, y, mask=(rows[:, None] < M) & (cols[None, :] < N))


def supports(xq: torch.Tensor, wq: torch.Tensor) -> str | None:
    """Why the Gluon GEMM cannot take these operands (None: it can): TMA needs int8 rows with unit column
    stride, row strides and base addresses that are multiples of 16 bytes, and K % 16 == 0; a CUDA SM 9.x GPU."""
    for name, t in (("xq", xq), ("wq", wq)):
        if t.dtype != torch.int8 or t.dim() != 2:
            return f"{name}: expected a 2-D int8 tensor"
        if t.stride(1) != 1 or t.stride(0) % 16 or t.data_ptr() % 16:
            return f"{name}: rows must be contiguous and 16-byte aligned (TMA)"
    if xq.shape[1] % 16 or xq.shape[1] != wq.shape[1]:
        return f"K = {xq.shape[1]}: must match the weight's and be a multiple of 16 (TMA)"
    if xq.device.type != "cuda" or torch.cuda.get_device_capability(xq.device)[0] != 9:
        return "needs an SM 9.x (Hopper) GPU"
    return None


def gemm(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
         bias: torch.Tensor | None, out_dtype: torch.dtype, cfg: GluonGemmConfig = DEFAULT) -> torch.Tensor:
    """``out [M, N]`` in ``out_dtype`` (bf16/fp16/fp32) = ``((xq @ wq.T) * x_scale[m]) * w_scale + bias``.

    xq int8 ``[M, K]``, x_scale float32 ``[M]`` or ``[M, 1]``; wq int8 ``[N, K]``; w_scale float32 ``[N]``,
    ``[N, 1]`` or ``[]``; bias ``[N]`` (any float dtype) or None. Raises ValueError for operands ``supports``
    rejects or a bad dtype."""
    why = supports(xq, wq)
    if why is not None:
        raise ValueError(f"gluon_gemm: {why}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"gluon_gemm: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    out = torch.empty((xq.shape[0], wq.shape[0]), dtype=out_dtype, device=xq.device)
    return launch(xq, x_scale, wq, w_scale, bias, out, cfg)


def launch(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
           bias: torch.Tensor | None, out: torch.Tensor, cfg: GluonGemmConfig = DEFAULT) -> torch.Tensor:
    """``gemm`` into ``out [M, N]`` (unit column stride) without its checks (``bench_gluon_gemm --check`` compiles
    this launch for sm_90 on CPU tensors); returns out."""
    m, k = xq.shape
    n = wq.shape[0]
    if m == 0 or n == 0:
        return out
    xs = x_scale.reshape(-1).float().contiguous()
    ws = w_scale.reshape(-1).float().contiguous()  # per-tensor: one element, read once
    a_layout = gl.NVMMASharedLayout.get_default_for([cfg.block_m, cfg.block_k], gl.int8)
    b_layout = gl.NVMMASharedLayout.get_default_for([cfg.block_n, cfg.block_k], gl.int8)
    a_desc = TensorDescriptor(xq, [m, k], [xq.stride(0), 1], [cfg.block_m, cfg.block_k], a_layout)
    b_desc = TensorDescriptor(wq, [n, k], [wq.stride(0), 1], [cfg.block_n, cfg.block_k], b_layout)
    grid = (-(-m // cfg.block_m) * -(-n // cfg.block_n),)
    _gluon_gemm_kernel[grid](a_desc, b_desc, out, xs, ws, bias if bias is not None else xs, m, n, k, out.stride(0),
                       PER_ROW=w_scale.dim() > 0, HAS_BIAS=bias is not None, STAGES=cfg.stages, GROUP_M=cfg.group_m,
                       num_warps=cfg.num_warps)
    return out
