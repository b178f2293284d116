"""Triton INT8 GEMM with the dequantization fused into the epilogue.

``out[m, n] = ((acc[m, n] * x_scale[m]) * w_scale[n or 0]) + bias[n]``, with
``acc = xq @ wq.T`` accumulated exactly in int32.

Two kernels:

* ``_gemm_tma_kernel`` (SM 9.0+): a persistent grid of one program per SM walks the output tiles
  in grouped order (GROUP_M rows of tiles share weight tiles in L2). Operands arrive through TMA
  tensor descriptors, the product runs on wgmma, and the loop over tiles is flattened so the loads
  of the next tile are issued while the current one finishes its epilogue. TMA zero-fills reads
  past the edges and clips stores, so there are no masks. With ``GemmConfig.warp_spec`` (Hopper's
  large-M row) the K loop is warp-specialized instead: a producer warpgroup issues the TMA loads of this
  and the next tiles while two consumer warpgroups each multiply and finish half of the tile's rows.
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

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import launch
from .api import lora_rank_padded
from .configs import GemmConfig, for_launch, smaller, without_gluon
from .direct import stream_key
from .dispatch import DISABLE_ENV
from .launch import FastLauncher, device_descriptors, first_fit
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
def _epilogue(acc, off_m, rows, offs_n, M, N, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, stride_hm, stride_lbn,
              PER_ROW_W: tl.constexpr, HAS_BIAS: tl.constexpr, LORA_R: tl.constexpr, LORA_FP32: tl.constexpr,
              LORA_LOOP: tl.constexpr):
    """int32 acc [BM, BN] -> float32 ((acc * x_scale) * w_scale) + bias [+ h @ lora_b.T] (``reference.epilogue``).

    The tile's rows are ``off_m + rows`` (``rows = tl.arange(0, BM)``), kept apart: every row-indexed address is
    the scalar base moved by ``off_m`` plus ``rows``, and every row mask is ``rows < M - off_m``. Triton 3.6's
    Hopper warp specialization gives each consumer half of the rows by moving ``rows``' range *and* the ``off_m``
    it finds splat into a row tensor, so ``off_m + rows`` pointed the second consumer 64 rows too far (its x
    scales and masks came from the next rows: bench/NOTES.md item 28, 44); scalars it leaves alone.

    The LoRA term (LORA_R > 0: h [M, R] = x @ lora_a.T and lora_b [N, R], R padded to LORA_R) is one
    more tensor-core product accumulated straight into the float32 tile, so the output is still written
    once: adding it afterwards would read and write the whole output again. LORA_LOOP runs its chunks in a
    loop instead of unrolled (``GemmConfig.lora_loop``: datacenter Blackwell, where each unrolled chunk's
    tcgen05 product takes its own accumulator in tensor memory).
    """
    row_ok = rows < M - off_m
    xs = tl.load(xs_ptr + off_m + rows, mask=row_ok, other=0.0)
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
        rows_h = h_ptr + off_m.to(tl.int64) * stride_hm + rows.to(tl.int64)[:, None] * stride_hm
        rows_b = lb_ptr + offs_n.to(tl.int64)[:, None] * stride_lbn
        if LORA_LOOP:
            for r0 in tl.range(0, LORA_R, CHUNK, num_stages=1):  # not pipelined: no multi-buffered LoRA tiles
                out = _lora_chunk(out, rows_h, rows_b, r0, row_ok, offs_n, N, CHUNK, LORA_FP32)
        else:
            for r0 in tl.static_range(0, LORA_R, CHUNK):
                out = _lora_chunk(out, rows_h, rows_b, r0, row_ok, offs_n, N, CHUNK, LORA_FP32)
    return out


@triton.jit
def _lora_chunk(out, rows_h, rows_b, r0, row_ok, offs_n, N, CHUNK: tl.constexpr, LORA_FP32: tl.constexpr):
    """``out + h[:, r0:r0 + CHUNK] @ lora_b[:, r0:r0 + CHUNK].T`` in float32 (``row_ok``: the tile's rows < M)."""
    r = r0 + tl.arange(0, CHUNK)
    h = tl.load(rows_h + r[None, :], mask=row_ok[:, None], other=0.0)
    lb = tl.load(rows_b + r[None, :], mask=(offs_n < N)[:, None], other=0.0)
    if LORA_FP32:  # float32 operands, and the interpreter, which cannot multiply bfloat16 in tl.dot
        return tl.dot(h.to(tl.float32), tl.trans(lb.to(tl.float32)), out, input_precision="ieee")
    return tl.dot(h, tl.trans(lb), out)


@triton.jit
def _lora_desc(out, h_desc, lb_desc, off_m, off_n, LORA_R: tl.constexpr, LORA_FP32: tl.constexpr):
    """``out + h[off_m:, :LORA_R] @ lora_b[off_n:, :LORA_R].T`` in float32, in chunks of at most 64 ranks read
    through TMA descriptors (the warp-specialized kernel: its consumers may not load per-row values by pointer
    in the loop's nest); the chunks and their order are ``_epilogue``'s, so the sums are the same."""
    CHUNK: tl.constexpr = 64 if LORA_R > 64 else LORA_R
    for r0 in tl.range(0, LORA_R, CHUNK, num_stages=1):  # a loop: unrolled, each chunk's tiles get own buffers
        h = h_desc.load([off_m, r0])
        lb = lb_desc.load([off_n, r0])
        if LORA_FP32:
            out = tl.dot(h.to(tl.float32), tl.trans(lb.to(tl.float32)), out, input_precision="ieee")
        else:
            out = tl.dot(h, tl.trans(lb), out)
    return out


@triton.jit
def _gated(r, out, off_m, rows, offs_n, M, N, gate_ptr, stride_gb, rows_per_batch):
    """``r + gate[row // rows_per_batch] * out`` in float32 (r: the residual tile; rows as in ``_epilogue``)."""
    ok = (rows < M - off_m)[:, None] & (offs_n < N)[None, :]
    # (off_m + rows) // rows_per_batch without adding off_m to the row tensor (see _epilogue)
    batch = ((rows + off_m % rows_per_batch) // rows_per_batch + off_m // rows_per_batch).to(tl.int64)
    g = tl.load(gate_ptr + batch[:, None] * stride_gb + offs_n[None, :], mask=ok, other=0.0)
    return r.to(tl.float32) + g.to(tl.float32) * out


@triton.jit
def _residual_tile(c_desc, c_ptr, stride_cm, off_m, off_n, rows, offs_n, M, N, WARP_SPEC: tl.constexpr):
    """The residual tile at (off_m, off_n), the output's values before this kernel writes them: through the output's
    TMA descriptor, or warp-specialized by pointer loads (each consumer its own rows). Read through the in-kernel
    descriptor there, ~0.03 % of the values came out different once a program ran several tiles (bench/NOTES.md
    item 47); by pointer loads 3-4 stages are bit-identical, 5-6 still differ from call to call (item 49)."""
    if WARP_SPEC:
        return _residual_rows(off_m, rows, offs_n, M, N, c_ptr, stride_cm)
    return c_desc.load([off_m, off_n])


@triton.jit
def _residual_rows(off_m, rows, offs_n, M, N, res_ptr, stride_rm):
    """The residual tile by pointer loads (rows and off_m as in ``_epilogue``; zero past the edges)."""
    ok = (rows < M - off_m)[:, None] & (offs_n < N)[None, :]
    return tl.load(res_ptr + off_m.to(tl.int64) * stride_rm + rows.to(tl.int64)[:, None] * stride_rm
                   + offs_n[None, :], mask=ok, other=0.0)


@triton.jit
def _residual(out, off_m, rows, offs_n, M, N, res_ptr, stride_rm, gate_ptr, stride_gb, rows_per_batch):
    """``residual + gate[row // rows_per_batch] * out`` (a block's gated residual add, written in place)."""
    r = _residual_rows(off_m, rows, offs_n, M, N, res_ptr, stride_rm)
    return _gated(r, out, off_m, rows, offs_n, M, N, gate_ptr, stride_gb, rows_per_batch)


@triton.jit
def _gemm_tma_kernel(
    # TMA descriptors: xq [M, K] int8, wq [N, K] int8, out [M, N] (WARP_SPEC: the three tensors' pointers)
    a_desc, b_desc, c_desc,
    # epilogue operands: x_scale [M] f32, w_scale [N] or [] f32, bias [N], LoRA h [M, R] and lora_b [N, R],
    # with RESIDUAL gate [B, N] (the residual is the output itself, read through c_desc before it is stored)
    xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, gate_ptr,
    M, N, K, stride_hm, stride_lbn, stride_gb, rows_per_batch,
    # WARP_SPEC: row strides of xq, wq and out (unused otherwise)
    stride_am, stride_bn, stride_cm,
    # SPLIT_TAIL: tiles from full_tiles on are split over K in tail_split parts, summed in int32 in tail_acc
    # [tiles, BLOCK_M * BLOCK_N] with tail_count [tiles] arrivals (both zero between launches; unused otherwise)
    tail_acc_ptr, tail_count_ptr, full_tiles, tail_split,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, PER_ROW_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr, LORA_R: tl.constexpr, LORA_FP32: tl.constexpr, LORA_LOOP: tl.constexpr,
    RESIDUAL: tl.constexpr, WARP_SPEC: tl.constexpr = False, SPLIT_TAIL: tl.constexpr = False,
):
    SUB_N: tl.constexpr = BLOCK_N // 2 if EPILOGUE_SUBTILE else BLOCK_N
    h_desc = h_ptr  # the LoRA operands' descriptors where the kernel makes them (WARP_SPEC), else unused
    lb_desc = lb_ptr
    c_ptr = c_desc  # WARP_SPEC: the output's pointer, which a residual epilogue reads (see _residual_tile)
    if WARP_SPEC:
        # Triton 3.6's Hopper warp specialization (the K loop's warp_specialize) gives each of its two consumer
        # warpgroups half of the tile's rows and moves the loads to a producer warpgroup. A host descriptor keeps
        # its full BLOCK_M-row TMA box while each consumer's copy expects half of it (a Triton 3.6 bug), so the
        # descriptors are made here, and get the halved box; the LoRA operands too (pointer loads of per-row
        # values feeding its dots fail the pass). Needs Triton's scratch allocator at launch (``gemm``).
        a_desc = tl.make_tensor_descriptor(a_desc, [M, K], [stride_am, 1], [BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_desc, [N, K], [stride_bn, 1], [BLOCK_N, BLOCK_K])
        c_desc = tl.make_tensor_descriptor(c_desc, [M, N], [stride_cm, 1], [BLOCK_M, SUB_N])
        if LORA_R > 0:
            CHUNK: tl.constexpr = 64 if LORA_R > 64 else LORA_R
            h_desc = tl.make_tensor_descriptor(h_ptr, [M, LORA_R], [stride_hm, 1], [BLOCK_M, CHUNK])
            lb_desc = tl.make_tensor_descriptor(lb_ptr, [N, LORA_R], [stride_lbn, 1], [SUB_N, CHUNK])
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    # The epilogue recomputes its tile coordinates from a second counter so the software pipeliner
    # can run the next tile's loads ahead of this tile's epilogue (as in Triton's persistent matmul).
    # Not with a LoRA term: flattening would multi-buffer the epilogue's LoRA tiles too, num_stages
    # times (~300 KB of shared memory at rank 128); the second CTA per SM still hides the epilogue.
    # Warp-specialized, the pass partitions the whole tile loop: the producer runs ahead into the next tiles.
    tile_id_c = start_pid - NUM_PROGRAMS
    main_tiles = full_tiles if SPLIT_TAIL else num_tiles
    for tile_id in tl.range(start_pid, main_tiles, NUM_PROGRAMS, flatten=LORA_R == 0 and not WARP_SPEC):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        off_am = pid_m * BLOCK_M
        off_bn = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in tl.range(k_tiles, warp_specialize=WARP_SPEC):
            a = a_desc.load([off_am, ki * BLOCK_K])
            b = b_desc.load([off_bn, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)

        if WARP_SPEC:  # the consumers finish their own tile (a second counter fails the pass's row split)
            off_cm = off_am
            off_cn = off_bn
        else:
            tile_id_c += NUM_PROGRAMS
            pid_m, pid_n = _tile_coords(tile_id_c, num_pid_in_group, num_pid_m, GROUP_M)
            off_cm = pid_m * BLOCK_M
            off_cn = pid_n * BLOCK_N
        _finish_tile(acc, off_cm, off_cn, c_desc, c_ptr, stride_cm, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, gate_ptr,
                     h_desc, lb_desc, M, N, stride_hm, stride_lbn, stride_gb, rows_per_batch, BLOCK_M, BLOCK_N,
                     PER_ROW_W, HAS_BIAS, EPILOGUE_SUBTILE, LORA_R, LORA_FP32, LORA_LOOP, RESIDUAL, WARP_SPEC)
    if SPLIT_TAIL:
        # The last, partial wave of tiles split over K (stream-K for the tail): with T = full_tiles + r tiles and
        # r <= NUM_PROGRAMS / 2, the r tiles would leave most programs idle for a whole tile's time; split into
        # tail_split parts they keep r * tail_split programs busy for 1 / tail_split of it. Each part adds its
        # int32 product into the tile's slot of tail_acc (integer sums in any order: the same bits as one
        # program's loop); the part that arrives last (tail_count) finishes the tile and zeroes the slot.
        tail_units = (num_tiles - full_tiles) * tail_split
        for unit in tl.range(start_pid, tail_units, NUM_PROGRAMS, num_stages=1):
            slot = unit // tail_split
            part = unit % tail_split
            pid_m, pid_n = _tile_coords(full_tiles + slot, num_pid_in_group, num_pid_m, GROUP_M)
            off_am = pid_m * BLOCK_M
            off_bn = pid_n * BLOCK_N
            k_lo = part * k_tiles // tail_split
            k_hi = (part + 1) * k_tiles // tail_split
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for ki in tl.range(k_lo, k_hi):
                a = a_desc.load([off_am, ki * BLOCK_K])
                b = b_desc.load([off_bn, ki * BLOCK_K])
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
            cell = (tail_acc_ptr + slot.to(tl.int64) * (BLOCK_M * BLOCK_N) + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N
                    + tl.arange(0, BLOCK_N)[None, :])
            tl.atomic_add(cell, acc, sem="relaxed")
            tl.debug_barrier()  # every thread's adds issued before the arrival is published (release below)
            arrived = tl.atomic_add(tail_count_ptr + slot, 1, sem="acq_rel")
            if arrived == tail_split - 1:
                tl.debug_barrier()  # the acquire above orders the whole program's reads after the other parts
                acc = tl.load(cell, cache_modifier=".cg")
                tl.store(cell, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32))
                tl.store(tail_count_ptr + slot, 0)
                _finish_tile(acc, off_am, off_bn, c_desc, c_ptr, stride_cm, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr,
                             gate_ptr, h_desc, lb_desc, M, N, stride_hm, stride_lbn, stride_gb, rows_per_batch, BLOCK_M,
                             BLOCK_N, PER_ROW_W, HAS_BIAS, EPILOGUE_SUBTILE, LORA_R, LORA_FP32, LORA_LOOP, RESIDUAL,
                             WARP_SPEC)


@triton.jit
def _finish_tile(acc, off_cm, off_cn, c_desc, c_ptr, stride_cm, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, gate_ptr,
                 h_desc, lb_desc, M, N, stride_hm, stride_lbn, stride_gb, rows_per_batch, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PER_ROW_W: tl.constexpr, HAS_BIAS: tl.constexpr,
                 EPILOGUE_SUBTILE: tl.constexpr, LORA_R: tl.constexpr, LORA_FP32: tl.constexpr,
                 LORA_LOOP: tl.constexpr, RESIDUAL: tl.constexpr, WARP_SPEC: tl.constexpr):
    """The epilogue of one output tile of ``_gemm_tma_kernel`` at (off_cm, off_cn): int32 ``acc`` [BLOCK_M, BLOCK_N]
    dequantized, LoRA and gated residual added, stored through ``c_desc`` (in two halves with EPILOGUE_SUBTILE)."""
    out_dtype = c_desc.dtype
    rows = tl.arange(0, BLOCK_M)
    if EPILOGUE_SUBTILE:
        acc = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(acc)
        offs_n0 = off_cn + tl.arange(0, BLOCK_N // 2)
        out0 = _epilogue(acc0, off_cm, rows, offs_n0, M, N, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, stride_hm,
                         stride_lbn, PER_ROW_W, HAS_BIAS, 0 if WARP_SPEC else LORA_R, LORA_FP32, LORA_LOOP)
        if WARP_SPEC and LORA_R > 0:
            out0 = _lora_desc(out0, h_desc, lb_desc, off_cm, off_cn, LORA_R, LORA_FP32)
        if RESIDUAL:  # the output's values before this kernel writes them (_residual_tile)
            out0 = _gated(_residual_tile(c_desc, c_ptr, stride_cm, off_cm, off_cn, rows, offs_n0, M, N, WARP_SPEC),
                          out0, off_cm, rows, offs_n0, M, N, gate_ptr, stride_gb, rows_per_batch)
        c_desc.store([off_cm, off_cn], out0.to(out_dtype))
        offs_n1 = offs_n0 + BLOCK_N // 2
        out1 = _epilogue(acc1, off_cm, rows, offs_n1, M, N, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr,
                         stride_hm, stride_lbn, PER_ROW_W, HAS_BIAS, 0 if WARP_SPEC else LORA_R, LORA_FP32,
                         LORA_LOOP)
        if WARP_SPEC and LORA_R > 0:
            out1 = _lora_desc(out1, h_desc, lb_desc, off_cm, off_cn + BLOCK_N // 2, LORA_R, LORA_FP32)
        if RESIDUAL:
            out1 = _gated(_residual_tile(c_desc, c_ptr, stride_cm, off_cm, off_cn + BLOCK_N // 2, rows, offs_n1, M, N,
                                         WARP_SPEC), out1, off_cm, rows, offs_n1, M, N, gate_ptr, stride_gb,
                          rows_per_batch)
        c_desc.store([off_cm, off_cn + BLOCK_N // 2], out1.to(out_dtype))
    else:
        offs_n = off_cn + tl.arange(0, BLOCK_N)
        out = _epilogue(acc, off_cm, rows, offs_n, M, N, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, stride_hm,
                        stride_lbn, PER_ROW_W, HAS_BIAS, 0 if WARP_SPEC else LORA_R, LORA_FP32, LORA_LOOP)
        if WARP_SPEC and LORA_R > 0:
            out = _lora_desc(out, h_desc, lb_desc, off_cm, off_cn, LORA_R, LORA_FP32)
        if RESIDUAL:
            out = _gated(_residual_tile(c_desc, c_ptr, stride_cm, off_cm, off_cn, rows, offs_n, M, N, WARP_SPEC),
                         out, off_cm, rows, offs_n, M, N, gate_ptr, stride_gb, rows_per_batch)
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
    off_m = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    out = _epilogue(acc, off_m, rows, offs_n, M, N, xs_ptr, ws_ptr, bias_ptr, h_ptr, lb_ptr, stride_hm, stride_lbn,
                    PER_ROW_W, HAS_BIAS, LORA_R, LORA_FP32, LORA_LOOP)
    if RESIDUAL:  # c is the residual, updated in place
        out = _residual(out, off_m, rows, offs_n, M, N, c_ptr, stride_cm, gate_ptr, stride_gb, rows_per_batch)
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


_GEMM_TMA = FastLauncher(_gemm_tma_kernel, interpreting())
_GEMM = FastLauncher(_gemm_kernel, interpreting())


@functools.cache
def _gluon():
    """``kernels/gluon_gemm.py``, imported on the first Gluon launch: it needs Triton's Gluon (the dispatch gives a
    Gluon table only where it imports, ``dispatch.gluon_error``)."""
    from . import gluon_gemm

    return gluon_gemm


@functools.cache
def _gluon_launcher(kernel) -> FastLauncher:
    """The recording launcher of a Gluon kernel: its launches replay like the Triton kernels' (``direct.py``)."""
    return FastLauncher(kernel, False)


@functools.cache
def _gluon_config(cfg: GemmConfig):
    """The ``gluon_gemm.GluonGemmConfig`` of a Gluon ``GemmConfig`` (tiled, one program per output tile)."""
    return _gluon().GluonGemmConfig(block_m=cfg.block_m, block_n=cfg.block_n, block_k=cfg.block_k,
                                       stages=cfg.num_stages, num_warps=cfg.num_warps, group_m=cfg.group_m,
                                       max_registers=cfg.max_registers)


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


def tail_plan(tiles: int, programs: int, k_tiles: int, min_part: int = 1) -> tuple[int, int]:
    """(full_tiles, tail_split) of ``GemmConfig.split_tail`` (= ``min_part``): after at least one full wave of a
    persistent grid of ``programs``, the tiles of the last wave (``tiles - full_tiles``) run as ``tail_split`` parts
    over K each, where that wave is at most half full and each of at least two parts gets ``min_part`` K tiles or
    more; ``(tiles, 1)`` (no split) otherwise. E.g. Chroma's single-block linear2, 4608 x 3072 in 128 x 128 tiles on
    264 programs, K = 15360 (240 tiles of 64): 864 tiles = 3 full waves + 72, which run as 3 parts of 80 K tiles (the
    fourth wave took a whole tile's time for 72 of 264 programs). A grid of less than one wave (a LoRA's down
    projection, N = 64) is not split: each tile has its SM already, and on the H200 splitting those measured
    0.58-1.56x over three sweeps, below 1 in most (bench/NOTES.md item 34)."""
    full = tiles // programs * programs
    rest = tiles - full
    if full == 0 or rest == 0 or 2 * rest > programs:
        return tiles, 1
    parts = min(programs // rest, k_tiles // max(1, min_part))
    return (full, parts) if parts >= 2 else (tiles, 1)


# int32 partial sums and arrival counts of split tail tiles, per (device, stream): zero between launches (the last
# part of each tile zeroes its slot), grown (zeroed) when a launch needs more slots
_TAIL: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _tail_workspace(device: torch.device, slots: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = stream_key(device)
    acc, count = _TAIL.get(key, (None, None))
    if acc is None or acc.numel() < slots * tile or count.numel() < slots:
        acc = torch.zeros(max(slots * tile, acc.numel() if acc is not None else 0), dtype=torch.int32, device=device)
        count = torch.zeros(max(slots, count.numel() if count is not None else 0), dtype=torch.int32, device=device)
        _TAIL[key] = (acc, count)
    launch.keep(acc)  # persistent: a recorded launch may keep its address (direct.Replayer)
    launch.keep(count)
    return acc, count


def _tma_rows(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor as a TMA source (``launch.tma_ok``; a contiguous copy otherwise)."""
    return tuple(t if launch.tma_ok(t) else t.contiguous() for t in ts)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _arch_of(out: torch.Tensor) -> tuple[int, int] | None:
    """The compute capability of ``out``'s GPU; None off CUDA (the offline checks compile for a chosen target)."""
    return _capability(out.device) if out.device.type == "cuda" else None


def tma_compatible(xq: torch.Tensor, wq: torch.Tensor, out: torch.Tensor) -> bool:
    """The TMA kernels take these operands: K a multiple of 16 and each of them ``launch.tma_ok``."""
    return xq.shape[1] % 16 == 0 and launch.tma_ok(xq) and launch.tma_ok(wq) and launch.tma_ok(out)


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
    *,
    ws_rules: bool = True,
) -> torch.Tensor:
    """Launch the INT8 GEMM described by ``cfg`` ("tma" or "generic") into ``out [M, N]``; when the GPU rejects
    ``cfg`` for resources, the next smaller config (``configs.smaller``, ``launch.first_fit``).

    A warp-specialized ``cfg`` runs without the specialization off Hopper and, with a LoRA term or a gated
    residual, everywhere (``configs.for_launch``); ``ws_rules=False`` runs it as given on Hopper (the sweeps
    that re-check those rules on a new Triton). A Gluon ``cfg`` (``kernels/gluon_gemm.py``) runs on Hopper without
    a LoRA term; otherwise, and in Triton's interpreter, the plain TMA kernel's large-M config runs
    (``configs.without_gluon``: the same bits).

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
        if cfg.kernel == "gluon":
            kernel, grid, args, kwargs = _gluon().launch_args(xq, x_scale, wq, w_scale, bias, out,
                                                              _gluon_config(cfg), gate, rows_per_batch)
            _gluon_launcher(kernel)(grid, *args, **kwargs)
            return
        lora = {"LORA_R": lora_r, "LORA_FP32": lora_r > 0 and (lora_h.dtype == torch.float32 or interpreting()),
                "LORA_LOOP": lora_r > 64 and cfg.lora_loop}
        if cfg.kernel == "tma":
            sub = 2 if cfg.epilogue_subtile else 1
            if cfg.warp_spec:  # the kernel makes its descriptors (see there)
                descs = (xq, wq, out)
                hl = _tma_rows(h_arg, lb_arg) if lora_r else (h_arg, lb_arg)
            else:
                descs = (TensorDescriptor(xq, [m, k], [xq.stride(0), 1], [cfg.block_m, cfg.block_k]),
                         TensorDescriptor(wq, [n, k], [wq.stride(0), 1], [cfg.block_n, cfg.block_k]),
                         TensorDescriptor(out, [m, n], [out.stride(0), 1], [cfg.block_m, cfg.block_n // sub]))
                hl = (h_arg, lb_arg)
            programs = num_sms(out.device) * cfg.ctas_per_sm
            tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
            full, split = tail_plan(tiles, programs, triton.cdiv(k, cfg.block_k), cfg.split_tail) if cfg.split_tail \
                else (tiles, 1)
            tail = _tail_workspace(out.device, tiles - full, cfg.block_m * cfg.block_n) if split > 1 \
                else (x_scale, x_scale)
            with device_descriptors(cfg.warp_spec):
                _GEMM_TMA(
                    (min(programs, tiles) if split == 1 else programs,),
                    *descs, x_scale, w_scale, bias_arg, *hl, gate_arg,
                    m, n, k, hl[0].stride(0) if lora_r else 0, hl[1].stride(0) if lora_r else 0, stride_gb,
                    rows_per_batch, xq.stride(0), wq.stride(0), out.stride(0), *tail, full, split,
                    BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                    NUM_PROGRAMS=programs, PER_ROW_W=per_row, HAS_BIAS=bias is not None,
                    EPILOGUE_SUBTILE=cfg.epilogue_subtile, RESIDUAL=gate is not None, **lora,
                    WARP_SPEC=cfg.warp_spec, SPLIT_TAIL=split > 1,
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

    if cfg.kernel == "gluon":  # Hopper, no LoRA term; Gluon kernels do not run in Triton's interpreter
        cfg = without_gluon(cfg) if interpreting() else for_launch(cfg, _arch_of(out), lora_r > 0, gate is not None)
    elif cfg.warp_spec and not interpreting():  # the explicit rules of a warp-specialized config
        cfg = for_launch(cfg, _arch_of(out), lora_r > 0 and ws_rules, gate is not None and ws_rules)
    # the specialization a misfit is remembered for: what else changes the kernel's resources
    spec = (out.dtype, lora_r, lora_h.dtype if lora_r else None, gate is not None, out.device)
    first_fit("int8 GEMM", spec, cfg, smaller, launch,
              f"set {DISABLE_ENV}=1 to run the torch twin on this GPU")
    return out


def gemm_split_glu(xq: torch.Tensor, x_scale: torch.Tensor, weight: tuple, head: int, out_head: torch.Tensor,
                   out: torch.Tensor, cfg: GemmConfig) -> None:
    """The SwiGLU GEMM of one weight ``[head | gate | up]`` (``gluon_gemm.split_glu_launch_args``: ``out_head``
    the first rows' GEMM, ``out = silu(g) * u``, one launch) with the Gluon config ``cfg``, through the recording
    launcher (``fused.split_glu_gemm``)."""
    if cfg.kernel != "gluon":
        raise ValueError(f"gemm_split_glu: needs a Gluon config (Hopper's large-M row), got {cfg.kernel!r}")
    if out.numel() or out_head.numel():
        kernel, grid, args, kwargs = _gluon().split_glu_launch_args(xq, x_scale, weight, head, out_head, out,
                                                                    _gluon_config(cfg))
        _gluon_launcher(kernel)(grid, *args, **kwargs)


def gemm_glu(xq: torch.Tensor, x_scale: torch.Tensor, gate: tuple, up: tuple, out: torch.Tensor,
             cfg: GemmConfig) -> torch.Tensor:
    """The SwiGLU GEMM (``gluon_gemm.glu_launch_args``: ``out [M, F] = silu(g) * u``) with the Gluon config ``cfg``,
    launched through the recording launcher so eager calls replay (``fused.glu_gemm``). Hopper only: no other
    kernel has the GLU epilogue (``fused.glu_kernel_rule``)."""
    if cfg.kernel != "gluon":
        raise ValueError(f"gemm_glu: needs a Gluon config (Hopper's large-M row), got {cfg.kernel!r}")
    if out.numel():
        kernel, grid, args, kwargs = _gluon().glu_launch_args(xq, x_scale, gate, up, out, _gluon_config(cfg))
        _gluon_launcher(kernel)(grid, *args, **kwargs)
    return out
