"""FLUX.1, FLUX.2 and Chroma blocks on the fused kernels: ComfyUI's ``comfy.ldm.flux.layers`` double/single
stream blocks with less memory traffic.

In an eager FLUX.2 step about 40% of the GPU time is not GEMMs or attention but norms, modulation,
RoPE, the MLP activation, concatenations, gated residual adds and the activation quantization, each reading
and writing a whole bf16 activation (``bench/NOTES.md``). For blocks whose linears are the pack's INT8
layers, the replacements here run the same math with ``kernels.fused``:

  LayerNorm + modulation + quantization -> INT8 qkv / linear1 / mlp-in GEMM
  q/k RMSNorm + RoPE + split into heads (both streams of a double block into one buffer, no cat)
  attention: ComfyUI's ``optimized_attention`` (the user's backend) or 8-bit, by the load's choice
  (``common.attention``; ``attention_choice`` has the rules)
  [attention | act(mlp)] + quantization -> INT8 proj / linear2 / mlp-out GEMM with ``x += gate * y``
  fused into its epilogue; act is the block's MLP activation: SwiGLU (FLUX.2) or GELU-tanh (FLUX.1, Chroma).

The same block classes run in three ComfyUI models: ``Flux`` (FLUX.1 and FLUX.2: modulation computed in the
block from ``vec``, or by the model for FLUX.2's global modulation) and ``Chroma`` (``modulation=False``: the
model's approximator precomputes every block's shift/scale/gate and passes them as ``vec``). They are
registered as ComfyUI "dit" block replacements (``set_model_patch_replace``) on the model the pack's loader
builds, so clones, LoRA patches and offloading go through ComfyUI as usual. Each call checks the rules of
``common.why_not`` and these, and otherwise runs ComfyUI's own block (logged once per reason): modulation
of shape [B, 1, D] (not the per-token modulation of reference-image edits), an MLP activation the kernels
compute (SwiGLU or GELU-tanh; not FLUX.2's YakMLP), and ConvRot groups that do not straddle linear2's
attention / MLP input boundary. ConvRot layers stay fused: each fused quantizer rotates
its rows by the group of the layer they feed (``Int8Linear.input_rotation()``).

Under torch.compile (ComfyUI's TorchCompileModel) the fused blocks are traced too: every kernel is an
``int8_w8a8::*`` custom op, so the compiled model runs the same kernels as eager mode in one graph, and
Inductor compiles the little that is left between them (bench/NOTES.md, item 12). The model's RoPE table is
computed by ComfyUI's own ``EmbedND`` behind a custom op (``common.EagerRopeTable``, an object patch on
``pe_embedder``; bench/NOTES.md, item 13).

Numerics: float32 inside each fused kernel, rounded once, where ComfyUI rounds to bf16 after every op;
tests compare both against float64 (``tests/test_flux_fused.py``, ``tests/test_blocks_chroma.py``).
"""

from __future__ import annotations

import weakref

import torch
from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock

from ... import kernels
from ..comfy_ops import run_head_and_glu
from . import common

# ComfyUI model class name -> the name fallbacks are logged under
NAMES = {"Flux": "FLUX", "Chroma": "Chroma", "ChromaRadiance": "Chroma Radiance"}


def _stream_qkv(x, mod, norm1, qkv_layer, qk_norm, pe, bufs, seq_off: int, heads: int) -> None:
    """One stream's modulated norm -> INT8 qkv GEMM -> q/k norm + RoPE into ``bufs`` at ``seq_off``."""
    b, s, _ = x.shape
    xq, xs = kernels.fused.norm_modulate_quantize(x, mod.shift, mod.scale, norm1.eps,
                                                  rotate_group=qkv_layer.input_rotation())
    qkv = qkv_layer.run_quantized(xq, xs, x.dtype).view(b, s, -1)
    q, k, v = bufs
    kernels.fused.qk_norm_rope(
        qkv, common.small(qk_norm.query_norm.weight, x), common.small(qk_norm.key_norm.weight, x), pe, q, k, v,
        seq_off=seq_off, heads=heads, eps_q=common.rms_eps(qk_norm.query_norm, x.dtype),
        eps_k=common.rms_eps(qk_norm.key_norm, x.dtype))


def _stream_out(x, attn, mod1, mod2, proj, norm2, mlp, activation: str) -> None:
    """One stream after attention: x += g1 * proj(attn); x += g2 * mlp(norm2(x) modulated), in place."""
    aq, a_scale = kernels.quantize_rows(attn, rotate_group=proj.input_rotation())
    proj.run_quantized(aq, a_scale.reshape(-1), x.dtype, residual=x, gate=mod1.gate)
    xq, xs = kernels.fused.norm_modulate_quantize(x, mod2.shift, mod2.scale, norm2.eps,
                                                  rotate_group=mlp[0].input_rotation())
    if activation == "swiglu":
        hq, hs = common.glu_quantized(xq, xs, x.dtype, mlp[0], None, mlp[2].input_rotation())
    else:
        h = mlp[0].run_quantized(xq, xs, x.dtype)
        hq, hs = kernels.fused.glu_quantize(None, h, rotate_group=mlp[2].input_rotation(), activation=activation)
    mlp[2].run_quantized(hq, hs, x.dtype, residual=x, gate=mod2.gate)


def _mlp_activation(mlp) -> str | None:
    """A double block's MLP (``build_mlp``: Linear, activation, Linear) as a kernel activation, or None."""
    if isinstance(mlp, torch.nn.Sequential) and len(mlp) == 3:
        return common.mlp_activation(mlp[1])
    return None


def _single_activation(block: SingleStreamBlock) -> str | None:
    """A single block's MLP activation as a kernel activation (linear1's MLP part is 2F wide for SwiGLU, F for
    GELU), or None (YakMLP)."""
    act = None if block.yak_mlp else common.mlp_activation(block.mlp_act)
    want = {"swiglu": 2 * block.mlp_hidden_dim, "gelu_tanh": block.mlp_hidden_dim}.get(act)
    return act if want == block.mlp_hidden_dim_first else None


class FusedDoubleBlock:
    """``patches_replace["dit"][("double_block", i)]``: DoubleStreamBlock i of a Flux or Chroma model, fused."""

    def __init__(self, model: torch.nn.Module, index: int, arch: str):
        self.model = weakref.ref(model)  # clones share the model; no reference cycle through model_options
        self.index = index
        self.arch = arch

    def __call__(self, args: dict, extra: dict) -> dict:
        model = self.model()
        block = model.double_blocks[self.index] if model is not None else None
        img, txt, vec = args["img"], args["txt"], args["vec"]
        if block is None:
            return extra["original_block"](args)
        if block.modulation:
            img_mod1, img_mod2 = block.img_mod(vec)
            txt_mod1, txt_mod2 = block.txt_mod(vec)
        else:
            (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec
        mods = [t for m in (img_mod1, img_mod2) for t in (m.shift, m.scale, m.gate)]
        txt_mods = [t for m in (txt_mod1, txt_mod2) for t in (m.shift, m.scale, m.gate)]
        linears = [block.img_attn.qkv, block.img_attn.proj, block.img_mlp[0], block.img_mlp[-1],
                   block.txt_attn.qkv, block.txt_attn.proj, block.txt_mlp[0], block.txt_mlp[-1]]
        norms = [block.img_attn.norm.query_norm, block.img_attn.norm.key_norm, block.txt_attn.norm.query_norm,
                 block.txt_attn.norm.key_norm]
        activation = _mlp_activation(block.img_mlp)
        why = common.why_not(args, linears, norms, mods, img)
        if why is None and not all(common.per_batch(m, txt) for m in txt_mods):
            why = "per-token modulation (reference-image timesteps)"
        if why is None and (activation is None or _mlp_activation(block.txt_mlp) != activation):
            why = "MLP activation is neither SwiGLU nor GELU-tanh"
        if why is not None:
            common.fallback(self.arch, why)
            return extra["original_block"](args)
        # the GEMM epilogues add into the hidden states in place: a strided view (Chroma Radiance's first block
        # gets its patch embedding transposed) is copied once; the model goes on with the returned tensors
        img, txt = img.contiguous(), txt.contiguous()
        heads = block.num_heads
        s_txt, s_img = txt.shape[1], img.shape[1]
        bufs = common.qkv_buffers(img, heads, block.hidden_size // heads, s_txt + s_img)
        _stream_qkv(txt, txt_mod1, block.txt_norm1, block.txt_attn.qkv, block.txt_attn.norm, args["pe"], bufs, 0,
                    heads)
        _stream_qkv(img, img_mod1, block.img_norm1, block.img_attn.qkv, block.img_attn.norm, args["pe"], bufs,
                    s_txt, heads)
        attn = common.attention(*bufs, heads, args.get("transformer_options") or {})
        del bufs
        _stream_out(img, attn[:, s_txt:], img_mod1, img_mod2, block.img_attn.proj, block.img_norm2, block.img_mlp,
                    activation)
        _stream_out(txt, attn[:, :s_txt], txt_mod1, txt_mod2, block.txt_attn.proj, block.txt_norm2, block.txt_mlp,
                    activation)
        return {"img": img, "txt": common.clamp_fp16(txt)}


class FusedSingleBlock:
    """``patches_replace["dit"][("single_block", i)]``: SingleStreamBlock i of a Flux or Chroma model, fused."""

    def __init__(self, model: torch.nn.Module, index: int, arch: str):
        self.model = weakref.ref(model)
        self.index = index
        self.arch = arch

    def __call__(self, args: dict, extra: dict) -> dict:
        model = self.model()
        block = model.single_blocks[self.index] if model is not None else None
        x, vec = args["img"], args["vec"]
        if block is None:
            return extra["original_block"](args)
        mod = block.modulation(vec)[0] if block.modulation else vec
        activation = _single_activation(block)
        why = common.why_not(args, [block.linear1, block.linear2], [block.norm.query_norm, block.norm.key_norm],
                             [mod.shift, mod.scale, mod.gate], x)
        if why is None and activation is None:
            why = "MLP activation is neither SwiGLU nor GELU-tanh"
        group = block.linear2.input_rotation() if why is None else 0
        why = why or common.convrot_split(group, block.hidden_size, block.mlp_hidden_dim)
        if why is not None:
            common.fallback(self.arch, why)
            return extra["original_block"](args)
        x = x.contiguous()  # updated in place by linear2's epilogue
        b, s, hidden = x.shape
        heads = block.num_heads
        xq, xs = kernels.fused.norm_modulate_quantize(x, mod.shift, mod.scale, block.pre_norm.eps,
                                                      rotate_group=block.linear1.input_rotation())
        # on Hopper's Gluon row q/k/v and the SwiGLU's h come from two GEMMs, h written once (half the MLP's bytes)
        split = run_head_and_glu(block.linear1, xq, xs, x.dtype, 3 * hidden) if activation == "swiglu" else None
        if split is not None:
            qkv, mlp, mlp_act = split[0].view(b, s, -1), split[1], "identity"
        else:
            h = block.linear1.run_quantized(xq, xs, x.dtype).view(b, s, -1)
            qkv, mlp, mlp_act = h[..., :3 * hidden], h[..., 3 * hidden:], activation
            del h
        bufs = common.qkv_buffers(x, heads, hidden // heads, s)
        kernels.fused.qk_norm_rope(
            qkv, common.small(block.norm.query_norm.weight, x),
            common.small(block.norm.key_norm.weight, x), args["pe"], *bufs, seq_off=0, heads=heads,
            eps_q=common.rms_eps(block.norm.query_norm, x.dtype), eps_k=common.rms_eps(block.norm.key_norm, x.dtype))
        attn = common.attention(*bufs, heads, args.get("transformer_options") or {})
        del bufs, qkv
        aq, a_scale = kernels.fused.glu_quantize(attn, mlp, rotate_group=group, activation=mlp_act)
        del mlp, attn
        block.linear2.run_quantized(aq, a_scale, x.dtype, residual=x, gate=mod.gate)
        return {"img": common.clamp_fp16(x)}


def install(patcher) -> int:
    """Register the fused blocks on ``patcher`` (a ModelPatcher of ComfyUI's Flux, Chroma or Chroma Radiance);
    returns how many. The model's ``pe_embedder`` gets an ``EagerRopeTable`` object patch unless another node
    patched it already."""
    model = patcher.model.diffusion_model
    arch = NAMES[type(model).__name__]
    common.patch_rope_table(patcher, model)
    return common.register(patcher, arch, (
        ("double_block", model.double_blocks, DoubleStreamBlock, lambda i: FusedDoubleBlock(model, i, arch)),
        ("single_block", model.single_blocks, SingleStreamBlock, lambda i: FusedSingleBlock(model, i, arch)),
    ))
