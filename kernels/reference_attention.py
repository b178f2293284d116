"""Pure-torch twin of the 8-bit attention: the same quantization and the same blockwise arithmetic.

``quantize_qkv`` produces exactly the tensors the Triton quantization pass writes
(``triton_attention.quantize``), ``attention_quantized`` runs the kernel's online softmax over blocks of
``block_n`` keys in float32, and ``attention_8bit`` chains them (the CPU path and the tests' oracle).

Per (batch, head), with D the head size, s = sm_scale * log2(e) and H the orthonormal Hadamard matrix of
order D (identity without ``rotate``):

* ``q8[i] = round(q[i] H / qs[i])``, ``qs[i] = max(absmax_d(q[i] H) / 127, 2**-126)`` (NaN when the row holds
  NaN/Inf, so that row's output is NaN and no other row's);
* ``k8[j] = round((k[j] H - mean_j(k H)) / ks[b(j)])``, one ``ks`` per block b of ``block_n`` keys;
* V per channel d: int8 ``round(v / vs[d])`` with ``vs = max(absmax / 127, tiny)``, or e4m3
  ``fp8(v / vs[d])`` with ``vs = max(absmax / 448, tiny)``; stored transposed, ``[D, S_kv]`` per head,
  because 8-bit wgmma reads its B operand K-major; "16bit": V as given (no scale);
* scores in log2 units ``t = (q8 . k8) * (qs[i] * s * ks[b])``; blocks of keys update the running row max m,
  the row sum l and the float32 accumulator:
  - int8: ``x = exp2(t - m_blk * (1 + 2**-20 sign(m_blk)) + log2 254)`` (m_blk: this block's row max, raised by
    8 ulps so that roundings cannot lift x past 254.5, where int8 would wrap), ``P = round(x) - 127`` int8,
    ``acc = acc * 2**(m - m_new) + ((P @ V8) + 127 * colsum_b(V8)) * 2**(m_blk - m_new)``,
    ``l = l * 2**(m - m_new) + sum(x) * 2**(m_blk - m_new)``;
  - fp8: ``x = exp2(t - m_new + log2 448)``, ``acc = acc * 2**(m - m_new) + fp8(x) @ V8``,
    ``l = l * 2**(m - m_new) + sum(x)``;
  - 16bit: ``x = exp2(t - m_new)``, ``acc = acc * 2**(m - m_new) + x.to(V's dtype) @ V``,
    ``l = l * 2**(m - m_new) + sum(x)``;
* ``out = acc * (1 / l) * vs`` (the 254 or 448 of P cancels between acc and l; 16bit: ``acc * (1 / l)``).

Error budget on Gaussian q, k, v (relative to float64 attention, measured with this twin): INT8 Q per
token and K per block ~1.1 %, int8 P ~0.7 %, int8 V ~1.0 %: ~1.5 % together; e4m3 P and V add ~2.5 %
each (3 mantissa bits), ~3.5 % together; a 16-bit P and V add ~0.1-0.2 %.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .attention_configs import AttentionConfig
from .hadamard import rotate
from .reference import _INV_127_F32, _TINY_SCALE_F32, _quantize_float_rows

LOG2E = 1.4426950408889634
P_INT8_MAX = 254.0  # int8 P: round(x) in 0..254, stored as round(x) - 127
P_FP8_MAX = 448.0  # e4m3's largest finite value
INV_448 = 1.0 / 448.0
MAX_MARGIN = 2.0**-20  # int8 P: the block's row max is raised by |m| * MAX_MARGIN (8 float32 ulps)
MAGIC_F = 12582912.0  # 1.5 * 2**23: float32 spacing 1 in [2**23, 2**24) (the kernel rounds int8 P with it)
_ELEMS = 1 << 22  # score elements per chunk of the twin's attention (bounds its memory)


@dataclasses.dataclass(frozen=True)
class QuantizedQKV:
    """Attention inputs in the kernel's formats; BH = B * H, rows in (batch, head, token) order.

    q: int8 ``[BH * S_q, D]``; q_scale: float32 ``[BH * S_q]`` (per token).
    k: int8 ``[BH * S_kv, D]`` (mean-smoothed); k_scale: float32 ``[BH, ceil(S_kv / block_n)]``.
    v: int8 or float8_e4m3fn ``[BH * D, S_pad]`` (V transposed: tokens contiguous; S_pad = S_kv rounded up to
        16 for TMA; columns past S_kv are never read); v_scale: float32 ``[BH, D]``. pv = "16bit": v is the
        input's ``[B, H, S_kv, D]`` (bf16/fp16, its own strides where TMA can read them) and v_scale None.
    v_colsum: int32 ``[BH, ceil(S_kv / block_n), D]``, each block's column sums of the int8 V (pv = "int8";
        None for "fp8" and "16bit").
    shape: (B, H, S_q, S_kv, D).

    Another kernel can write these directly (the fused blocks' q/k norm + RoPE, next step of issue 14): Q needs
    nothing beyond its own row (rotate the normalized, rotated-by-RoPE row by H, absmax, round; row
    ``(b * H + h) * S_q + s``), so it fuses as is. K needs the per-head mean over all tokens and V the
    per-channel absmax over all tokens before any block is quantized: a producer that sees one tile of tokens
    writes bf16 K and V plus per-tile column sums of rotated K and channel maxima of V, and a second pass (the
    K/V kernel here) quantizes them.
    """

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    v: torch.Tensor
    v_scale: torch.Tensor | None
    v_colsum: torch.Tensor | None
    shape: tuple[int, int, int, int, int]
    block_n: int
    pv: str


def padded_kv_len(s_kv: int) -> int:
    """Row stride of the transposed V: 16 bytes is TMA's alignment for every row but the first."""
    return max(16, -(-s_kv // 16) * 16)


def _rotated(x: torch.Tensor, on: bool) -> torch.Tensor:
    return rotate(x, x.shape[-1]) if on else x.float()


def _scale_of(absmax: torch.Tensor, inv_max: torch.Tensor, bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``max(absmax * inv_max, tiny)``, the same with NaN where ``bad``): the scale values are quantized
    with, and the scale stored."""
    scale = torch.maximum(absmax * inv_max, _TINY_SCALE_F32.to(absmax.device))
    return scale, torch.where(bad, torch.full_like(scale, float("nan")), scale)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttentionConfig) -> QuantizedQKV:
    """Quantize ``q [B, H, S_q, D]``, ``k, v [B, H, S_kv, D]`` (float, any strides) as the kernel reads them."""
    b, h, s_q, d = q.shape
    s_kv = k.shape[2]
    bh = b * h
    dev = q.device
    # Q: per token
    q8, qs = _quantize_float_rows(_rotated(q, cfg.rotate).reshape(bh * s_q, d))
    # K: subtract the per-head mean over tokens, then one scale per block of block_n keys
    kr = _rotated(k, cfg.rotate).reshape(bh, s_kv, d)
    ks = kr - kr.sum(dim=1, keepdim=True) / s_kv
    nk = -(-s_kv // cfg.block_n)
    pad = nk * cfg.block_n - s_kv
    kb = torch.nn.functional.pad(ks, (0, 0, 0, pad)).reshape(bh, nk, cfg.block_n * d)
    finite = torch.isfinite(kb)
    kscale, k_scale = _scale_of(torch.where(finite, kb.abs(), 0.0).amax(dim=2), _INV_127_F32.to(dev),
                                ~finite.all(dim=2))
    inv = torch.reciprocal(kscale)
    k8 = torch.where(finite, torch.round(kb * inv[..., None]).clamp(-128, 127), 0.0)
    k8 = k8.reshape(bh, nk * cfg.block_n, d)[:, :s_kv].to(torch.int8).reshape(bh * s_kv, d)
    if not cfg.quantizes_v:
        return QuantizedQKV(q8, qs, k8, k_scale, v, None, None, (b, h, s_q, s_kv, d), cfg.block_n, cfg.pv)
    # V: per channel, transposed
    vf = v.float().reshape(bh, s_kv, d)
    vfin = torch.isfinite(vf)
    vmax = torch.where(vfin, vf.abs(), 0.0).amax(dim=1)
    inv_max = _INV_127_F32 if cfg.pv == "int8" else torch.tensor(INV_448, dtype=torch.float32)
    _, v_scale = _scale_of(vmax, inv_max.to(dev), ~vfin.all(dim=1))
    # a channel holding NaN/Inf has no finite scale: its values are quantized with scale 1 (the output
    # channel is NaN through the stored scale)
    vinv = torch.reciprocal(torch.where(torch.isnan(v_scale), 1.0, v_scale))
    y = torch.where(vfin, vf * vinv[:, None, :], 0.0)
    s_pad = padded_kv_len(s_kv)
    colsum = None
    if cfg.pv == "int8":
        v8 = torch.round(y).clamp(-128, 127)
        colsum = torch.nn.functional.pad(v8, (0, 0, 0, pad)).reshape(bh, nk, cfg.block_n, d).sum(dim=2)
        colsum = colsum.to(torch.int32)
        v8 = v8.to(torch.int8)
    else:
        v8 = y.to(torch.float8_e4m3fn)
    vt = torch.zeros((bh, d, s_pad), dtype=v8.dtype, device=dev)
    vt[:, :, :s_kv] = v8.transpose(1, 2)
    return QuantizedQKV(q8, qs, k8, k_scale, vt.reshape(bh * d, s_pad), v_scale, colsum, (b, h, s_q, s_kv, d),
                        cfg.block_n, cfg.pv)


def attention_quantized(qa: QuantizedQKV, sm_scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """Attention over quantized inputs, blockwise as the kernel runs it (block_n and pv come from ``qa``);
    returns ``[B, H, S_q, D]`` in ``out_dtype``."""
    b, h, s_q, s_kv, d = qa.shape
    bh, bn = b * h, qa.block_n
    nk = -(-s_kv // bn)
    out = torch.empty((bh, s_q, d), dtype=out_dtype, device=qa.q.device)
    mult = torch.tensor(sm_scale * LOG2E, dtype=torch.float32)
    q8 = qa.q.reshape(bh, s_q, d)
    rm_q = qa.q_scale.reshape(bh, s_q) * mult
    v16 = qa.pv == "16bit"
    vt = qa.v.reshape(bh, s_kv, d) if v16 else qa.v.reshape(bh, d, -1)
    rows = max(1, _ELEMS // max(1, bn * max(1, bh)))
    for r0 in range(0, s_q, rows):
        r1 = min(s_q, r0 + rows)
        qf = q8[:, r0:r1].float()
        m = torch.full((bh, r1 - r0), float("-inf"), device=qf.device)
        lsum = torch.zeros_like(m)
        acc = torch.zeros((bh, r1 - r0, d), device=qf.device)
        for j in range(nk):
            k0, k1 = j * bn, min(s_kv, (j + 1) * bn)
            kf = qa.k.reshape(bh, s_kv, d)[:, k0:k1].float()
            rm = rm_q[:, r0:r1] * qa.k_scale[:, j : j + 1]
            t = (qf @ kf.transpose(1, 2)) * rm[..., None]  # exact integer products, one rounding
            m_blk = t.amax(dim=2)
            m_new = torch.maximum(m, m_blk)
            alpha = torch.exp2(m - m_new)
            vb = vt[:, k0:k1].float() if v16 else vt[:, :, k0:k1].float().transpose(1, 2)  # [bh, keys, d]
            if v16:
                x = torch.exp2(t - m_new[..., None])
                acc = acc * alpha[..., None] + x.to(qa.v.dtype).float() @ vb
                lsum = lsum * alpha + x.sum(dim=2)
            elif qa.pv == "int8":
                m_safe = m_blk + m_blk.abs() * MAX_MARGIN
                x = torch.exp2(t - m_safe[..., None] + math.log2(P_INT8_MAX))
                p = torch.round(x) - 127.0
                pv = p @ vb + 127.0 * qa.v_colsum[:, j, None, :].float()  # exact: |sums| < 2**24
                beta = torch.exp2(m_blk - m_new)
                acc = acc * alpha[..., None] + pv * beta[..., None]
                lsum = lsum * alpha + x.sum(dim=2) * beta
            else:
                x = torch.exp2(t - m_new[..., None] + math.log2(P_FP8_MAX))
                pv = x.to(torch.float8_e4m3fn).float() @ vb
                acc = acc * alpha[..., None] + pv
                lsum = lsum * alpha + x.sum(dim=2)
            m = m_new
        o = acc * torch.reciprocal(lsum)[..., None]
        if not v16:
            o = o * qa.v_scale[:, None, :]
        out[:, r0:r1] = o.to(out_dtype)
    return out.reshape(b, h, s_q, d)


def attention_8bit(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Twin of ``kernels.attention_8bit``: ``q [B, H, S_q, D]``, ``k, v [B, H, S_kv, D]`` -> ``[B, H, S_q, D]`` in
    q's dtype (arguments as checked by ``attention.check_attention_args``)."""
    cfg = config or AttentionConfig()
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return attention_quantized(quantize_qkv(q, k, v, cfg), sm_scale, q.dtype)
