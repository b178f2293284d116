"""The public kernel API implemented on the Triton kernels (unchecked: api.py validates first)."""

from __future__ import annotations

import torch

from . import configs, reference, triton_gemm, triton_quant
from .dispatch import Backend
from .hadamard import rotate
from .launch import TileTooLargeError
from .reference import as_rows


def int8_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    smooth: torch.Tensor | None,
    rotate_group: int,
    backend: Backend,
    config: configs.GemmConfig | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] float -> y [..., N] in out_dtype. ``config`` overrides the rule (benchmarks, tests).

    This runs once per linear layer per step, so it does as little Python as it can: batch-1 layers
    take tens of microseconds on the GPU.
    """
    k = x.shape[-1]
    x2 = as_rows(x)
    m = x2.shape[0]
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    xs = triton_quant.row_scales(m, k, x.device)
    try:
        triton_quant.launch_quantize(x2, xq, xs, smooth=smooth, rotate_group=rotate_group)
    except TileTooLargeError:  # no quantizer tile fits this GPU (logged once): these rows on the twin
        xq, xs = reference.quantize_rows_unchecked(x2, smooth, rotate_group)
        xs = xs.reshape(-1)
    lora_h = None
    if lora_a is not None:
        # h = x @ lora_a.T, padded to the kernel's rank when lora_a was prepared that way (see lora/dynamic.py)
        lora_h = reference.lora_hidden(x2, lora_a)
    out = _gemm(xq, xs, q, scale, bias, out_dtype, backend, config, lora_h, lora_b)
    return out.reshape(*x.shape[:-1], q.shape[0])


def int8_gemm(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    backend: Backend,
    lora_h: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """Already-quantized rows xq [M, K] int8 and x_scale [M, 1] -> y [M, N] in out_dtype."""
    xq = xq if xq.stride(-1) == 1 else xq.contiguous()
    return _gemm(xq, x_scale.reshape(-1).contiguous(), q, scale, bias, out_dtype, backend, None, lora_h, lora_b)


def gemm_residual(xq, xs, q, scale, bias, residual, gate, rows_per_batch: int, backend: Backend, lora_h=None,
                  lora_b=None) -> torch.Tensor:
    """``residual [M, N] += gate[row // rows_per_batch] * (GEMM [+ lora_h @ lora_b.T])``, in place (kernels/fused.py
    validated)."""
    xq = xq if xq.stride(-1) == 1 else xq.contiguous()
    return _gemm(xq, xs.contiguous(), q, scale, bias, residual.dtype, backend, None, lora_h, lora_b,
                 out=residual, gate=gate, rows_per_batch=rows_per_batch)


def _gemm(xq, xs, q, scale, bias, out_dtype, backend: Backend, config: configs.GemmConfig | None, lora_h, lora_b,
          out=None, gate=None, rows_per_batch: int = 1):
    """xq [M, K] int8 (unit column stride), xs [M] float32 -> out [M, N]: the GEMM with the config the backend's
    table picks for these operands (``config``, when given and the operands allow it). With ``gate``, ``out``
    is a residual updated in place (``triton_gemm.gemm``)."""
    m, n = xq.shape[0], q.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    ws = scale.reshape(-1) if scale.dim() else scale
    if ws.dim() and ws.stride(0) != 1:
        ws = ws.contiguous()
    table = backend.table
    tma_ok = table.tma and triton_gemm.tma_compatible(xq, q, out)
    if config is None or (config.kernel == "tma" and not tma_ok):
        config = table.pick(m, tma_ok, lora=lora_h is not None, n=n, residual=gate is not None)
    if gate is not None:
        config = configs.for_residual(config)
    triton_gemm.gemm(xq, xs, q, ws, bias, out, config, lora_h, lora_b, gate, rows_per_batch)
    return out


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rotate_group: int) -> torch.Tensor:
    """q [N, K] int8 -> w [N, K] dtype; with rotation the result is rotated back to the original basis."""
    if not rotate_group:
        return triton_quant.dequantize(q, scale, dtype)
    w = triton_quant.dequantize(q, scale, torch.float32)
    return rotate(w, rotate_group).to(dtype)
