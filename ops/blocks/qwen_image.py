"""Qwen-Image blocks on the fused kernels: ComfyUI's ``QwenImageTransformerBlock`` with one activation
quantization per input, fewer launches and less memory traffic.

A Qwen-Image step (60 blocks) runs 840 INT8 linears eagerly; to_q, to_k and to_v (and add_q/k/v_proj) each
quantize the same modulated activation again, and the step is bound by Python on the H200 (issue 13). Per
stream (image, text) a fused block runs:

  LayerNorm + modulation + quantization, ONCE -> to_q, to_k, to_v (three INT8 GEMMs on the same rows)
  q/k RMSNorm + RoPE + split into heads, both streams into one ``[B, S, H, D]`` buffer (no cat)
  attention (ComfyUI's ``optimized_attention``, the user's backend, or 8-bit: ``attention_choice``)
  attention output + quantization -> to_out / to_add_out with ``x += gate * y`` in the GEMM epilogue
  LayerNorm + modulation + quantization -> FFN up projection; GELU-tanh + quantization -> FFN down
  projection with ``x += gate * y`` in its epilogue.

The three projections stay three layers: concatenating their weights into one GEMM would save two launches
and two cast-path calls per stream (~240 host calls per step) but would break what ComfyUI does per layer
(LoRA keys, per-layer offloading and DynamicVRAM, saving in the file's layout) or need a second copy of the
weights; sharing the quantization is what the rows allow without touching the weights.

Registered as ComfyUI "dit" block replacements (``("double_block", i)``). Qwen-Image's hook does not pass
the text attention mask, so a per-clone DIFFUSION_MODEL wrapper (``_mask_rule``) marks calls that carry one
in their transformer options, and the fused blocks hand them to ComfyUI's block. Other rules (each logged
once): per-token modulation (the "index_timestep_zero" reference method doubles the timestep batch),
attention patches, a layer that is not a plain INT8 layer (SmoothQuant, lowvram patches; dynamic LoRAs run fused),
q/k/v layers rotated by different ConvRot groups (they share one quantization), a RoPE table of another
shape, non-identity dropout.

Numerics: float32 inside each fused kernel, rounded once, where ComfyUI rounds to bf16 after every op
(``tests/test_blocks_qwen_image.py`` compares both against float64).
"""

from __future__ import annotations

import weakref

import torch
from comfy.ldm.qwen_image.model import GELU, QwenImageTransformerBlock
from comfy.patcher_extension import WrappersMP

from ... import kernels
from . import common

ARCH = "Qwen-Image"
WRAPPER_KEY = "int8_w8a8.fused_blocks"


def _mask_rule(executor, x, timestep, context, attention_mask=None, ref_latents=None, additional_t_cond=None,
               transformer_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature; the dict is never mutated here)
    """DIFFUSION_MODEL wrapper: a call with a text attention mask gets ``common.OFF_KEY`` in its transformer
    options (a copy), since the block hook does not pass the mask to the fused blocks."""
    if attention_mask is not None:
        transformer_options = {**transformer_options, common.OFF_KEY: "attention mask present"}
    return executor(x, timestep, context, attention_mask, ref_latents, additional_t_cond, transformer_options,
                    **kwargs)


def _identity_dropout(m) -> bool:
    return isinstance(m, torch.nn.Dropout) and (m.p == 0 or not m.training)


def _ffn_ok(ff) -> bool:
    """ComfyUI's Qwen-Image FeedForward: GELU(tanh) projection, identity dropout, Linear."""
    net = getattr(ff, "net", None)
    return (net is not None and len(net) == 3 and isinstance(net[0], GELU) and net[0].approximate == "tanh"
            and _identity_dropout(net[1]))


def _stream_qkv(x, shift, scale, norm1, layers, q_norm, k_norm, pe, bufs, seq_off: int, heads: int) -> None:
    """One stream's modulated LayerNorm, quantized once for its three projections -> q/k norm + RoPE into
    ``bufs`` at ``seq_off``."""
    b, s, _ = x.shape
    xq, xs = kernels.fused.norm_modulate_quantize(x, shift, scale, norm1.eps, rotate_group=layers[0].input_rotation())
    proj = common.run_shared(layers, xq, xs, x.dtype, (b, s, -1))
    kernels.fused.qk_norm_rope(proj, common.small(q_norm.weight, x), common.small(k_norm.weight, x), pe, *bufs,
                               seq_off=seq_off, heads=heads, eps_q=common.rms_eps(q_norm, x.dtype),
                               eps_k=common.rms_eps(k_norm, x.dtype))


def _stream_out(x, attn, out_layer, gate1, norm2, shift2, scale2, ff, gate2) -> None:
    """One stream after attention, in place: x += g1 * out(attn); x += g2 * ff(norm2(x) modulated)."""
    aq, a_scale = kernels.quantize_rows(attn, rotate_group=out_layer.input_rotation())
    out_layer.run_quantized(aq, a_scale.reshape(-1), x.dtype, residual=x, gate=gate1)
    up, down = ff.net[0].proj, ff.net[2]
    xq, xs = kernels.fused.norm_modulate_quantize(x, shift2, scale2, norm2.eps, rotate_group=up.input_rotation())
    h = up.run_quantized(xq, xs, x.dtype)
    hq, hs = kernels.fused.glu_quantize(None, h, rotate_group=down.input_rotation(), activation="gelu_tanh")
    down.run_quantized(hq, hs, x.dtype, residual=x, gate=gate2)


def _modulation(mod: torch.nn.Module, temb: torch.Tensor):
    """ComfyUI's ``*_mod(temb)`` split as the block splits it: (shift1, scale1, gate1), (shift2, scale2, gate2),
    each ``[B, D]`` (column slices of the one ``[B, 6D]`` output)."""
    p1, p2 = mod(temb).chunk(2, dim=-1)
    return p1.chunk(3, dim=-1), p2.chunk(3, dim=-1)


class FusedBlock:
    """``patches_replace["dit"][("double_block", i)]``: QwenImageTransformerBlock i, fused."""

    def __init__(self, model: torch.nn.Module, index: int):
        self.model = weakref.ref(model)  # clones share the model; no reference cycle through model_options
        self.index = index

    def _why_not(self, block, args: dict) -> str | None:
        img, txt, vec, pe = args["img"], args["txt"], args["vec"], args.get("pe")
        attn = block.attn
        if vec.dim() != 2 or vec.shape[0] != img.shape[0]:
            return "per-token modulation (reference-image timesteps)"
        linears = [attn.to_q, attn.to_k, attn.to_v, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                   attn.to_out[0], attn.to_add_out]
        if _ffn_ok(block.img_mlp) and _ffn_ok(block.txt_mlp):
            linears += [ff.net[i] if i else ff.net[0].proj for ff in (block.img_mlp, block.txt_mlp) for i in (0, 2)]
        else:
            return "feed-forward is not GELU-tanh with identity dropout"
        why = common.why_not(args, linears, [attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k], (),
                             img)
        if why is not None:
            return why
        if txt.dtype != img.dtype:
            return f"text stream in {txt.dtype}, image stream in {img.dtype}"
        why = (common.one_rotation("q/k/v layers", attn.to_q, attn.to_k, attn.to_v)
               or common.one_rotation("q/k/v layers", attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if why is not None:
            return why
        if not _identity_dropout(attn.to_out[1]):
            return "attention output dropout is active"
        total, d = txt.shape[1] + img.shape[1], attn.dim_head
        if attn.heads * d != img.shape[-1]:
            return f"{attn.heads} heads of {d} do not make the hidden width {img.shape[-1]}"
        return common.rope_mismatch(pe, img.shape[0], total, d, token_axis=2)

    def __call__(self, args: dict, extra: dict) -> dict:
        model = self.model()
        block = model.transformer_blocks[self.index] if model is not None else None
        if block is None:
            return extra["original_block"](args)
        why = self._why_not(block, args)
        if why is not None:
            common.fallback(ARCH, why)
            return extra["original_block"](args)
        # the GEMM epilogues add into the hidden states in place; the model goes on with the returned tensors
        img, txt, temb, pe = args["img"].contiguous(), args["txt"].contiguous(), args["vec"], args["pe"]
        attn = block.attn
        (i_shift1, i_scale1, i_gate1), (i_shift2, i_scale2, i_gate2) = _modulation(block.img_mod, temb)
        (t_shift1, t_scale1, t_gate1), (t_shift2, t_scale2, t_gate2) = _modulation(block.txt_mod, temb)
        heads, s_txt = attn.heads, txt.shape[1]
        bufs = common.qkv_buffers(img, heads, attn.dim_head, s_txt + img.shape[1])
        _stream_qkv(txt, t_shift1, t_scale1, block.txt_norm1, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                    attn.norm_added_q, attn.norm_added_k, pe, bufs, 0, heads)
        _stream_qkv(img, i_shift1, i_scale1, block.img_norm1, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q,
                    attn.norm_k, pe, bufs, s_txt, heads)
        joint = common.attention(*bufs, heads, args.get("transformer_options") or {})
        del bufs
        _stream_out(img, joint[:, s_txt:], attn.to_out[0], i_gate1, block.img_norm2, i_shift2, i_scale2,
                    block.img_mlp, i_gate2)
        _stream_out(txt, joint[:, :s_txt], attn.to_add_out, t_gate1, block.txt_norm2, t_shift2, t_scale2,
                    block.txt_mlp, t_gate2)
        return {"img": img, "txt": txt}


def install(patcher) -> int:
    """Register the fused blocks on ``patcher`` (a ModelPatcher of ComfyUI's QwenImageTransformer2DModel) and the
    mask wrapper on its clone-local wrappers; returns how many blocks. The RoPE table gets an
    ``EagerRopeTable`` object patch unless another node patched it already."""
    model = patcher.model.diffusion_model
    common.patch_rope_table(patcher, model)
    count = common.register(patcher, ARCH, (
        ("double_block", model.transformer_blocks, QwenImageTransformerBlock, lambda i: FusedBlock(model, i)),))
    if count and not patcher.get_wrappers(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
        patcher.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _mask_rule)
    return count
