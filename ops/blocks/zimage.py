"""Z-Image (and Lumina 2) blocks on the fused kernels: ComfyUI's ``JointTransformerBlock`` of the main layers.

A Z-Image block is a pre- and post-normalized ("sandwich") DiT block with scale-only modulation and tanh gates:

  x = x + tanh(g1) * RMSNorm2(out(attention(RoPE(qk_norm(qkv(RMSNorm1(x) * (1 + s1)))))))
  x = x + tanh(g2) * RMSNorm4(w2(silu(w1(h)) * w3(h))),  h = RMSNorm3(x) * (1 + s2)

The fused version runs, per block:

  RMSNorm (weight) + modulation + quantization -> INT8 qkv GEMM
  q/k RMSNorm + RoPE + split into heads into a ``[B, S, H, D]`` buffer (ComfyUI's RoPE table layout, no copy)
  attention (ComfyUI's ``optimized_attention``, the user's backend, or 8-bit: ``attention_choice``)
  attention output + quantization -> INT8 out GEMM
  ``x + tanh(g1) * RMSNorm(y) * w``, then RMSNorm + modulation + quantization of that, in one pass, ONCE -> w1
  and w3: on Hopper's Gluon row one GEMM writing only their SwiGLU, then its quantization; elsewhere two INT8
  GEMMs on the same rows, then SwiGLU + quantization (``common.glu_quantized``) -> w2
  ``x + tanh(g2) * RMSNorm(y) * w`` in one pass.

The post-norm needs each output row whole, so the gated residual add is a pass of its own
(``kernels.fused.rms_norm_gate_add``) rather than the GEMM epilogue; it writes a new tensor, as ComfyUI's
block does (the model keeps the first block's input for its "double_block" patches).

ComfyUI 0.29's Lumina model has no block-replacement hook, so each main layer's ``forward`` is replaced by a
per-clone object patch (``diffusion_model.layers.<i>.forward``): the shared module is never edited, other
clones run ComfyUI's blocks, unpatching restores ComfyUI's method. Each call checks the rules below and
otherwise runs ComfyUI's ``JointTransformerBlock.forward`` (logged once per reason): no attention mask, no
timestep-zero reference tokens (Z-Image omni), one modulation per batch entry, bfloat16/float32 activations
(float16 is clamped inside ComfyUI's block), q/k norms and as many key/value heads as query heads (no GQA:
Lumina 2 has 8 for 24), plain INT8 layers (dynamic LoRAs run fused; no SmoothQuant or lowvram patches), w1/w3 rotated by
the same ConvRot group (they share one quantization), a RoPE table for every token.

Numerics: float32 inside each fused kernel, rounded once (``tests/test_blocks_zimage.py`` compares ComfyUI's
blocks and the fused ones with float64). The q/k norm epsilon is the one ComfyUI's inference path uses
(``comfy-kitchen``'s ``rms_rope``: the float32 machine epsilon when the norm has none).
"""

from __future__ import annotations

import weakref

import torch
from comfy.ldm.lumina.model import JointTransformerBlock

from ... import kernels
from .. import layout
from . import common

ARCH = "Z-Image"


def _qk_eps(norm) -> float:
    """The epsilon ComfyUI's Lumina attention gives comfy-kitchen's ``rms_rope`` (float32's when unset)."""
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps


class FusedForward:
    """The per-clone ``forward`` of a main layer (or an INT8 noise refiner) of a NextDiT, fused."""

    def __init__(self, block: JointTransformerBlock):
        self.block = weakref.ref(block)  # the object patch lives on the block itself while applied

    def _why_not(self, block, x, x_mask, freqs_cis, adaln_input, timestep_zero_index, options) -> str | None:
        attn, ff = block.attention, block.feed_forward
        if timestep_zero_index is not None:
            return "per-token modulation (reference-image timesteps)"
        if not block.modulation or adaln_input is None or adaln_input.dim() != 2 or adaln_input.shape[0] != x.shape[0]:
            return "per-token or no modulation"
        if x.dtype == torch.float16:
            return "float16 activations (ComfyUI's block clamps inside)"
        if not attn.qk_norm or attn.n_local_kv_heads != attn.n_local_heads:
            return "no q/k norm or grouped-query attention"
        args = {"attn_mask": x_mask, "pe": freqs_cis, "transformer_options": options}
        why = common.why_not(args, [attn.qkv, attn.out, ff.w1, ff.w2, ff.w3],
                             [block.attention_norm1, block.attention_norm2, block.ffn_norm1, block.ffn_norm2,
                              attn.q_norm, attn.k_norm], (), x, attention_patches=False)
        if why is not None:
            return why
        why = common.one_rotation("w1/w3", ff.w1, ff.w3)
        if why is not None:
            return why
        return common.rope_mismatch(freqs_cis, x.shape[0], x.shape[1], attn.head_dim, token_axis=1)

    def __call__(self, x, x_mask, freqs_cis, adaln_input=None, timestep_zero_index=None, transformer_options={}):  # noqa: B006
        block = self.block()
        why = self._why_not(block, x, x_mask, freqs_cis, adaln_input, timestep_zero_index, transformer_options or {})
        if why is not None:
            common.fallback(ARCH, why)
            return JointTransformerBlock.forward(block, x, x_mask, freqs_cis, adaln_input,
                                                 timestep_zero_index=timestep_zero_index,
                                                 transformer_options=transformer_options)
        attn, ff = block.attention, block.feed_forward
        b, s, _ = x.shape
        scale_msa, gate_msa, scale_mlp, gate_mlp = block.adaLN_modulation(adaln_input).chunk(4, dim=1)
        # attention
        xq, xs = kernels.fused.norm_modulate_quantize(
            x, None, scale_msa, common.rms_eps(block.attention_norm1, x.dtype), norm="rms",
            weight=common.small(block.attention_norm1.weight, x), rotate_group=attn.qkv.input_rotation())
        qkv = attn.qkv.run_quantized(xq, xs, x.dtype).view(b, s, -1)
        # q and k normalized in place, v read where the GEMM wrote it: attention gets cuDNN's packed-QKV layout
        bufs = tuple(common.heads_of(p, attn.n_local_heads) for p in kernels.fused.split_qkv(qkv))
        kernels.fused.qk_norm_rope(qkv, common.small(attn.q_norm.weight, x), common.small(attn.k_norm.weight, x),
                                   freqs_cis.movedim(2, 1), *bufs, seq_off=0, heads=attn.n_local_heads,
                                   eps_q=_qk_eps(attn.q_norm), eps_k=_qk_eps(attn.k_norm))
        out = common.attention(*bufs, attn.n_local_heads, transformer_options or {})
        del bufs, qkv
        aq, a_scale = kernels.quantize_rows(out, rotate_group=attn.out.input_rotation())
        y = attn.out.run_quantized(aq, a_scale.reshape(-1), x.dtype)
        # the attention sublayer's gated post-norm add and the feed-forward's norm + modulation + quantization in
        # one pass (53 us against the two kernels' 61 on the H200, bench/NOTES.md item 41): one quantization for
        # w1 and w3
        x, xq, xs = kernels.fused.rms_norm_gate_add_quantize(
            x, y, common.small(block.attention_norm2.weight, x), gate_msa.tanh(),
            common.rms_eps(block.attention_norm2, x.dtype), scale_mlp, common.rms_eps(block.ffn_norm1, x.dtype),
            weight=common.small(block.ffn_norm1.weight, x), rotate_group=ff.w1.input_rotation())
        hq, hs = common.glu_quantized(xq, xs, x.dtype, ff.w1, ff.w3, ff.w2.input_rotation())
        y = ff.w2.run_quantized(hq, hs, x.dtype)
        return kernels.fused.rms_norm_gate_add(x, y, common.small(block.ffn_norm2.weight, x), gate_mlp.tanh(),
                                               common.rms_eps(block.ffn_norm2, x.dtype))


def install(patcher) -> int:
    """Patch the ``forward`` of each main layer of ``patcher``'s NextDiT (per clone, through object patches), and
    of each noise refiner whose linears are INT8 (``LoadOptions.quantize_extra_blocks``; by default the profile keeps
    the refiners in high precision and ComfyUI's blocks run them); returns how many. The context refiners have no
    modulation and see only the caption tokens: they run ComfyUI's block on the INT8 linears. Layers whose forward
    another node patched already are left alone. The RoPE table gets an ``EagerRopeTable`` object patch."""
    model = patcher.model.diffusion_model
    common.patch_rope_table(patcher, model, "rope_embedder")
    refiners = [(f"noise_refiner.{i}", block) for i, block in enumerate(getattr(model, "noise_refiner", ()))
                if layout.is_int8_weight(block.attention.qkv.weight)]
    count = 0
    for name, block in [(f"layers.{i}", b) for i, b in enumerate(model.layers)] + refiners:
        key = f"diffusion_model.{name}.forward"
        if type(block) is JointTransformerBlock and block.modulation and key not in patcher.object_patches:
            patcher.add_object_patch(key, FusedForward(block))
            count += 1
    common.logger.info("int8_w8a8: fused %s blocks patched on %d of %d layers (%d noise refiners)", ARCH, count,
                       len(model.layers) + len(refiners), len(refiners))
    return count
