"""``int8_w8a8::*`` torch.library custom ops with fake (meta) implementations.

torch.compile sees each op as one opaque node whose output shapes come from the fakes below, so a
compiled model traces through the pack's kernels with symbolic M and without graph breaks.
"""

from __future__ import annotations

import math

import torch

from . import api, fused
from .custom_op import custom_op

LIB = "int8_w8a8"


@custom_op(f"{LIB}::quantize_rows", mutates_args=())
def quantize_rows_op(
    x: torch.Tensor, smooth: torch.Tensor | None, rotate_group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if smooth is None:  # a fused block's attention output: the eager function's recorded launches, replayed
        return api.quantize_rows(x, rotate_group=rotate_group)
    return api.quantize_rows_impl(x, smooth, rotate_group)


@quantize_rows_op.register_fake
def _(x, smooth, rotate_group):
    k = x.shape[-1]
    m = math.prod(x.shape[:-1])
    return x.new_empty((m, k), dtype=torch.int8), x.new_empty((m, 1), dtype=torch.float32)


@custom_op(f"{LIB}::quantize_weight", mutates_args=())
def quantize_weight_op(
    w: torch.Tensor, per_row: bool, seed: int | None, rotate_group: int, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    q, out_scale = api.quantize_weight_impl(w, per_row, seed, rotate_group, scale)
    return q, out_scale.clone()


@quantize_weight_op.register_fake
def _(w, per_row, seed, rotate_group, scale):
    n, k = w.shape
    scale_shape = (n, 1) if per_row else ()
    return w.new_empty((n, k), dtype=torch.int8), w.new_empty(scale_shape, dtype=torch.float32)


@custom_op(f"{LIB}::int8_linear", mutates_args=())
def int8_linear_op(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    smooth: torch.Tensor | None,
    rotate_group: int,
    validate: bool,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
) -> torch.Tensor:
    if validate or smooth is not None:  # the public API's call checks the scale's values; smoothing: launch path
        return api.int8_linear_impl(x, q, scale, bias, out_dtype, smooth, rotate_group, validate, lora_a, lora_b)
    return fused.int8_linear_eager(x, q, scale, bias, out_dtype, rotate_group, lora_a, lora_b)


@int8_linear_op.register_fake
def _(x, q, scale, bias, out_dtype, smooth, rotate_group, validate, lora_a, lora_b):
    return x.new_empty((*x.shape[:-1], q.shape[0]), dtype=out_dtype)


@custom_op(f"{LIB}::int8_gemm", mutates_args=())
def int8_gemm_op(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    validate: bool,
    lora_h: torch.Tensor | None,
    lora_b: torch.Tensor | None,
) -> torch.Tensor:
    if validate:  # the public API's call: weight values checked each call, not replayed
        return api.int8_gemm_impl(xq, x_scale, q, scale, bias, out_dtype, validate, lora_h, lora_b)
    return fused.int8_gemm_eager(xq, x_scale, q, scale, bias, out_dtype, lora_h, lora_b)


@int8_gemm_op.register_fake
def _(xq, x_scale, q, scale, bias, out_dtype, validate, lora_h, lora_b):
    return xq.new_empty((xq.shape[0], q.shape[0]), dtype=out_dtype)


@custom_op(f"{LIB}::dequantize", mutates_args=())
def dequantize_op(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rotate_group: int, validate: bool
) -> torch.Tensor:
    return api.dequantize_impl(q, scale, dtype, rotate_group, validate)


@dequantize_op.register_fake
def _(q, scale, dtype, rotate_group, validate):
    return q.new_empty(q.shape, dtype=dtype)


# ---- the fused block kernels (kernels/fused.py): traced by fused FLUX blocks under torch.compile ----
@custom_op(f"{LIB}::norm_modulate_quantize", mutates_args=())
def norm_modulate_quantize_op(
    x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor, eps: float, rotate_group: int,
    norm: str = "layer", weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused.norm_modulate_quantize_eager(x, shift, scale, eps, rotate_group, norm, weight)


@norm_modulate_quantize_op.register_fake
def _(x, shift, scale, eps, rotate_group, norm="layer", weight=None):
    m = x.shape[0] * x.shape[1]
    return x.new_empty((m, x.shape[2]), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)


@custom_op(f"{LIB}::glu_quantize", mutates_args=())
def glu_quantize_op(
    prefix: torch.Tensor | None, glu: torch.Tensor, rotate_group: int, activation: str = "swiglu",
    up: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused.glu_quantize_eager(prefix, glu, rotate_group, activation, up)


@glu_quantize_op.register_fake
def _(prefix, glu, rotate_group, activation="swiglu", up=None):
    m = math.prod(glu.shape[:-1])
    width = fused.glu_width(glu, activation, up) + (prefix.shape[-1] if prefix is not None else 0)
    return glu.new_empty((m, width), dtype=torch.int8), glu.new_empty((m,), dtype=torch.float32)


@custom_op(f"{LIB}::glu_gemm", mutates_args=())
def glu_gemm_op(
    xq: torch.Tensor, x_scale: torch.Tensor, gate_q: torch.Tensor, gate_scale: torch.Tensor,
    gate_bias: torch.Tensor | None, up_q: torch.Tensor, up_scale: torch.Tensor, up_bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return fused.glu_gemm_eager(xq, x_scale, gate_q, gate_scale, gate_bias, up_q, up_scale, up_bias, out_dtype)


@glu_gemm_op.register_fake
def _(xq, x_scale, gate_q, gate_scale, gate_bias, up_q, up_scale, up_bias, out_dtype):
    return xq.new_empty((xq.shape[0], gate_q.shape[0]), dtype=out_dtype)


@custom_op(f"{LIB}::split_glu_gemm", mutates_args=())
def split_glu_gemm_op(
    xq: torch.Tensor, x_scale: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
    head: int, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused.split_glu_gemm_eager(xq, x_scale, q, scale, bias, head, out_dtype)


@split_glu_gemm_op.register_fake
def _(xq, x_scale, q, scale, bias, head, out_dtype):
    m, f = xq.shape[0], (q.shape[0] - head) // 2
    return xq.new_empty((m, head), dtype=out_dtype), xq.new_empty((m, f), dtype=out_dtype)


@custom_op(f"{LIB}::rms_norm_gate_add", mutates_args=())
def rms_norm_gate_add_op(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor, eps: float
) -> torch.Tensor:
    return fused.rms_norm_gate_add_eager(x, y, weight, gate, eps)


@rms_norm_gate_add_op.register_fake
def _(x, y, weight, gate, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op(f"{LIB}::rms_norm_gate_add_quantize", mutates_args=())
def rms_norm_gate_add_quantize_op(
    x: torch.Tensor, y: torch.Tensor, post_weight: torch.Tensor, gate: torch.Tensor, eps_post: float,
    scale: torch.Tensor, eps: float, weight: torch.Tensor | None = None, rotate_group: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return fused.rms_norm_gate_add_quantize_eager(x, y, post_weight, gate, eps_post, scale, eps, weight, rotate_group)


@rms_norm_gate_add_quantize_op.register_fake
def _(x, y, post_weight, gate, eps_post, scale, eps, weight=None, rotate_group=0):
    m = x.shape[0] * x.shape[1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((m, x.shape[2]), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32))


@custom_op(f"{LIB}::qk_norm_rope", mutates_args=("q", "k", "v"))
def qk_norm_rope_op(
    xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
    pe: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_off: int, heads: int, eps_q: float,
    eps_k: float, qk_norm: str = "head",
) -> None:
    fused.qk_norm_rope_eager(xq, xk, xv, q_weight, k_weight, pe, q, k, v, seq_off, heads, eps_q, eps_k, qk_norm)


@qk_norm_rope_op.register_fake
def _(xq, xk, xv, q_weight, k_weight, pe, q, k, v, seq_off, heads, eps_q, eps_k, qk_norm="head"):
    return None


@custom_op(f"{LIB}::int8_gemm_residual", mutates_args=("residual",))
def int8_gemm_residual_op(
    xq: torch.Tensor, x_scale: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
    residual: torch.Tensor, gate: torch.Tensor, lora_h: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
) -> None:
    fused.int8_gemm_residual_eager(xq, x_scale, q, scale, bias, residual, gate, lora_h, lora_b)


@int8_gemm_residual_op.register_fake
def _(xq, x_scale, q, scale, bias, residual, gate, lora_h=None, lora_b=None):
    return None
