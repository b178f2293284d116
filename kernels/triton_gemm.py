"""Triton INT8 GEMM with the dequantization fused into the epilogue.

``out[m, n] = ((acc[m, n] * x_scale[m]) * w_scale[n or 0]) + bias[n]``, with
``acc = xq @ wq.T`` accumulated exactly in int32.

Two kernels:

* ``_gemm_tma_kernel`` (SM 9.0+): a persistent grid of one program per SM walks the output tiles
  in grouped order (GROUP_M rows of tiles share weight tiles in L2). Operands arrive through TMA
  tensor descriptors, the product runs on wgmma, and the loop over tiles is flattened so the loads
  of the next tile are issued while the current one finishes its epilogue. TMA zero-fills reads
  past the edges and clips stores, so there are no masks.
* ``_gemm_kernel`` (SM 8.0+, and every shape TMA cannot take): one program per output tile with
  masked pointer loads, so any K and N work and the weight may have any strides. With BLOCK_M = 16
  it is also the small-M path (M <= 16): each program streams a [BLOCK_N, K] slab of int8 weight
  through shared memory once, and no dequantized copy of the weight ever exists.

Rejected on the H200 (bench/results/): a small-M kernel that quantized the activation itself in every
program (0.166 ms at 1x4096x36864 vs 0.041 for quantize + this kernel: each program re-quantized a
16-row tile), and a CUDA-core int32 GEMV for M <= 4 (62 us vs 42 at 1x4096x24576, 146 us at K=16384:
bound by int8->int32 conversions and reductions, not by the weight read).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .api import lora_rank_padded
from .configs import GemmConfig, smaller
from .dispatch import DISABLE_ENV
from .launch import FastLauncher, first_fit
from .triton_quant import interpreting, num_sms


@triton.jit
def _tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M: tl.constexpr):
    """Grouped ("super-row") ordering of output tiles for L2 reuse of the weight."""
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, stride_hm, stride_lbn,
              PER_ROW_W: tl.constexpr, HAS_BIAS: tl.constexpr, LORA_R: tl.constexpr, LORA_FP32: tl.constexpr,
              LORA_LOOP: tl.constexpr):
    """int32 acc [BM, BN] -> float32 ((acc * x_scale) * w_scale) + bias [+ h @ lora_b.T] (``reference.epilogue``).

    The LoRA term (LORA_R > 0: h [M, R] = x @ lora_a.T and lora_b [N, R], R padded to LORA_R) is one
    more tensor-core product accumulated straight into the float32 tile, so the output is still written
    once: adding it afterwards would read and write the whole output again. LORA_LOOP runs its chunks in a
    loop instead of unrolled (``GemmConfig.lora_loop``: datacenter Blackwell, where each unrolled chunk's
    tcgen05 product takes its own accumulator in tensor memory).
    """
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    out = acc.to(tl.float32) * xs[:, None]
    if PER_ROW_W:
        ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
        out = out * ws[None, :]
    else:
        out = out * tl.load(ws_ptr)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        out = out + b[None, :]
    if LORA_R > 0:
        # in chunks of at most 64 ranks: registers stay bounded for stacked LoRAs of any total rank
        CHUNK: tl.constexpr = 64 if LORA_R > 64 else LORA_R
        rows_h = h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm
        rows_b = lb_ptr + offs_n.to(tl.int64)[:, None] * stride_lbn
        if LORA_LOOP:
            for r0 in tl.range(0, LORA_R, CHUNK, num_stages=1):  # not pipelined: no multi-buffered LoRA tiles
                out = _lora_chunk(out, rows_h, rows_b, r0, offs_m, offs_n, M, N, CHUNK, LORA_FP32)
        else:
            for r0 in tl.static_range(0, LORA_R, CHUNK):
                out = _lora_chunk(out, rows_h, rows_b, r0, offs_m, offs_n, M, N, CHUNK, LORA_FP32)
    return out


@triton.jit
def _lora_chunk(out, rows_h, rows_b, r0, offs_m, offs_n, M, N, CHUNK: tl.constexpr, LORA_FP32: tl.constexpr):
    """``out + h[:, r0:r0 + CHUNK] @ lora_b[:, r0:r0 + CHUNK].T`` in float32."""
    r = r0 + tl.arange(0, CHUNK)
    h = tl.load(rows_h + r[None, :], mask=(offs_m < M)[:, None], other=0.0)
    lb = tl.load(rows_b + r[None, :], mask=(offs_n < N)[:, None], other=0.0)
    if LORA_FP32:  # float32 operands, and the interpreter, which cannot multiply bfloat16 in tl.dot
        return tl.dot(h.to(tl.float32), tl.trans(lb.to(tl.float32)), out, input_precision="ieee")
    return tl.dot(h, tl.trans(lb), out)


@triton.jit
def _gated(r, out, offs_m, offs_n, M, N, gate_ptr, stride_gb, rows_per_batch):
    """``r + gate[row // rows_per_batch] * out`` in float32 (r: the residual tile)."""
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    batch = (offs_m // rows_per_batch).to(tl.int64)
    g = tl.load(gate_ptr + batch[:, None] * stride_gb + offs_n[None, :], mask=ok, other=0.0)
    return r.to(tl.float32) + g.to(tl.float32) * out


@triton.jit
def _residual(out, offs_m, offs_n, M, N, res_ptr, stride_rm, gate_ptr, stride_gb, rows_per_batch):
    """``residual + gate[row // rows_per_batch] * out`` (a block's gated residual add, written in place)."""
    ok = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    r = tl.load(res_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :], mask=ok, other=0.0)
    return _gated(r, out, offs_m, offs_n, M, N, gate_ptr, stride_gb, rows_per_batch)


@triton.jit
def _gemm_tma_kernel(
    # TMA descriptors: xq [M, K] int8, wq [N, K] int8, out [M, N]
    a_desc, b_desc, c_desc,
    # epilogue operands: x_scale [M] f32, w_scale [N] or [] f32, bias [N], LoRA h [M, R] and lora_b [N, R],
    # with RESIDUAL gate [B, N] (the residual is the output itself, read through c_desc before it is stored)
    xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, gate_ptr,
    M, N, K, stride_hm, stride_lbn, stride_gb, rows_per_batch,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, PER_ROW_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr, LORA_R: tl.constexpr, LORA_FP32: tl.constexpr, LORA_LOOP: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    out_dtype = c_desc.dtype
    # The epilogue recomputes its tile coordinates from a second counter so the software pipeliner
    # can run the next tile's loads ahead of this tile's epilogue (as in Triton's persistent matmul).
    # Not with a LoRA term: flattening would multi-buffer the epilogue's LoRA tiles too, num_stages
    # times (~300 KB of shared memory at rank 128); the second CTA per SM still hides the epilogue.
    tile_id_c = start_pid - NUM_PROGRAMS
    for tile_id in tl.range(start_pid, num_tiles, NUM_PROGRAMS, flatten=LORA_R == 0):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        off_am = pid_m * BLOCK_M
        off_bn = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([off_am, ki * BLOCK_K])
            b = b_desc.load([off_bn, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)

        tile_id_c += NUM_PROGRAMS
        pid_m, pid_n = _tile_coords(tile_id_c, num_pid_in_group, num_pid_m, GROUP_M)
        off_cm = pid_m * BLOCK_M
        off_cn = pid_n * BLOCK_N
        offs_m = off_cm + tl.arange(0, BLOCK_M)
        if EPILOGUE_SUBTILE:
            acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(acc)
            offs_n0 = off_cn + tl.arange(0, BLOCK_N // 2)
            out0 = _epilogue(acc0, offs_m, offs_n0, M, N, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, stride_hm,
                             stride_lbn, PER_ROW_W, HAS_BIAS, LORA_R, LORA_FP32, LORA_LOOP)
            if RESIDUAL:  # the residual tile arrives through the output's own descriptor (TMA)
                out0 = _gated(c_desc.load([off_cm, off_cn]), out0, offs_m, offs_n0, M, N, gate_ptr, stride_gb,
                              rows_per_batch)
            c_desc.store([off_cm, off_cn], out0.to(out_dtype))
            offs_n1 = offs_n0 + BLOCK_N // 2
            out1 = _epilogue(acc1, offs_m, offs_n1, M, N, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr,
                             stride_hm, stride_lbn, PER_ROW_W, HAS_BIAS, LORA_R, LORA_FP32, LORA_LOOP)
            if RESIDUAL:
                out1 = _gated(c_desc.load([off_cm, off_cn + BLOCK_N // 2]), out1, offs_m, offs_n1, M, N, gate_ptr,
                              stride_gb, rows_per_batch)
            c_desc.store([off_cm, off_cn + BLOCK_N // 2], out1.to(out_dtype))
        else:
            offs_n = off_cn + tl.arange(0, BLOCK_N)
            out = _epilogue(acc, offs_m, offs_n, M, N, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, stride_hm,
                            stride_lbn, PER_ROW_W, HAS_BIAS, LORA_R, LORA_FP32, LORA_LOOP)
            if RESIDUAL:
                out = _gated(c_desc.load([off_cm, off_cn]), out, offs_m, offs_n, M, N, gate_ptr, stride_gb,
                             rows_per_batch)
            c_desc.store([off_cm, off_cn], out.to(out_dtype))


@triton.jit
def _gemm_kernel(
    # pointers: xq [M, K] int8 (row stride stride_am, unit column stride), wq [N, K] int8, out [M, N]
    a_ptr, b_ptr, c_ptr, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, gate_ptr,
    M, N, K,
    stride_am, stride_bn, stride_bk, stride_cm, stride_hm, stride_lbn, stride_gb, rows_per_batch,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PER_ROW_W: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, LORA_R: tl.constexpr,
    LORA_FP32: tl.constexpr, LORA_LOOP: tl.constexpr, RESIDUAL: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), GROUP_M * num_pid_n, num_pid_m, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge read row 0 instead (never stored), so loads need only the K mask.
    safe_m = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    safe_n = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    a_ptrs = a_ptr + safe_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + safe_n[:, None] * stride_bn + offs_k[None, :] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = (offs_k < K - k0)[None, :]
            a = tl.load(a_ptrs, mask=k_ok, other=0)
            b = tl.load(b_ptrs, mask=k_ok, other=0)
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    out = _epilogue(acc, offs_m, offs_n, M, N, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, stride_hm, stride_lbn,
                    PER_ROW_W, HAS_BIAS, LORA_R, LORA_FP32, LORA_LOOP)
    if RESIDUAL:  # c is the residual, updated in place
        out = _residual(out, offs_m, offs_n, M, N, c_ptr, stride_cm, gate_ptr, stride_gb, rows_per_batch)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


_GEMM_TMA = FastLauncher(_gemm_tma_kernel, interpreting())
_GEMM = FastLauncher(_gemm_kernel, interpreting())


def _pad_lora(h, b):
    """(h, b, R) with R padded to ``lora_rank_padded``; (None, None, 0) without a LoRA term."""
    if h is None:
        return None, None, 0
    r = h.shape[1]
    rp = lora_rank_padded(r)
    if rp != r or h.stride(1) != 1 or b.stride(1) != 1:
        h = torch.nn.functional.pad(h, (0, rp - r)).contiguous()
        b = torch.nn.functional.pad(b, (0, rp - r)).contiguous()
    return h, b.to(h.dtype), rp


def tma_compatible(xq: torch.Tensor, wq: torch.Tensor, out: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides and unit inner strides."""
    k = xq.shape[1]
    return (
        k % 16 == 0
        and xq.stride(1) == 1 and xq.stride(0) % 16 == 0
        and wq.stride(1) == 1 and wq.stride(0) % 16 == 0
        and out.stride(1) == 1 and (out.stride(0) * out.element_size()) % 16 == 0
        and xq.data_ptr() % 16 == 0 and wq.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0
    )


def gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    cfg: GemmConfig,
    lora_h: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    rows_per_batch: int = 1,
) -> torch.Tensor:
    """Launch the INT8 GEMM described by ``cfg`` ("tma" or "generic") into ``out [M, N]``; when the GPU rejects
    ``cfg`` for resources, the next smaller config (``configs.smaller``, ``launch.first_fit``).

    With ``gate`` ([B, N], unit column stride) ``out`` holds a residual on entry and is updated in place:
    ``out += gate[row // rows_per_batch] * (GEMM + epilogue)``, rounded once.

    xq int8 [M, K] with unit column stride; x_scale float32 [M]; wq int8 [N, K] (any strides for the
    generic kernel); w_scale float32 [N] (per-row) or [] (per-tensor); bias [N] or None; optional
    LoRA term lora_h [M, R] and lora_b [N, R] (same float dtype, unit column strides).
    """
    m, k = xq.shape
    n = wq.shape[0]
    if m == 0 or n == 0:
        return out
    if k == 0:  # no products: only the bias (and a LoRA term of zero) survive
        y = bias.float().expand(m, n) if bias is not None else torch.zeros((m, n), device=out.device)
        if gate is not None:
            batch = torch.arange(m, device=out.device) // rows_per_batch
            return out.copy_((out.float() + gate.float()[batch] * y).to(out.dtype))
        return out.copy_(y.to(out.dtype))
    per_row = w_scale.dim() > 0
    bias_arg = bias if bias is not None else x_scale
    lora_h, lora_b, lora_r = _pad_lora(lora_h, lora_b)
    h_arg, lb_arg = (lora_h, lora_b) if lora_r else (x_scale, x_scale)
    stride_h, stride_lb = (lora_h.stride(0), lora_b.stride(0)) if lora_r else (0, 0)
    gate_arg, stride_gb = (gate, gate.stride(0)) if gate is not None else (x_scale, 0)

    def launch(cfg: GemmConfig) -> None:
        lora = {"LORA_R": lora_r, "LORA_FP32": lora_r > 0 and (lora_h.dtype == torch.float32 or interpreting()),
                "LORA_LOOP": lora_r > 64 and cfg.lora_loop}
        if cfg.kernel == "tma":
            sub = 2 if cfg.epilogue_subtile else 1
            a_desc = TensorDescriptor(xq, [m, k], [xq.stride(0), 1], [cfg.block_m, cfg.block_k])
            b_desc = TensorDescriptor(wq, [n, k], [wq.stride(0), 1], [cfg.block_n, cfg.block_k])
            c_desc = TensorDescriptor(out, [m, n], [out.stride(0), 1], [cfg.block_m, cfg.block_n // sub])
            programs = num_sms(out.device) * cfg.ctas_per_sm
            tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
            _GEMM_TMA(
                (min(programs, tiles),),
                a_desc, b_desc, c_desc, x_scale, w_scale, bias_arg, h_arg, lb_arg, gate_arg,
                m, n, k, stride_h, stride_lb, stride_gb, rows_per_batch,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                NUM_PROGRAMS=programs, PER_ROW_W=per_row, HAS_BIAS=bias is not None,
                EPILOGUE_SUBTILE=cfg.epilogue_subtile, RESIDUAL=gate is not None, **lora,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
            )
        else:
            grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
            _GEMM(
                grid,
                xq, wq, out, x_scale, w_scale, bias_arg, h_arg, lb_arg, gate_arg, m, n, k,
                xq.stride(0), wq.stride(0), wq.stride(1), out.stride(0), stride_h, stride_lb, stride_gb,
                rows_per_batch,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                PER_ROW_W=per_row, HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
                RESIDUAL=gate is not None, **lora,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False,
            )

    # the specialization a misfit is remembered for: what else changes the kernel's resources
    spec = (out.dtype, lora_r, lora_h.dtype if lora_r else None, gate is not None, out.device)
    first_fit("int8 GEMM", spec, cfg, smaller, launch,
              f"set {DISABLE_ENV}=1 to run the torch twin on this GPU")
    return out
