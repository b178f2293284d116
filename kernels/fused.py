"""Fused block kernels: the memory-bound work around a DiT block's INT8 linears.

Public functions (Triton on NVIDIA GPUs, the twins in ``reference_fused.py`` elsewhere, by the same
dispatch rules as the rest of the package). Each takes the bf16/fp16/fp32 tensors a FLUX-style block
holds and returns what the next INT8 GEMM consumes, so the intermediate activation is never written:

- ``norm_modulate_quantize(x, shift, scale, eps, *, rotate_group=0, norm="layer", weight=None)
  -> (q [M, K] int8, x_scale [M] float32)`` (LayerNorm or RMSNorm, ``NORMS``)
- ``glu_quantize(prefix, glu, *, rotate_group=0, activation="swiglu") -> (q [M, P + F] int8, x_scale [M] float32)``
  (the MLP activation function is an argument: ``ACTIVATIONS``, SwiGLU, GELU-tanh or the identity)
- ``rms_norm_gate_add(x, y, weight, gate, eps) -> x + gate * RMSNorm(y) * weight`` (a new tensor)
- ``rms_norm_gate_add_quantize(x, y, post_weight, gate, eps_post, scale, eps, *, weight=None, rotate_group=0)
  -> (x_new, q, x_scale)`` (the two above in one pass: RMS norm + scale modulation of the new residual stream)
- ``qk_norm_rope(qkv, q_weight, k_weight, pe, q, k, v, *, seq_off, heads, eps_q, eps_k)`` (writes q, k, v;
  ``qkv`` a fused projection or the three separate ones)
- ``int8_gemm_residual(xq, x_scale, q, scale, bias, residual, gate, lora_h=None, lora_b=None) -> residual``
  (updated in place)
- ``int8_gemm(xq, x_scale, q, scale, bias, out_dtype, lora_h=None, lora_b=None) -> y [M, N]`` (the GEMM on rows
  quantized here); both with an optional low-rank (dynamic LoRA) term in the epilogue
- ``lora_down(xq, x_scale, a_q, a_scale, out_dtype) -> h [M, R]`` (that term's down projection of the same rows)
- ``glu_gemm(xq, x_scale, gate, up, out_dtype) -> h [M, F]`` (a SwiGLU's two GEMMs on the same rows as one, writing
  only ``silu(g) * u``; where ``glu_gemm_rule`` allows it: Hopper's Gluon row), and ``split_glu_gemm(xq, x_scale, q,
  scale, bias, head, out_dtype) -> (y_head [M, head], h [M, F])`` for one weight ``[head | gate | up]`` (FLUX.2)

Under torch.compile each function is one ``int8_w8a8::*`` custom op (``library.py``) with a shape-only
fake, like the rest of the kernel API, so fused blocks trace into one graph; ``qk_norm_rope`` and
``int8_gemm_residual`` are ops that mutate their outputs (functionalized and re-inplaced by Inductor).
"""

from __future__ import annotations

import os

import torch

from . import _checks, api, configs, reference, reference_fused
from .direct import Replayer
from .dispatch import GLU_GEMM_ENV, choose_backend
from .reference_fused import ACTIVATIONS, NORMS, QK_NORMS

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
NORM_GATE_MAX_N = 16384  # rows normalized in one tile by ``rms_norm_gate_add`` (Z-Image: 3840)

# Eager calls: checks and launch-path work once per specialization, launches replayed (``direct.Replayer``);
# a fused block makes ~10 of these calls, each ~100 us of Python before (bench/NOTES.md item 21).
_NORM_MODULATE = Replayer("norm_modulate_quantize", interpreted=False)
_GLU = Replayer("glu_quantize", interpreted=False)
_NORM_GATE_ADD = Replayer("rms_norm_gate_add", interpreted=False)
_NORM_GATE_ADD_QUANT = Replayer("rms_norm_gate_add_quantize", interpreted=False)
_QK_NORM_ROPE = Replayer("qk_norm_rope", interpreted=False)
_GEMM_RESIDUAL = Replayer("int8_gemm_residual", interpreted=False)
_GEMM = Replayer("int8_gemm", interpreted=False)
_GLU_GEMM = Replayer("glu_gemm", interpreted=False)
_SPLIT_GLU_GEMM = Replayer("split_glu_gemm", interpreted=False)
REPLAYERS = (_NORM_MODULATE, _GLU, _NORM_GATE_ADD, _NORM_GATE_ADD_QUANT, _QK_NORM_ROPE, _GEMM_RESIDUAL, _GEMM,
             _GLU_GEMM, _SPLIT_GLU_GEMM)


def _triton(device: torch.device) -> bool:
    return choose_backend(device).name == "triton"


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` as rows ``[M, K]`` with a unit column stride (copied only when it has none)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


def _check_per_batch(t: torch.Tensor, batch: int, width: int, name: str) -> None:
    """A modulation tensor must be ``[B, 1, W]`` or ``[B, W]`` with B = ``batch`` or 1."""
    shape = tuple(t.shape)
    if len(shape) == 3 and shape[1] == 1:
        shape = (shape[0], shape[2])
    if len(shape) != 2 or shape[1] != width or shape[0] not in (1, batch):
        raise ValueError(f"{name}: expected [B, 1, {width}] or [B, {width}] with B = {batch} or 1, got "
                         f"{list(t.shape)}")


def _per_batch(t: torch.Tensor, batch: int, width: int) -> torch.Tensor:
    """A modulation tensor ``[B, 1, W]`` or ``[B, W]`` (``_check_per_batch`` passed) as ``[B, W]`` with a unit
    column stride."""
    t2 = t.reshape(t.shape[0], -1) if t.dim() == 3 else t
    t2 = t2.expand(batch, width)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


def norm_modulate_quantize(
    x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor, eps: float = 1e-6, *, rotate_group: int = 0,
    norm: str = "layer", weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 rows of ``norm(x) * (1 + scale) + shift`` (per-batch modulation).

    Args:
        x: ``[B, S, K]`` float; shift (or None: no shift), scale: ``[B, 1, K]`` (or ``[B, K]``) float.
        norm: ``"layer"``: LayerNorm (FLUX, Qwen-Image); ``"rms"``: RMSNorm (Z-Image) (``NORMS``), each times
            ``weight`` ``[K]`` when given (none: without affine).
        rotate_group: 0, or the ConvRot group (64, 128, 256; divides K) of the layer the rows feed: each
            group of the modulated row is rotated by a Hadamard matrix before quantizing.
    Returns:
        ``q`` int8 ``[B*S, K]`` and ``x_scale`` float32 ``[B*S]`` (rows with NaN/Inf: NaN).
    """
    if torch.compiler.is_compiling():
        check_norm_modulate(x, shift, scale, rotate_group, norm, weight)
        return torch.ops.int8_w8a8.norm_modulate_quantize(x, shift, scale, float(eps), rotate_group, norm, weight)
    return norm_modulate_quantize_eager(x, shift, scale, eps, rotate_group, norm, weight)


def norm_modulate_quantize_eager(x, shift, scale, eps, rotate_group=0, norm="layer", weight=None):
    """``norm_modulate_quantize`` outside tracing (eager calls, and the body of its custom op in a compiled graph):
    checks and launch path once per specialization, launches replayed."""
    return _NORM_MODULATE((x, shift, scale, weight), (float(eps), rotate_group, norm),
                          lambda: check_norm_modulate(x, shift, scale, rotate_group, norm, weight),
                          lambda: norm_modulate_quantize_impl(x, shift, scale, eps, rotate_group, norm, weight))


def check_norm_modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor, rotate_group: int = 0,
                        norm: str = "layer", weight: torch.Tensor | None = None) -> None:
    """Metadata checks of ``norm_modulate_quantize`` (also run on fake tensors while tracing)."""
    if x.dim() != 3:
        raise ValueError(f"x: expected [B, S, K], got {list(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x: expected float16/bfloat16/float32, got {x.dtype}")
    if norm not in NORMS:
        raise ValueError(f"norm: expected one of {', '.join(NORMS)}, got {norm!r}")
    b, _, k = x.shape
    if shift is not None:
        _check_per_batch(shift, b, k, "shift")
    _check_per_batch(scale, b, k, "scale")
    if weight is not None and (tuple(weight.shape) != (k,) or weight.dtype not in _FLOATS):
        raise ValueError(f"weight: expected a float [{k}] norm weight, got {list(weight.shape)} {weight.dtype}")
    _checks.check_rotate_group(rotate_group, k)


def norm_modulate_quantize_impl(x, shift, scale, eps, rotate_group=0, norm="layer", weight=None):
    """``norm_modulate_quantize`` after its checks passed (eager, and the body of its custom op)."""
    b, s, k = x.shape
    x2 = _rows(x)
    sc = _per_batch(scale, b, k)
    sh = None if shift is None else _per_batch(shift, b, k)
    if sh is not None and sh.stride(0) != sc.stride(0):  # the kernel steps through both with one row stride
        sh, sc = sh.contiguous(), sc.contiguous()
    w = None if weight is None else weight.contiguous()
    if _triton(x.device):
        from . import triton_fused

        if k <= triton_fused.NORM_MAX_K:
            try:
                return triton_fused.norm_modulate_quantize(x2, sh, sc, max(s, 1), eps, rotate_group, norm, w)
            except triton_fused.TileTooLargeError:
                pass  # logged once by the launcher
    return reference_fused.norm_modulate_quantize(x2, sh, sc, max(s, 1), eps, rotate_group, norm, w)


def glu_quantize(
    prefix: torch.Tensor | None, glu: torch.Tensor | tuple[torch.Tensor, torch.Tensor], *, rotate_group: int = 0,
    activation: str = "swiglu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 rows of ``[prefix | act(glu)]``: the input of an MLP's down projection (after the attention output
    in a parallel block's fused output linear), with the MLP's activation function ``act``.

    Args:
        prefix: ``[..., P]`` float or None (FLUX single blocks: the attention output).
        glu: the MLP's up projection output, same leading dims (any row stride: a column slice of a wider
            output): ``[..., 2F]`` gate and up halves for ``activation="swiglu"`` (``silu(g) * u``, FLUX.2), or
            the pair ``(gate, up)`` of ``[..., F]`` outputs of two projections (Z-Image's w1 / w3); ``[..., F]``
            for ``"gelu_tanh"`` (GELU, tanh approximation: FLUX.1, Chroma, Qwen-Image, Wan) and ``"identity"``
            (an activation computed already: ``glu_gemm``'s output in FLUX.2's single blocks).
        rotate_group: 0, or the ConvRot group of the layer the rows feed (divides P and F): each group of
            the row is rotated by a Hadamard matrix before quantizing.
    Returns:
        ``q`` int8 ``[M, P + F]`` and ``x_scale`` float32 ``[M]``.
    """
    glu, up = glu if isinstance(glu, (tuple, list)) else (glu, None)
    if torch.compiler.is_compiling():
        check_glu(prefix, glu, rotate_group, activation, up)
        return torch.ops.int8_w8a8.glu_quantize(prefix, glu, rotate_group, activation, up)
    return glu_quantize_eager(prefix, glu, rotate_group, activation, up)


def glu_quantize_eager(prefix, glu, rotate_group=0, activation="swiglu", up=None):
    """``glu_quantize`` outside tracing (``glu`` the gate tensor, ``up`` or None), replayed."""
    return _GLU((glu, prefix, up), (rotate_group, activation),
                lambda: check_glu(prefix, glu, rotate_group, activation, up),
                lambda: glu_quantize_impl(prefix, glu, rotate_group, activation, up))


def glu_width(glu: torch.Tensor, activation: str, up: torch.Tensor | None = None) -> int:
    """F, the activated columns of ``glu`` (``[..., 2F]`` for SwiGLU, ``[..., F]`` for GELU or with ``up``)."""
    return glu.shape[-1] if up is not None else glu.shape[-1] // ACTIVATIONS[activation]


def check_glu(
    prefix: torch.Tensor | None, glu: torch.Tensor, rotate_group: int = 0, activation: str = "swiglu",
    up: torch.Tensor | None = None,
) -> None:
    """Metadata checks of ``glu_quantize``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if up is not None and (activation != "swiglu" or up.shape != glu.shape):
        raise ValueError(f"glu: a (gate, up) pair needs swiglu and equal shapes, got {activation} with "
                         f"{list(glu.shape)} and {list(up.shape)}")
    if up is None and glu.shape[-1] % ACTIVATIONS[activation]:
        raise ValueError(f"glu: last dim must be even for {activation} (gate and up halves), got {glu.shape[-1]}")
    for name, t in (("glu", glu), ("prefix", prefix), ("up", up)):
        if t is not None and t.dtype not in _FLOATS:
            raise ValueError(f"{name}: expected float16/bfloat16/float32, got {t.dtype}")
    if prefix is not None and prefix.shape[:-1].numel() != glu.shape[:-1].numel():
        raise ValueError(f"prefix: {prefix.shape[:-1].numel()} rows but glu has {glu.shape[:-1].numel()}")
    # groups must not straddle the prefix / activation boundary
    _checks.check_rotate_group(rotate_group, glu_width(glu, activation, up))
    if prefix is not None:
        _checks.check_rotate_group(rotate_group, prefix.shape[-1])


def glu_quantize_impl(prefix, glu, rotate_group=0, activation="swiglu", up=None):
    """``glu_quantize`` after its checks passed (eager, and the body of its custom op)."""
    g2 = _rows(glu)
    u2 = None if up is None else _rows(up)
    p2 = None if prefix is None else _rows(prefix)
    f = glu_width(glu, activation, up)
    if _triton(glu.device):
        from . import triton_fused

        try:
            return triton_fused.glu_quantize(p2, g2, f, rotate_group=rotate_group, activation=activation, up=u2)
        except triton_fused.TileTooLargeError:
            pass  # logged once by the launcher
    return reference_fused.glu_quantize(p2, g2, f, rotate_group, activation, u2)


def rms_norm_gate_add(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor,
                      eps: float) -> torch.Tensor:
    """``x + gate * RMSNorm(y) * weight`` as a new tensor, float32 inside, rounded once: a sublayer output that
    is normalized after its projection, added to the residual stream through its gate (Z-Image's
    ``attention_norm2`` / ``ffn_norm2``; the gate is ``tanh`` of the modulation there, applied by the caller).

    Args:
        x: ``[B, S, N]`` float, the residual stream (not modified).
        y: ``[B, S, N]`` or ``[B * S, N]`` float, the projection output; weight: ``[N]``; gate: ``[B, 1, N]`` or
            ``[B, N]`` (B or 1).
    Returns:
        ``[B, S, N]`` in x's dtype.
    """
    if torch.compiler.is_compiling():
        check_norm_gate_add(x, y, weight, gate)
        return torch.ops.int8_w8a8.rms_norm_gate_add(x, y, weight, gate, float(eps))
    return rms_norm_gate_add_eager(x, y, weight, gate, eps)


def rms_norm_gate_add_eager(x, y, weight, gate, eps) -> torch.Tensor:
    """``rms_norm_gate_add`` outside tracing, replayed."""
    return _NORM_GATE_ADD((x, y, weight, gate), (float(eps),), lambda: check_norm_gate_add(x, y, weight, gate),
                          lambda: rms_norm_gate_add_impl(x, y, weight, gate, eps))


def check_norm_gate_add(x, y, weight, gate) -> None:
    """Metadata checks of ``rms_norm_gate_add``."""
    if x.dim() != 3:
        raise ValueError(f"x: expected [B, S, N], got {list(x.shape)}")
    b, s, n = x.shape
    if y.shape[-1] != n or y.shape[:-1].numel() != b * s:
        raise ValueError(f"y: expected [B, S, {n}] or [B * S, {n}] rows of x {list(x.shape)}, got {list(y.shape)}")
    if tuple(weight.shape) != (n,):
        raise ValueError(f"weight: expected [{n}], got {list(weight.shape)}")
    for name, t in (("x", x), ("y", y), ("weight", weight), ("gate", gate)):
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name}: expected float16/bfloat16/float32, got {t.dtype}")
    _check_per_batch(gate, b, n, "gate")


def rms_norm_gate_add_impl(x, y, weight, gate, eps) -> torch.Tensor:
    """``rms_norm_gate_add`` after its checks passed (eager, and the body of its custom op)."""
    b, s, n = x.shape
    x2, y2, g = _rows(x), _rows(y), _per_batch(gate, b, n)
    w = weight.contiguous()
    if _triton(x.device) and n <= NORM_GATE_MAX_N:
        from . import triton_fused

        return triton_fused.rms_norm_gate_add(x2, y2, w, g, max(s, 1), eps).view(b, s, n)
    return reference_fused.rms_norm_gate_add(x2, y2, w, g, max(s, 1), eps).view(b, s, n)


def rms_norm_gate_add_quantize(
    x: torch.Tensor, y: torch.Tensor, post_weight: torch.Tensor, gate: torch.Tensor, eps_post: float,
    scale: torch.Tensor, eps: float, *, weight: torch.Tensor | None = None, rotate_group: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rms_norm_gate_add(x, y, post_weight, gate, eps_post)`` and then ``norm_modulate_quantize`` of its result
    (RMSNorm with ``weight``, scale-only modulation, no shift) in one pass: a post-normalized sublayer closing and
    the next pre-normalized one opening (Z-Image's attention_norm2 + gated residual add, then ffn_norm1 +
    modulation + quantization for w1/w3). The second norm reads the result as stored (rounded to x's dtype), so
    this is the two calls in turn, without reading the new residual stream back.

    Args:
        x: ``[B, S, N]`` float residual stream (not modified); y: ``[B, S, N]`` or ``[B * S, N]`` the projection
            output; post_weight: ``[N]``; gate, scale: ``[B, 1, N]`` or ``[B, N]`` (B or 1); weight: ``[N]`` or None.
        rotate_group: the ConvRot group of the layers the rows feed (0: none).
    Returns:
        ``(x_new [B, S, N] in x's dtype, q int8 [B*S, N], x_scale float32 [B*S])``.
    """
    if torch.compiler.is_compiling():
        check_norm_gate_add_quantize(x, y, post_weight, gate, scale, rotate_group, weight)
        return torch.ops.int8_w8a8.rms_norm_gate_add_quantize(x, y, post_weight, gate, float(eps_post), scale,
                                                              float(eps), weight, rotate_group)
    return rms_norm_gate_add_quantize_eager(x, y, post_weight, gate, eps_post, scale, eps, weight, rotate_group)


def rms_norm_gate_add_quantize_eager(x, y, post_weight, gate, eps_post, scale, eps, weight=None, rotate_group=0):
    """``rms_norm_gate_add_quantize`` outside tracing, replayed."""
    return _NORM_GATE_ADD_QUANT(
        (x, y, post_weight, gate, scale, weight), (float(eps_post), float(eps), rotate_group),
        lambda: check_norm_gate_add_quantize(x, y, post_weight, gate, scale, rotate_group, weight),
        lambda: rms_norm_gate_add_quantize_impl(x, y, post_weight, gate, eps_post, scale, eps, weight, rotate_group))


def check_norm_gate_add_quantize(x, y, post_weight, gate, scale, rotate_group=0, weight=None) -> None:
    """Metadata checks of ``rms_norm_gate_add_quantize``: those of its two parts."""
    check_norm_gate_add(x, y, post_weight, gate)
    check_norm_modulate(x, None, scale, rotate_group, "rms", weight)


def rms_norm_gate_add_quantize_impl(x, y, post_weight, gate, eps_post, scale, eps, weight=None, rotate_group=0):
    """``rms_norm_gate_add_quantize`` after its checks passed (eager, and the body of its custom op)."""
    b, s, n = x.shape
    x2, y2 = _rows(x), _rows(y)
    g, sc = _per_batch(gate, b, n), _per_batch(scale, b, n)
    pw, w = post_weight.contiguous(), None if weight is None else weight.contiguous()
    if _triton(x.device) and n <= NORM_GATE_MAX_N:
        from . import triton_fused

        try:
            out, q, xs = triton_fused.rms_norm_gate_add_quantize(x2, y2, pw, g, sc, max(s, 1), eps_post, eps,
                                                                 rotate_group, w)
            return out.view(b, s, n), q, xs
        except triton_fused.TileTooLargeError:  # logged once by the launcher: the two kernels in turn
            out = rms_norm_gate_add_impl(x, y, post_weight, gate, eps_post)
            return (out, *norm_modulate_quantize_impl(out, None, scale, eps, rotate_group, "rms", weight))
    out, q, xs = reference_fused.rms_norm_gate_add_quantize(x2, y2, pw, g, sc, max(s, 1), eps_post, eps,
                                                            rotate_group, w)
    return out.view(b, s, n), q, xs


def qk_norm_rope(
    qkv: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor], q_weight: torch.Tensor,
    k_weight: torch.Tensor, pe: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, seq_off: int,
    heads: int, eps_q: float, eps_k: float, qk_norm: str = "head",
) -> None:
    """Split q/k/v projections into heads, RMS-normalize q and k, rotate them by ``pe`` and write q, k, v into
    ``[B, H, S_total, D]`` at sequence positions ``seq_off:seq_off + S``.

    Args:
        qkv: a fused projection ``[B, S, 3 * H * D]`` (FLUX), or the three projections ``(xq, xk, xv)``, each
            ``[B, S, H * D]`` with equal strides (Qwen-Image's to_q/to_k/to_v); float, unit last stride, any
            row stride.
        pe: ``[B or 1, 1, S_total, D/2, 2, 2]`` rotation matrices (ComfyUI's ``EmbedND`` layout), float32 or the
            model's dtype (Qwen-Image rounds its table to it); used in float32.
        q, k, v: ``[B, H, S_total, D]`` outputs in qkv's dtype with a unit last stride and equal strides:
            contiguous, or ``[B, S_total, H, D]`` buffers seen through ``.transpose(1, 2)``, the layout
            attention kernels return their output in (then ``[B, S, H * D]`` needs no copy). Or (seq_off 0)
            each projection's own per-head view, ``xq.view(B, S, H, D).transpose(1, 2)``: q and k are then
            normalized in place and v is not copied (a packed ``[B, S, 3 * H * D]`` projection becomes
            cuDNN's packed-QKV layout; ``reference_fused.heads_view_of``).
        qk_norm: ``"head"``: RMS over each head's D values, weights ``[D]`` (FLUX, Qwen-Image, Z-Image);
            ``"row"``: RMS over the token's whole q (k) row, weights ``[H * D]`` (Wan) (``QK_NORMS``).
    """
    xq, xk, xv = split_qkv(qkv)
    if torch.compiler.is_compiling():
        check_qk_norm_rope(xq, xk, xv, pe, q, k, v, seq_off, heads, q_weight, k_weight, qk_norm)
        torch.ops.int8_w8a8.qk_norm_rope(xq, xk, xv, q_weight, k_weight, pe, q, k, v, seq_off, heads, float(eps_q),
                                         float(eps_k), qk_norm)
        return
    qk_norm_rope_eager(xq, xk, xv, q_weight, k_weight, pe, q, k, v, seq_off, heads, eps_q, eps_k, qk_norm)


def qk_norm_rope_eager(xq, xk, xv, q_weight, k_weight, pe, q, k, v, seq_off, heads, eps_q, eps_k,
                       qk_norm="head") -> None:
    """``qk_norm_rope`` on split projections outside tracing, replayed."""
    _QK_NORM_ROPE((xq, xk, xv, q_weight, k_weight, pe, q, k, v), (seq_off, heads, eps_q, eps_k, qk_norm),
                  lambda: check_qk_norm_rope(xq, xk, xv, pe, q, k, v, seq_off, heads, q_weight, k_weight, qk_norm),
                  lambda: qk_norm_rope_impl(xq, xk, xv, q_weight, k_weight, pe, q, k, v, seq_off, heads, eps_q, eps_k,
                                            qk_norm))


def split_qkv(qkv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(xq, xk, xv)`` as given, or the three column thirds of a fused ``[B, S, 3 * W]`` projection (views)."""
    if isinstance(qkv, (tuple, list)):
        if len(qkv) != 3:
            raise ValueError(f"qkv: expected a fused projection or three (q, k, v) projections, got {len(qkv)}")
        return tuple(qkv)
    width = qkv.shape[-1]
    if width % 3:
        raise ValueError(f"qkv: last dim {width} is not 3 * heads * head dim")
    w = width // 3
    return qkv[..., :w], qkv[..., w:2 * w], qkv[..., 2 * w:]


def check_qk_norm_rope(xq, xk, xv, pe, q, k, v, seq_off: int, heads: int, q_weight=None, k_weight=None,
                       qk_norm: str = "head") -> None:
    """Metadata checks of ``qk_norm_rope`` (on the three projections)."""
    if qk_norm not in QK_NORMS:
        raise ValueError(f"qk_norm: expected one of {', '.join(QK_NORMS)}, got {qk_norm!r}")
    if xq.dim() != 3:
        raise ValueError(f"qkv: expected [B, S, H * D] projections, got {list(xq.shape)}")
    bsz, s, width = xq.shape
    d = width // heads if heads else 0
    if heads <= 0 or width != heads * d or d % 2:
        raise ValueError(f"qkv: width {width} of each of q/k/v is not heads ({heads}) * an even head dim")
    for name, t in (("k projection", xk), ("v projection", xv)):
        if t.shape != xq.shape or t.stride() != xq.stride() or t.dtype != xq.dtype:
            raise ValueError(f"{name}: expected the q projection's shape {list(xq.shape)}, strides {xq.stride()} and "
                             f"dtype {xq.dtype}, got {list(t.shape)}, {t.stride()}, {t.dtype}")
    want = (bsz, heads, q.shape[2], d)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if tuple(t.shape) != want or t.stride() != q.stride() or q.stride(-1) != 1 or t.dtype != xq.dtype:
            raise ValueError(f"{name}: expected a {xq.dtype} tensor {list(want)} with a unit last stride and "
                             f"q's strides, got {list(t.shape)} with strides {t.stride()}")
    for name, t, x in (() if torch.compiler.is_compiling() else (("q", q, xq), ("k", k, xk), ("v", v, xv))):
        # addresses are not known while tracing (the custom op's eager body checks them)
        if t.data_ptr() == x.data_ptr() and t.numel() and (seq_off or not reference_fused.heads_view_of(t, x, heads)):
            raise ValueError(f"{name}: written in place only as its projection's own [B, H, S, D] view at seq_off 0 "
                             f"(strides {x.stride(0)}, {d}, {x.stride(1)}, 1), got strides {t.stride()} at seq_off "
                             f"{seq_off}")
    if pe.dim() != 6 or not pe.is_floating_point():
        raise ValueError(f"pe: expected float [B, 1, S, D/2, 2, 2] rotation matrices, got {list(pe.shape)} {pe.dtype}")
    if seq_off < 0 or seq_off + s > q.shape[2] or pe.shape[2] < seq_off + s or tuple(pe.shape[3:]) != (d // 2, 2, 2):
        raise ValueError(f"pe {list(pe.shape)} / seq_off {seq_off}: do not cover {s} positions of head dim {d}")
    if pe.shape[0] not in (1, bsz):
        raise ValueError(f"pe: batch {pe.shape[0]} is neither 1 nor the projections' {bsz}")
    n = d if qk_norm == "head" else width
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None and tuple(w.shape) != (n,):
            raise ValueError(f"{name}: expected [{n}] for {qk_norm} norms, got {list(w.shape)}")


def qk_norm_rope_impl(xq, xk, xv, q_weight, k_weight, pe, q, k, v, seq_off, heads, eps_q, eps_k,
                      qk_norm="head") -> None:
    """``qk_norm_rope`` after its checks passed (eager, and the body of its custom op)."""
    d = xq.shape[-1] // heads
    row = qk_norm == "row"
    if _triton(xq.device) and xq.stride(-1) == 1 and (d & (d - 1)) == 0:
        from . import triton_fused

        pe = pe if pe.dtype in _FLOATS and pe[0, 0, 0].is_contiguous() else pe.float().contiguous()
        return triton_fused.qk_norm_rope(xq, xk, xv, q_weight.contiguous(), k_weight.contiguous(), pe, q, k, v,
                                         seq_off, heads, eps_q, eps_k, row)
    return reference_fused.qk_norm_rope(xq, xk, xv, q_weight, k_weight, pe, q, k, v, seq_off, heads, eps_q, eps_k,
                                        row)


def int8_gemm_residual(
    xq: torch.Tensor, x_scale: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
    residual: torch.Tensor, gate: torch.Tensor, lora_h: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual += gate * (xq @ q.T * x_scale * scale + bias [+ lora_h @ lora_b.T])``, in place, rounded once (a
    block's gated residual add fused into the GEMM epilogue, a dynamic LoRA term inside the gate).

    Args:
        xq: int8 ``[B*S, K]``; x_scale: float32 ``[B*S]``; q: int8 ``[N, K]``; scale: float32 ``[]`` or
            ``[N]``/``[N, 1]``; bias ``[N]`` or None.
        residual: ``[B, S, N]`` float, contiguous; gate: ``[B, 1, N]`` or ``[B, N]``.
        lora_h, lora_b: an optional low-rank term (``check_lora_term``): ``lora_h [B*S, R]`` (the LoRA's down
            projection of these rows, ``lora_down``) and ``lora_b [N, R]``, one float dtype, accumulated in float32.
    Returns:
        ``residual``.
    """
    if torch.compiler.is_compiling():
        check_gemm_residual(xq, q, residual, gate)
        check_lora_term(xq, q, lora_h, lora_b)
        torch.ops.int8_w8a8.int8_gemm_residual(xq, x_scale, q, scale, bias, residual, gate, lora_h, lora_b)
    else:
        int8_gemm_residual_eager(xq, x_scale, q, scale, bias, residual, gate, lora_h, lora_b)
    return residual


def int8_gemm_residual_eager(xq, x_scale, q, scale, bias, residual, gate, lora_h=None, lora_b=None) -> None:
    """``int8_gemm_residual`` outside tracing, replayed."""
    _GEMM_RESIDUAL((xq, x_scale, q, scale, bias, residual, gate, lora_h, lora_b), (),
                   lambda: (check_gemm_residual(xq, q, residual, gate), check_lora_term(xq, q, lora_h, lora_b)),
                   lambda: int8_gemm_residual_impl(xq, x_scale, q, scale, bias, residual, gate, lora_h, lora_b))


def check_gemm_residual(xq, q, residual, gate) -> None:
    """Metadata checks of ``int8_gemm_residual``."""
    if residual.dim() != 3 or not residual.is_contiguous():
        raise ValueError(f"residual: expected a contiguous [B, S, N] tensor, got {list(residual.shape)}")
    b, s, n = residual.shape
    if xq.shape[0] != b * s or q.shape[0] != n or xq.shape[1] != q.shape[1]:
        raise ValueError(f"shapes: xq {list(xq.shape)}, q {list(q.shape)}, residual {list(residual.shape)}")
    _check_per_batch(gate, b, n, "gate")


def check_lora_term(xq: torch.Tensor, q: torch.Tensor, lora_h: torch.Tensor | None,
                    lora_b: torch.Tensor | None) -> None:
    """A GEMM's low-rank term: both or neither, ``lora_h [M, R]`` (M = xq's rows) and ``lora_b [N, R]`` (N = q's
    rows), one float dtype, on xq's device."""
    if lora_h is None and lora_b is None:
        return
    if lora_h is None or lora_b is None:
        raise ValueError("lora_h, lora_b: give both (lora_h [M, R] and lora_b [N, R]) or neither")
    m, n = xq.shape[0], q.shape[0]
    if (lora_h.dim() != 2 or lora_b.dim() != 2 or lora_h.shape[0] != m or lora_b.shape[0] != n
            or lora_h.shape[1] != lora_b.shape[1] or lora_h.shape[1] == 0):
        raise ValueError(f"lora_h, lora_b: expected [{m}, R] and [{n}, R] with R >= 1, got {list(lora_h.shape)} and "
                         f"{list(lora_b.shape)}")
    if lora_h.dtype not in _FLOATS or lora_b.dtype != lora_h.dtype:
        raise ValueError(f"lora_h, lora_b: expected one float16/bfloat16/float32 dtype, got {lora_h.dtype} and "
                         f"{lora_b.dtype}")
    if lora_h.device != xq.device or lora_b.device != xq.device:
        raise ValueError(f"lora_h, lora_b: on {lora_h.device} / {lora_b.device} but xq is on {xq.device}")


def int8_gemm_residual_impl(xq, x_scale, q, scale, bias, residual, gate, lora_h=None, lora_b=None) -> None:
    """``int8_gemm_residual`` after its checks passed (eager, and the body of its custom op)."""
    b, s, n = residual.shape
    g = _per_batch(gate, b, n)
    r2 = residual.view(b * s, n)
    xs = x_scale.reshape(-1)
    if _triton(xq.device):
        from . import triton_ops

        triton_ops.gemm_residual(xq, xs, q, scale, bias, r2, g, max(s, 1), choose_backend(xq.device), lora_h, lora_b)
        return
    ws = scale.reshape(-1) if scale.dim() else scale
    reference_fused.int8_gemm_residual(xq, xs, q, ws, bias, r2, g, max(s, 1), lora_h, lora_b)


def int8_gemm(xq: torch.Tensor, x_scale: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, lora_h: torch.Tensor | None = None,
              lora_b: torch.Tensor | None = None) -> torch.Tensor:
    """``y [M, N] = xq @ q.T * x_scale * scale + bias [+ lora_h @ lora_b.T]`` on rows quantized by the functions
    above (the low-rank term as in ``int8_gemm_residual``).

    xq int8 ``[M, K]``, x_scale float32 ``[M]``; the weight's values were validated when it was loaded."""
    if torch.compiler.is_compiling():
        check_lora_term(xq, q, lora_h, lora_b)
        return torch.ops.int8_w8a8.int8_gemm(xq, x_scale.reshape(-1, 1), q, scale, bias, out_dtype, False, lora_h,
                                             lora_b)
    return int8_gemm_eager(xq, x_scale, q, scale, bias, out_dtype, lora_h, lora_b)


def int8_gemm_eager(xq, x_scale, q, scale, bias, out_dtype, lora_h=None, lora_b=None) -> torch.Tensor:
    """``int8_gemm`` outside tracing (``x_scale`` ``[M]`` or ``[M, 1]``), replayed."""
    return _GEMM((xq, x_scale, q, scale, bias, lora_h, lora_b), (out_dtype,),
                 lambda: check_lora_term(xq, q, lora_h, lora_b),
                 lambda: api.int8_gemm_impl(xq, x_scale.reshape(-1, 1), q, scale, bias, out_dtype, False, lora_h,
                                            lora_b))


def int8_linear_eager(x, q, scale, bias, out_dtype, rotate_group, lora_a=None, lora_b=None) -> torch.Tensor:
    """``int8_linear`` of an unsmoothed weight outside tracing (what the ``int8_w8a8::int8_linear`` op's body runs
    in a compiled graph: Qwen-Image's and Wan's per-block modulation and text projections, 120 a Qwen-Image step):
    the rows' quantization and the GEMM each replayed (``api.quantize_rows``, ``int8_gemm_eager``), the same
    kernels and results as ``api.int8_linear_impl``'s launch path without its ~200 us of host per call. ``x
    [..., K]`` -> ``y [..., N]`` in ``out_dtype``; ``lora_a [R, K]``, ``lora_b [N, R]`` as in ``kernels.int8_linear``
    (``h = x @ lora_a.T`` by torch in x's dtype)."""
    x2 = reference.as_rows(x)
    xq, xs = api.quantize_rows(x2, rotate_group=rotate_group)
    h = lb = None
    if lora_a is not None:  # the kernel reads lora_b in h's dtype (a per-call copy there, which is not replayed)
        h = reference.lora_hidden(x2, lora_a)
        lb = lora_b.to(h.dtype)
    return int8_gemm_eager(xq, xs, q, scale, bias, out_dtype, h, lb).reshape(*x.shape[:-1], q.shape[0])


def lora_down(xq: torch.Tensor, x_scale: torch.Tensor, a_q: torch.Tensor, a_scale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """A LoRA's down projection ``h [M, R] = x @ a.T`` of rows a fused kernel quantized, for ``lora_h`` above.

    ``xq`` int8 ``[M, K]`` and ``x_scale`` float32 ``[M]`` are the GEMM's own operands (rotated as its weight
    expects); ``a_q`` int8 ``[R, K]`` and ``a_scale`` float32 ``[R]``/``[R, 1]`` are the LoRA's ``a`` quantized per
    rank (rotated by the same ConvRot group; ``ops.lowrank.LowRank.int8_down``). It is the INT8 GEMM with R output
    columns: it reads the rows once, as int8, on the INT8 tensor cores (M * K bytes, where converting the rows to
    bf16 for a float matmul would move 5 * M * K), and its epilogue applies both scales."""
    return int8_gemm(xq, x_scale, a_q, a_scale, None, out_dtype)


def glu_gemm_rule(xq: torch.Tensor, width: int | None = None) -> str | None:
    """Why a fused block should not take ``glu_gemm`` for rows ``xq`` and a SwiGLU of ``width`` outputs (None: on
    the rows alone, before the width is known), or None, decided on the rows and shapes before ComfyUI's cast path
    fetches a streamed weight. ``glu_gemm``'s own kernel runs only on Hopper's Gluon row (``_gluon_row``);
    elsewhere the block runs the two GEMMs and ``glu_quantize`` (every GPU generation but Hopper: their kernels have
    no GLU epilogue). Off unless ``INT8_W8A8_GLU_GEMM=1``: on the H100 and the H200 it measured 0.96-1.01x the two
    GEMMs and ``glu_quantize`` at Z-Image's and klein's shapes (bench/NOTES.md item 90: the kernel is slower than the
    two GEMMs by about the bytes it saves), and it rounds h to 16 bits before its quantization. The blocks' tests
    on the CPU replace this rule to run the block's other form through ``glu_gemm``'s two-GEMM body."""
    why = _gluon_row(xq, width)
    if why is None and os.environ.get(GLU_GEMM_ENV, "0") in ("", "0"):
        return f"off unless {GLU_GEMM_ENV}=1 (measured no faster on Hopper)"
    return why


def glu_kernel_rule(xq: torch.Tensor, gate_q: torch.Tensor, up_q: torch.Tensor) -> str | None:
    """Why ``glu_gemm`` would not run its own kernel for these operands (eager tensors), or None: ``_gluon_row`` and
    weights of one shape ``[F, K]`` the Gluon GEMM takes (``gluon_gemm.supports``)."""
    if gate_q.shape != up_q.shape or gate_q.dim() != 2 or xq.shape[1] != gate_q.shape[1]:
        return f"operands xq {list(xq.shape)}, gate {list(gate_q.shape)}, up {list(up_q.shape)}: one [F, K]"
    return _gluon_row(xq, gate_q.shape[0]) or _gluon_operand(xq, gate_q) or _gluon_operand(xq, up_q)


def _gluon_row(xq: torch.Tensor, width: int | None) -> str | None:
    """Why a GEMM of rows ``xq`` and ``width`` outputs (None: not known yet) would not run Hopper's Gluon row, or
    None: a Triton backend on an SM 9.x GPU with Gluon (not the interpreter), M in the large-M bucket, outputs at
    least as wide as its tile (``GemmTable.pick``), TMA-legal rows."""
    if xq.device.type != "cuda":
        return "not on a CUDA GPU"
    backend = choose_backend(xq.device)
    if backend.name != "triton":
        return f"the {backend.name} backend"
    from .triton_quant import interpreting

    if interpreting():
        return "Triton's interpreter (Gluon kernels do not run in it)"
    if backend.table.pick(xq.shape[0], n=width).kernel != "gluon":
        return f"{xq.shape[0]} rows, {width} outputs: the GEMM table's row is not the Gluon one"
    return _tma_rows("xq", xq)


def _tma_rows(name: str, t: torch.Tensor) -> str | None:
    """Why ``t`` is not an int8 TMA operand (unit column stride, rows 16 bytes apart, a 16-byte aligned base: the
    address checked outside tracing, where ``launch.tma_ok`` would read a fake tensor's address), or None."""
    if (t.dtype != torch.int8 or t.dim() != 2 or t.shape[1] % 16 or t.stride(1) != 1 or t.stride(0) % 16
            or (not torch.compiler.is_compiling() and t.data_ptr() % 16)):
        return f"{name}: int8 rows with unit column stride, K % 16 == 0, 16-byte aligned (TMA)"
    return None


def glu_gemm(xq: torch.Tensor, x_scale: torch.Tensor, gate: tuple, up: tuple, out_dtype: torch.dtype) -> torch.Tensor:
    """``h [M, F] = silu(g) * u`` in ``out_dtype``, rounded once, where ``g`` and ``u`` are the INT8 GEMMs of the
    rows ``xq`` int8 ``[M, K]``, ``x_scale`` float32 ``[M]`` with ``gate = (q [F, K] int8, scale, bias)`` and ``up``
    likewise (scales ``[]``, ``[F]`` or ``[F, 1]``; bias ``[F]`` or None), each rounded to ``out_dtype`` as
    ``int8_gemm`` writes it (``reference_fused.glu_gemm``, the twin).

    Where ``glu_kernel_rule`` allows (Hopper's Gluon row) one GEMM computes both products, half of each output tile
    the gate's and half the up projection's, and writes only ``h``: half the bytes two GEMMs write and half what
    ``glu_quantize`` reads after them (``h`` then goes to ``quantize_rows``). Elsewhere the same values come from
    the two GEMMs and a float32 SwiGLU by torch; a fused block asks the rule first and keeps its two-GEMM path
    there. The weights' values were validated when they were loaded."""
    (gq, gs, gb), (uq, us, ub) = gate, up
    if torch.compiler.is_compiling():
        _check_glu_gemm(xq, gq, gs, gb, uq, us, ub, out_dtype)
        return torch.ops.int8_w8a8.glu_gemm(xq, x_scale.reshape(-1), gq, gs, gb, uq, us, ub, out_dtype)
    return glu_gemm_eager(xq, x_scale.reshape(-1), gq, gs, gb, uq, us, ub, out_dtype)


def glu_gemm_eager(xq, x_scale, gq, gs, gb, uq, us, ub, out_dtype) -> torch.Tensor:
    """``glu_gemm`` outside tracing, its checks once per specialization and its launch replayed."""
    return _GLU_GEMM((xq, x_scale, gq, gs, gb, uq, us, ub), (out_dtype,),
                     lambda: _check_glu_gemm(xq, gq, gs, gb, uq, us, ub, out_dtype),
                     lambda: glu_gemm_impl(xq, x_scale, gq, gs, gb, uq, us, ub, out_dtype))


def _check_glu_gemm(xq, gq, gs, gb, uq, us, ub, out_dtype) -> None:
    """Metadata checks of ``glu_gemm``: int8 rows and two weights of one shape, scales of one kind, biases on both
    or neither, a float output."""
    if xq.dtype != torch.int8 or xq.dim() != 2 or gq.dtype != torch.int8 or gq.dim() != 2 or gq.shape != uq.shape:
        raise ValueError(f"glu_gemm: expected int8 xq [M, K] and gate/up weights of one shape [F, K], got "
                         f"{xq.dtype} {list(xq.shape)}, {gq.dtype} {list(gq.shape)} and {uq.dtype} {list(uq.shape)}")
    if xq.shape[1] != gq.shape[1]:
        raise ValueError(f"glu_gemm: K = {xq.shape[1]} of the rows does not match the weights' {gq.shape[1]}")
    if (gs.dim() > 0) != (us.dim() > 0) or (gb is None) != (ub is None):
        raise ValueError("glu_gemm: give both weights per-row or per-tensor scales, and a bias to both or neither")
    if out_dtype not in _FLOATS:
        raise ValueError(f"glu_gemm: out_dtype must be one of {_FLOATS}, got {out_dtype}")


def glu_gemm_impl(xq, x_scale, gq, gs, gb, uq, us, ub, out_dtype) -> torch.Tensor:
    """``glu_gemm`` after its checks passed (eager, and the body of its custom op): the GEMM table's Gluon config
    for these rows through the recording launcher (``triton_gemm.gemm_glu``) where ``glu_kernel_rule`` allows, else
    the two GEMMs and a float32 SwiGLU (the same values up to the sigmoid's last bits)."""
    if glu_kernel_rule(xq, gq, uq) is None:
        from . import triton_gemm

        out = torch.empty((xq.shape[0], gq.shape[0]), dtype=out_dtype, device=xq.device)
        cfg = configs.glu_form(choose_backend(xq.device).table.pick(xq.shape[0], n=gq.shape[0]))
        return triton_gemm.gemm_glu(xq, x_scale, (gq, gs, gb), (uq, us, ub), out, cfg)
    xs = x_scale.reshape(-1, 1)
    g, u = (api.int8_gemm_impl(xq, xs, q, scale, bias, out_dtype, False)
            for q, scale, bias in ((gq, gs, gb), (uq, us, ub)))
    return reference_fused.activated(g, g.shape[1], "swiglu", u).to(out_dtype)


def split_glu_gemm(xq: torch.Tensor, x_scale: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None, head: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``glu_gemm`` for one weight ``q [head + 2F, K]`` (``scale`` ``[]``, ``[N]`` or ``[N, 1]``, ``bias [N]`` or
    None) whose output columns are ``[y_head | g | u]``: ``(y_head [M, head], h [M, F] = silu(g) * u)``, the first
    as ``int8_gemm`` writes it (FLUX.2's single-block q/k/v; head >= 1: without one, ``glu_gemm`` on the weight's
    halves, since an empty output would not replay).
    Where ``split_glu_rule`` allows, one launch of the SwiGLU GEMM's kernel computes both parts (their tiles share
    the GPU's waves; two launches would add a partial one); elsewhere the GEMM and a float32 SwiGLU by torch
    (``reference_fused.split_glu_gemm``'s values)."""
    if torch.compiler.is_compiling():
        _check_split_glu_gemm(xq, q, scale, bias, head, out_dtype)
        return torch.ops.int8_w8a8.split_glu_gemm(xq, x_scale.reshape(-1), q, scale, bias, head, out_dtype)
    return split_glu_gemm_eager(xq, x_scale.reshape(-1), q, scale, bias, head, out_dtype)


def split_glu_gemm_eager(xq, x_scale, q, scale, bias, head, out_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``split_glu_gemm`` outside tracing, its checks once per specialization and its launch replayed."""
    return _SPLIT_GLU_GEMM((xq, x_scale, q, scale, bias), (head, out_dtype),
                           lambda: _check_split_glu_gemm(xq, q, scale, bias, head, out_dtype),
                           lambda: split_glu_gemm_impl(xq, x_scale, q, scale, bias, head, out_dtype))


def _check_split_glu_gemm(xq, q, scale, bias, head, out_dtype) -> None:
    """Metadata checks of ``split_glu_gemm``: int8 rows and weight of one K, ``head + 2F`` rows with F >= 1."""
    if xq.dtype != torch.int8 or xq.dim() != 2 or q.dtype != torch.int8 or q.dim() != 2 or xq.shape[1] != q.shape[1]:
        raise ValueError(f"split_glu_gemm: expected int8 xq [M, K] and q [N, K], got {xq.dtype} {list(xq.shape)} and "
                         f"{q.dtype} {list(q.shape)}")
    if head < 1 or (q.shape[0] - head) % 2 or q.shape[0] - head < 2:
        raise ValueError(f"split_glu_gemm: {q.shape[0]} weight rows are not head {head} + 2F with head, F >= 1 "
                         "(without a head part: glu_gemm on the weight's two halves)")
    if out_dtype not in _FLOATS:
        raise ValueError(f"split_glu_gemm: out_dtype must be one of {_FLOATS}, got {out_dtype}")


def split_glu_rule(xq: torch.Tensor, q: torch.Tensor, head: int) -> str | None:
    """Why ``split_glu_gemm`` would not run the SwiGLU GEMM's kernel for these operands (eager tensors), or None:
    ``_gluon_row`` for the SwiGLU's width and a weight the Gluon GEMM takes."""
    return _gluon_row(xq, (q.shape[0] - head) // 2) or _gluon_operand(xq, q)


def _gluon_operand(xq: torch.Tensor, wq: torch.Tensor) -> str | None:
    """``gluon_gemm.supports`` (imported only where ``_gluon_row`` passed: the table has a Gluon row only where
    Gluon imports)."""
    from .gluon_gemm import supports

    return supports(xq, wq)


def split_glu_gemm_impl(xq, x_scale, q, scale, bias, head, out_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``split_glu_gemm`` after its checks passed (eager, and the body of its custom op)."""
    m, f = xq.shape[0], (q.shape[0] - head) // 2
    if split_glu_rule(xq, q, head) is None:
        from . import triton_gemm

        y_head = torch.empty((m, head), dtype=out_dtype, device=xq.device)
        h = torch.empty((m, f), dtype=out_dtype, device=xq.device)
        cfg = configs.glu_form(choose_backend(xq.device).table.pick(m, n=f))
        triton_gemm.gemm_split_glu(xq, x_scale, (q, scale, bias), head, y_head, h, cfg)
        return y_head, h
    y = api.int8_gemm_impl(xq, x_scale.reshape(-1, 1), q, scale, bias, out_dtype, False)
    return y[:, :head].contiguous(), reference_fused.activated(y[:, head:], f, "swiglu").to(out_dtype)
