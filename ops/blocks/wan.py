"""Wan 2.1 / 2.2 blocks on the fused kernels: ComfyUI's ``WanAttentionBlock`` (text-to-video cross-attention).

Per block a fused call runs:

  LayerNorm + modulation + quantization, ONCE -> self-attention q, k, v (three INT8 GEMMs on the same rows)
  q/k RMSNorm over the whole row + RoPE + split into heads into a ``[B, S, H, D]`` buffer (no copy)
  attention (ComfyUI's ``optimized_attention``, the user's backend, or 8-bit: ``attention_choice``)
  attention output + quantization -> o GEMM with ``x += e2 * y`` in its epilogue
  cross-attention: norm3 (LayerNorm with its affine weight and bias, or none) + quantization -> q GEMM, ComfyUI's
  q/k norms, k/v projections of the text context and attention (``optimized_attention``, as its module calls
  it), attention output + quantization -> o GEMM with ``x += y`` in its epilogue
  LayerNorm + modulation + quantization -> FFN up projection; GELU-tanh + quantization -> FFN down projection
  with ``x += e5 * y`` in its epilogue.

In the cross-attention only the video-token side is fused (norm3 written and read again in bf16, and the
residual add, are ~0.6 GB of traffic per block at 14040 tokens x 5120); the text side (512 tokens) runs
ComfyUI's layers. Its image variant (Wan 2.1 I2V) needs the CLIP token count, which the block hook does not
pass: those blocks run ComfyUI's block.

Registered as ComfyUI "dit" block replacements (``("double_block", i)``) on ``WanModel``. Each call checks the
rules below and otherwise runs ComfyUI's block (logged once per reason): a text-to-video cross-attention,
one modulation per batch entry (not Wan 2.2 TI2V's per-frame timesteps), no attention patches (``attn1_patch``,
``attn2_patch``), plain INT8 layers (dynamic LoRAs run fused; no SmoothQuant or lowvram patches), q/k/v
rotated by the same ConvRot group (they share one quantization), q/k norms present, a RoPE table for every token.

The hidden states are updated in place by the GEMM epilogues (ComfyUI's Wan block makes a contiguous copy of
its input first, so the model's first block input, a transposed patch embedding, is copied here too).
Numerics: float32 inside each fused kernel, rounded once (``tests/test_blocks_wan.py`` compares ComfyUI's
blocks and the fused ones with float64).
"""

from __future__ import annotations

import weakref

import comfy.ldm.wan.model
import comfy.model_management
import torch
from comfy.ldm.wan.model import WanAttentionBlock, WanT2VCrossAttention

from ... import kernels
from . import common

ARCH = "Wan"


class FusedBlock:
    """``patches_replace["dit"][("double_block", i)]``: WanAttentionBlock i of a WanModel, fused."""

    def __init__(self, model: torch.nn.Module, index: int):
        self.model = weakref.ref(model)
        self.index = index

    @staticmethod
    def _why_not(block, args: dict, x: torch.Tensor, e: torch.Tensor) -> str | None:
        attn = block.self_attn
        options = args.get("transformer_options") or {}
        if type(block.cross_attn) is not WanT2VCrossAttention:
            return "image cross-attention (the block hook does not pass the CLIP token count)"
        if e.dim() != 4 or e.shape[1] != 1 or e.shape[2] != 6 or e.shape[0] not in (1, x.shape[0]):
            return "per-token modulation (per-frame timesteps)"
        if "attn2_patch" in options.get("patches", {}):
            return "attention patches present"
        if not attn.qk_norm:
            return "no q/k norm"
        ffn = block.ffn
        if not (isinstance(ffn, torch.nn.Sequential) and len(ffn) == 3
                and common.mlp_activation(ffn[1]) == "gelu_tanh"):
            return "feed-forward is not GELU-tanh"
        cross, norm3 = block.cross_attn, block.norm3
        if not isinstance(norm3, (torch.nn.LayerNorm, torch.nn.Identity)):
            return f"cross-attention norm {type(norm3).__name__} (a LayerNorm or none expected)"
        if isinstance(norm3, torch.nn.LayerNorm) and (norm3.weight is None) != (norm3.bias is None):
            return "cross-attention norm with a weight but no bias"
        norms = [attn.norm_q, attn.norm_k] + ([norm3] if isinstance(norm3, torch.nn.LayerNorm) else [])
        why = common.why_not(args, [attn.q, attn.k, attn.v, attn.o, cross.q, cross.o, ffn[0], ffn[2]], norms, (), x)
        if why is not None:
            return why
        why = common.one_rotation("q/k/v layers", attn.q, attn.k, attn.v)
        if why is not None:
            return why
        return common.rope_mismatch(args["pe"], x.shape[0], x.shape[1], attn.head_dim, token_axis=1)

    def __call__(self, args: dict, extra: dict) -> dict:
        model = self.model()
        block = model.blocks[self.index] if model is not None else None
        if block is None:
            return extra["original_block"](args)
        x, e0 = args["img"], args["vec"]
        why = self._why_not(block, args, x, e0)
        if why is not None:
            common.fallback(ARCH, why)
            return extra["original_block"](args)
        options = args.get("transformer_options") or {}
        attn, ffn = block.self_attn, block.ffn
        # ComfyUI's modulation: the block's table plus the time projection, in the activations' dtype
        e = (comfy.model_management.cast_to(block.modulation, dtype=x.dtype, device=x.device).unsqueeze(0) + e0)
        e = e.unbind(2)  # 6 x [B, 1, D]
        x = x.contiguous()
        b, s, _ = x.shape
        heads = attn.num_heads
        # self-attention: one quantization for q, k and v
        xq, xs = kernels.fused.norm_modulate_quantize(x, e[0], e[1], block.norm1.eps,
                                                      rotate_group=attn.q.input_rotation())
        proj = common.run_shared((attn.q, attn.k, attn.v), xq, xs, x.dtype, (b, s, -1))
        # v read where its GEMM wrote it (the buffers' layout), not copied; a v projection that is not one dense
        # [B, S, H * D] tensor (none of the pack's paths returns one) gets a buffer and the copy
        v = common.heads_of(proj[2], heads) if proj[2].is_contiguous() else common.qkv_buffers(
            x, heads, attn.head_dim, s, count=1)[0]
        bufs = (*common.qkv_buffers(x, heads, attn.head_dim, s, count=2), v)
        kernels.fused.qk_norm_rope(proj, common.small(attn.norm_q.weight, x), common.small(attn.norm_k.weight, x),
                                   args["pe"].movedim(2, 1), *bufs, seq_off=0, heads=heads,
                                   eps_q=common.rms_eps(attn.norm_q, x.dtype),
                                   eps_k=common.rms_eps(attn.norm_k, x.dtype), qk_norm="row")
        del proj
        y = common.attention(*bufs, heads, options)
        del bufs
        aq, a_scale = kernels.quantize_rows(y, rotate_group=attn.o.input_rotation())
        attn.o.run_quantized(aq, a_scale.reshape(-1), x.dtype, residual=x, gate=e[2])
        self._cross_attention(block, x, args["txt"], options)
        # feed-forward
        xq, xs = kernels.fused.norm_modulate_quantize(x, e[3], e[4], block.norm2.eps,
                                                      rotate_group=ffn[0].input_rotation())
        h = ffn[0].run_quantized(xq, xs, x.dtype)
        hq, hs = kernels.fused.glu_quantize(None, h, rotate_group=ffn[2].input_rotation(), activation="gelu_tanh")
        del h
        ffn[2].run_quantized(hq, hs, x.dtype, residual=x, gate=e[5])
        return {"img": x}

    @staticmethod
    def _cross_attention(block, x: torch.Tensor, context: torch.Tensor, options: dict) -> None:
        """``x += cross_attn(norm3(x), context)`` in place: norm3 (affine LayerNorm or none) fused with the q layer's
        quantization, the output projection's residual add in its GEMM epilogue (gate 1)."""
        cross, norm3 = block.cross_attn, block.norm3
        b, s, d = x.shape
        group = cross.q.input_rotation()
        if isinstance(norm3, torch.nn.LayerNorm):
            affine = norm3.weight is not None
            weight = common.small(norm3.weight, x) if affine else None
            shift = common.small(norm3.bias, x).view(1, 1, d) if affine else None
            xq, xs = kernels.fused.norm_modulate_quantize(x, shift, x.new_zeros(1, 1, d), norm3.eps,
                                                          rotate_group=group, weight=weight)
        else:  # no norm3 (cross_attn_norm off): the rows as they are
            xq, xs = kernels.quantize_rows(x, rotate_group=group)
            xs = xs.reshape(-1)
        q = cross.norm_q(cross.q.run_quantized(xq, xs, x.dtype).view(b, s, -1))
        k = cross.norm_k(cross.k(context))
        v = cross.v(context)
        # looked up at call time: what ComfyUI's module calls now (its chosen backend, or another node's patch)
        y = comfy.ldm.wan.model.optimized_attention(q, k, v, heads=cross.num_heads, transformer_options=options)
        del q, k, v
        aq, a_scale = kernels.quantize_rows(y, rotate_group=cross.o.input_rotation())
        cross.o.run_quantized(aq, a_scale.reshape(-1), x.dtype, residual=x, gate=x.new_ones(1, 1, d))


def install(patcher) -> int:
    """Register the fused blocks on ``patcher`` (a ModelPatcher of ComfyUI's WanModel); returns how many. The
    RoPE table gets an ``EagerRopeTable`` object patch unless another node patched it already."""
    model = patcher.model.diffusion_model
    common.patch_rope_table(patcher, model, "rope_embedder")
    return common.register(patcher, ARCH, (
        ("double_block", model.blocks, WanAttentionBlock, lambda i: FusedBlock(model, i)),))
