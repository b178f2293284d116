"""Pure-torch twins of the fused block kernels (``triton_fused.py``): the CPU path and the test oracle.

Same signatures and float32 arithmetic as the kernels (one rounding at the end). Row quantization is
``reference._quantize_float_rows``, so the int8 codes follow the same rules as ``quantize_rows``:
absmax of the finite values / 127 (at least ``TINY_SCALE``), round half to even, NaN/Inf rows get
scale NaN and store 0 for their non-finite elements.
"""

from __future__ import annotations

import torch

from .hadamard import rotate
from .reference import _quantize_float_rows, epilogue, int8_matmul


def _rotated(y: torch.Tensor, rotate_group: int) -> torch.Tensor:
    """``y`` (float32 rows) with each ConvRot group rotated (``hadamard.rotate``, float64 sums), or as is."""
    return rotate(y, rotate_group) if rotate_group else y


# The norms ``norm_modulate_quantize`` applies before modulating: LayerNorm without affine (FLUX, Qwen-Image)
# or RMSNorm (Z-Image), each optionally times a weight [K].
NORMS = ("layer", "rms")


def norm_modulate_quantize(x2, shift, mscale, rows_per_batch: int, eps: float, rotate_group: int = 0,
                           norm: str = "layer", weight=None):
    """``quant(rot(norm(x2) * (1 + mscale[b]) + shift[b]))``; x2 [M, K], shift (or None) / mscale [B, K],
    b = row // rows_per_batch; norm: LayerNorm ("layer") or RMSNorm ("rms"), times ``weight`` [K] when given;
    rot: the ConvRot group rotation (``rotate_group`` > 0) or the identity.

    Returns q int8 [M, K] and scale float32 [M]."""
    m = x2.shape[0]
    xf = x2.float()
    d = xf - xf.mean(dim=1, keepdim=True) if norm == "layer" else xf
    var = (d * d).mean(dim=1, keepdim=True)
    batch = torch.arange(m, device=x2.device) // rows_per_batch
    y = d * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.float()
    y = y * (1.0 + mscale.float()[batch])
    if shift is not None:
        y = y + shift.float()[batch]
    return _quantize_float_rows(_rotated(y, rotate_group))


# The MLP activation functions of the fused quantizer (``glu_quantize``) -> input columns per output column:
# SwiGLU reads a gate and an up half (FLUX.2, Z-Image), GELU with the tanh approximation one column (FLUX.1,
# Chroma, Qwen-Image, Wan); "identity" takes an activation computed already (the SwiGLU GEMM's output, after
# FLUX.2's single-block attention output: ``kernels.fused.glu_gemm``).
ACTIVATIONS = {"swiglu": 2, "gelu_tanh": 1, "identity": 1}


def activated(glu: torch.Tensor, f: int, activation: str = "swiglu", up=None) -> torch.Tensor:
    """Float32 ``silu(glu[:, :f]) * u`` ("swiglu"; u = ``up`` [M, F] or ``glu[:, f:2f]``),
    ``gelu_tanh(glu[:, :f])`` ("gelu_tanh") or ``glu[:, :f]`` ("identity")."""
    g = glu[:, :f].float()
    if activation == "identity":
        return g
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(g, approximate="tanh")
    u = up if up is not None else glu[:, f:2 * f]
    return torch.nn.functional.silu(g) * u.float()


def glu_gemm(xq: torch.Tensor, x_scale: torch.Tensor, gate: tuple, up: tuple, out_dtype: torch.dtype) -> torch.Tensor:
    """``h [M, F]`` in ``out_dtype`` = ``silu(g) * u`` in float32, rounded once, where ``g`` and ``u`` are the
    INT8 GEMMs of ``xq [M, K]`` (int8), ``x_scale [M]`` or ``[M, 1]`` with ``gate = (q [F, K], scale, bias)`` and
    ``up`` likewise, each rounded to ``out_dtype`` as the two GEMMs write them (``reference.epilogue``): the twin of
    the GLU GEMM, which writes only ``h`` (half the bytes of ``g`` and ``u``)."""
    xs = x_scale.reshape(-1, 1)
    g, u = (epilogue(int8_matmul(xq, q), xs, scale, bias, out_dtype) for q, scale, bias in (gate, up))
    return activated(g, g.shape[1], "swiglu", u).to(out_dtype)


def split_glu_gemm(xq: torch.Tensor, x_scale: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None, head: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight ``q [head + 2F, K]`` whose output columns are ``[y_head | g | u]`` (FLUX.2's single-block linear1:
    q/k/v then the MLP's gate and up halves): ``(y_head [M, head], h [M, F])``,
    the INT8 GEMM's first columns as ``int8_gemm`` writes them and ``silu(g) * u`` of the rest, each of g and u
    rounded to ``out_dtype`` first and h rounded once (``glu_gemm``'s values for the weight's row blocks)."""
    y = epilogue(int8_matmul(xq, q), x_scale.reshape(-1, 1), scale, bias, out_dtype)
    f = (q.shape[0] - head) // 2
    return y[:, :head].contiguous(), activated(y[:, head:], f, "swiglu").to(out_dtype)


def glu_rows(prefix, glu, f: int, activation: str = "swiglu", up=None) -> torch.Tensor:
    """Float32 rows ``[prefix | act(glu)]`` [M, P + F] (``activated``)."""
    act = activated(glu, f, activation, up)
    return act if prefix is None else torch.cat((prefix.float(), act), dim=1)


def glu_quantize(prefix, glu, f: int, rotate_group: int = 0, activation: str = "swiglu", up=None):
    """prefix [M, P] or None, glu [M, 2F] (SwiGLU) or [M, F] (GELU-tanh; SwiGLU's gate with ``up`` [M, F]) ->
    q int8 [M, P + F], scale float32 [M] (rows rotated per ConvRot group when ``rotate_group`` > 0; P and F are
    multiples of it)."""
    return _quantize_float_rows(_rotated(glu_rows(prefix, glu, f, activation, up), rotate_group))


def rms_rope(x: torch.Tensor, weight: torch.Tensor, pe: torch.Tensor, eps: float) -> torch.Tensor:
    """Float32 ``rope(rms_norm(x) * weight)``; x [B, H, S, D], pe [Bp, 1, S, D/2, 2, 2] float32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return rope(y, pe)


# Where ``qk_norm_rope`` takes the RMS of q and k: over each head (weights [D]) or the whole row (weights [H*D]).
QK_NORMS = ("head", "row")


def rope(y: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Float32 rotation of pairs (2i, 2i+1) of ``y`` [B, H, S, D] by ``pe`` [Bp, 1, S, D/2, 2, 2]."""
    y2 = y.reshape(*y.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * y2[..., 0] + pe[..., 1] * y2[..., 1]).reshape(y.shape)


def heads_view_of(out: torch.Tensor, x: torch.Tensor, heads: int) -> bool:
    """Whether ``out`` [B, H, S, D] is the projection ``x`` [B, S, H * D] itself, seen per head (same first
    address, ``x.view(B, S, H, D).transpose(1, 2)``'s strides): ``qk_norm_rope`` then writes q or k in place and
    leaves v where it is (no copy), e.g. the q/k/v column thirds of a packed ``[B, S, 3 * H * D]`` projection,
    which cuDNN's attention reads as its packed-QKV layout."""
    b, s, width = x.shape
    d = width // heads
    if out.data_ptr() != x.data_ptr() or tuple(out.shape) != (b, heads, s, d):
        return False
    want = (x.stride(0), d * x.stride(2), x.stride(1), x.stride(2))
    return all(n == 1 or got == w for n, got, w in zip(out.shape, out.stride(), want, strict=True))  # size 1: any


def qk_norm_rope(xq, xk, xv, q_weight, k_weight, pe, q, k, v, seq_off: int, heads: int, eps_q: float,
                 eps_k: float, row_norm: bool = False):
    """xq, xk, xv [B, S, H*D] -> q, k (normalized, rotated) and v written into [B, H, S_total, D] at ``seq_off``;
    pe [Bp, 1, S_total, D/2, 2, 2] float (used in float32); ``row_norm``: RMS over the whole row (weights
    [H*D]) instead of each head (weights [D]). q, k and v may be their projections' own per-head views
    (``heads_view_of``): q and k are then normalized in place and v is left as it is."""
    bsz, s, width = xq.shape
    d = width // heads
    pe_part = pe[:, :, seq_off:seq_off + s].float()

    def heads_of(x):
        return x.reshape(bsz, s, heads, d).transpose(1, 2)

    def normed(x, w, eps):
        if not row_norm:
            return rms_rope(heads_of(x), w, pe_part, eps)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * w.float()
        return rope(heads_of(y), pe_part)

    q[:, :, seq_off:seq_off + s] = normed(xq, q_weight, eps_q).to(q.dtype)
    k[:, :, seq_off:seq_off + s] = normed(xk, k_weight, eps_k).to(k.dtype)
    if not heads_view_of(v, xv, heads):
        v[:, :, seq_off:seq_off + s] = heads_of(xv).to(v.dtype)


def rms_norm_gate_add(x2, y2, weight, gate, rows_per_batch: int, eps: float) -> torch.Tensor:
    """``x2 + gate[b] * rms_norm(y2) * weight`` in float32, rounded once to x2's dtype (a new tensor); x2, y2
    [M, N], weight [N], gate [B, N], b = row // rows_per_batch."""
    yf = y2.float()
    n = yf * torch.rsqrt(yf.pow(2).mean(dim=1, keepdim=True) + eps) * weight.float()
    batch = torch.arange(x2.shape[0], device=x2.device) // rows_per_batch
    return (x2.float() + gate.float()[batch] * n).to(x2.dtype)


def rms_norm_gate_add_quantize(x2, y2, post_weight, gate, mscale, rows_per_batch: int, eps_post: float, eps: float,
                               rotate_group: int = 0, weight=None):
    """``rms_norm_gate_add`` and then the RMS ``norm_modulate_quantize`` (no shift) of its rounded result:
    (out [M, K] in x2's dtype, q int8 [M, K], scale float32 [M])."""
    out = rms_norm_gate_add(x2, y2, post_weight, gate, rows_per_batch, eps_post)
    return (out, *norm_modulate_quantize(out, None, mscale, rows_per_batch, eps, rotate_group, "rms", weight))


def int8_gemm_residual(xq, x_scale, q, w_scale, bias, residual, gate, rows_per_batch: int, lora_h=None,
                       lora_b=None) -> torch.Tensor:
    """``residual += gate[b] * (int8 GEMM + epilogue)`` in float32, rounded once; in place, returns ``residual``.

    xq [M, K] int8, x_scale [M], q [N, K] int8, w_scale [] or [N], bias [N] or None, residual [M, N],
    gate [B, N], b = row // rows_per_batch; optional low-rank term lora_h [M, R], lora_b [N, R] (added in the
    epilogue, inside the gate)."""
    y = epilogue(int8_matmul(xq, q), x_scale, w_scale, bias, torch.float32, lora_h, lora_b)
    batch = torch.arange(y.shape[0], device=y.device) // rows_per_batch
    residual.copy_((residual.float() + gate.float()[batch] * y).to(residual.dtype))
    return residual
