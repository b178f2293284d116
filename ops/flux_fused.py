"""FLUX.2 blocks on the fused kernels: ComfyUI's Flux double/single stream blocks with less memory traffic.

In an eager FLUX.2 step about 40% of the GPU time is not GEMMs or attention but norms, modulation,
RoPE, SwiGLU, concatenations, gated residual adds and the activation quantization, each reading and
writing a whole bf16 activation (``bench/NOTES.md``). For blocks whose linears are the pack's INT8
layers, the replacements here run the same math with ``kernels.fused``:

  LayerNorm + modulation + quantization -> INT8 qkv / linear1 / mlp-in GEMM
  q/k RMSNorm + RoPE + split into heads (both streams of a double block into one buffer, no cat)
  attention (ComfyUI's ``optimized_attention``, so the user's attention backend is kept)
  [attention | SwiGLU] + quantization -> INT8 proj / linear2 / mlp-out GEMM with ``x += gate * y``
  fused into its epilogue.

They are registered as ComfyUI "dit" block replacements (``set_model_patch_replace``) on the model
the pack's loader builds, so clones, LoRA patches and offloading go through ComfyUI as usual. Each
call checks the rules below and otherwise runs ComfyUI's own block (logged once per reason, in eager
calls: logging inside a traced function would break the graph): no attention mask, no
``attn1_patch``/``attn1_output_patch``, modulation of shape [B, 1, D] (not the per-token modulation of
reference-image edits), FLUX.2-style SwiGLU MLPs, and every linear ``Int8Linear.fusable()`` (no
dynamic LoRA term, no SmoothQuant, no lowvram weight functions). ConvRot layers stay fused: each fused
quantizer rotates its rows by the group of the layer they feed (``Int8Linear.input_rotation()``).

Under torch.compile (ComfyUI's TorchCompileModel) the fused blocks are traced too: every kernel is an
``int8_w8a8::*`` custom op, so the compiled model runs the same kernels as eager mode in one graph, and
Inductor compiles the little that is left between them (bench/NOTES.md, item 12). One of those
leftovers is ComfyUI's RoPE table (``EmbedND``, float64 cos/sin of the token positions), which Inductor
fuses into one float64 kernel of 1.8 ms per 9B step at 1024x1024 where eager mode takes 0.1 ms; the
table is therefore computed by ComfyUI's own function behind a custom op (``EagerRopeTable``, an
object patch on ``pe_embedder``), in eager mode as well as compiled.

Numerics: float32 inside each fused kernel, rounded once, where ComfyUI rounds to bf16 after every op;
tests compare both against float64 (``tests/test_flux_fused.py``).
"""

from __future__ import annotations

import logging
import weakref

import comfy.ldm.modules.attention
import torch
from comfy.ldm.flux.layers import DoubleStreamBlock, EmbedND, SiLUActivation, SingleStreamBlock
from comfy.ldm.flux.model import Flux

from .. import kernels
from .comfy_ops import Int8Linear

logger = logging.getLogger(__name__)

_LOGGED: set[str] = set()  # fallback reasons already logged (once per process)


def _fallback(reason: str) -> None:
    if reason not in _LOGGED and not torch.compiler.is_compiling():
        _LOGGED.add(reason)
        logger.info("int8_w8a8: fused FLUX blocks: %s; running ComfyUI's block", reason)


def _rms_eps(norm, dtype: torch.dtype) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(dtype).eps


def _small(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A norm weight on the activation's device (a few hundred elements; may be offloaded)."""
    return t.to(device=like.device, dtype=like.dtype)


def _plain(module) -> bool:
    """No lowvram weight functions (patches applied on the fly) on a norm or linear."""
    return not getattr(module, "weight_function", None) and not getattr(module, "bias_function", None)


def _why_not(args: dict, linears: list, norms: list, mods: list, x: torch.Tensor) -> str | None:
    """The first rule the call breaks, or None when the fused block may run."""
    if args.get("attn_mask") is not None:
        return "attention mask present"
    if args.get("pe") is None:
        return "no positional embedding"
    patches = (args.get("transformer_options") or {}).get("patches", {})
    if "attn1_patch" in patches or "attn1_output_patch" in patches:
        return "attention patches present"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activations in {x.dtype}"
    for m in mods:
        if m.dim() != 3 or m.shape[1] != 1 or m.shape[0] not in (1, x.shape[0]):
            return "per-token modulation (reference-image timesteps)"
    if not all(isinstance(layer, Int8Linear) and layer.fusable() for layer in linears):
        return "a linear layer is not a plain INT8 layer (dynamic LoRA, SmoothQuant, kept in float or lowvram patches)"
    if not all(_plain(n) for n in norms):
        return "norm weights patched on the fly"
    return None


def _attention(q, k, v, heads: int, transformer_options: dict) -> torch.Tensor:
    """ComfyUI's attention on [B, H, S, D] q/k/v (already rotated); returns [B, S, H*D]."""
    return comfy.ldm.modules.attention.optimized_attention(q, k, v, heads, skip_reshape=True,
                                                           transformer_options=transformer_options)


def _qkv_buffers(x: torch.Tensor, heads: int, head_dim: int, seq: int):
    """q, k, v ``[B, H, S, D]`` views of ``[B, S, H, D]`` buffers: attention kernels (cuDNN, flash) write their
    output in q's layout, so ``[B, S, H * D]`` is then a view, not a transposing copy (1.6 ms per 9B step)."""
    shape = (x.shape[0], seq, heads, head_dim)
    return tuple(torch.empty(shape, device=x.device, dtype=x.dtype).transpose(1, 2) for _ in range(3))


def _stream_qkv(x, mod, norm1, qkv_layer, qk_norm, pe, bufs, seq_off: int, heads: int) -> None:
    """One stream's modulated norm -> INT8 qkv GEMM -> q/k norm + RoPE into ``bufs`` at ``seq_off``."""
    b, s, _ = x.shape
    xq, xs = kernels.fused.norm_modulate_quantize(x, mod.shift, mod.scale, norm1.eps,
                                                  rotate_group=qkv_layer.input_rotation())
    qkv = qkv_layer.run_quantized(xq, xs, x.dtype).view(b, s, -1)
    q, k, v = bufs
    kernels.fused.qk_norm_rope(
        qkv, _small(qk_norm.query_norm.weight, x), _small(qk_norm.key_norm.weight, x), pe, q, k, v,
        seq_off=seq_off, heads=heads, eps_q=_rms_eps(qk_norm.query_norm, x.dtype),
        eps_k=_rms_eps(qk_norm.key_norm, x.dtype))


def _stream_out(x, attn, mod1, mod2, proj, norm2, mlp) -> None:
    """One stream after attention: x += g1 * proj(attn); x += g2 * mlp(norm2(x) modulated), in place."""
    aq, a_scale = kernels.quantize_rows(attn, rotate_group=proj.input_rotation())
    proj.run_quantized(aq, a_scale.reshape(-1), x.dtype, residual=x, gate=mod1.gate)
    xq, xs = kernels.fused.norm_modulate_quantize(x, mod2.shift, mod2.scale, norm2.eps,
                                                  rotate_group=mlp[0].input_rotation())
    h = mlp[0].run_quantized(xq, xs, x.dtype)
    hq, hs = kernels.fused.glu_quantize(None, h, rotate_group=mlp[2].input_rotation())
    mlp[2].run_quantized(hq, hs, x.dtype, residual=x, gate=mod2.gate)


def _swiglu(mlp) -> bool:
    return isinstance(mlp, torch.nn.Sequential) and len(mlp) == 3 and isinstance(mlp[1], SiLUActivation)


class FusedDoubleBlock:
    """``patches_replace["dit"][("double_block", i)]``: DoubleStreamBlock i of a Flux model, fused."""

    def __init__(self, model: torch.nn.Module, index: int):
        self.model = weakref.ref(model)  # clones share the model; no reference cycle through model_options
        self.index = index

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
        mods = [m.shift for m in (img_mod1, img_mod2, txt_mod1, txt_mod2)]
        linears = [block.img_attn.qkv, block.img_attn.proj, block.img_mlp[0], block.img_mlp[-1],
                   block.txt_attn.qkv, block.txt_attn.proj, block.txt_mlp[0], block.txt_mlp[-1]]
        norms = [block.img_attn.norm.query_norm, block.img_attn.norm.key_norm, block.txt_attn.norm.query_norm,
                 block.txt_attn.norm.key_norm]
        why = _why_not(args, linears, norms, mods, img)
        if why is None and not (_swiglu(block.img_mlp) and _swiglu(block.txt_mlp)):
            why = "MLP is not FLUX.2's SwiGLU"
        if why is None and not (img.is_contiguous() and txt.is_contiguous()):
            why = "non-contiguous hidden states"
        if why is not None:
            _fallback(why)
            return extra["original_block"](args)
        heads = block.num_heads
        s_txt, s_img = txt.shape[1], img.shape[1]
        bufs = _qkv_buffers(img, heads, block.hidden_size // heads, s_txt + s_img)
        _stream_qkv(txt, txt_mod1, block.txt_norm1, block.txt_attn.qkv, block.txt_attn.norm, args["pe"], bufs, 0,
                    heads)
        _stream_qkv(img, img_mod1, block.img_norm1, block.img_attn.qkv, block.img_attn.norm, args["pe"], bufs,
                    s_txt, heads)
        attn = _attention(*bufs, heads, args.get("transformer_options") or {})
        del bufs
        _stream_out(img, attn[:, s_txt:], img_mod1, img_mod2, block.img_attn.proj, block.img_norm2, block.img_mlp)
        _stream_out(txt, attn[:, :s_txt], txt_mod1, txt_mod2, block.txt_attn.proj, block.txt_norm2, block.txt_mlp)
        if txt.dtype == torch.float16:
            txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
        return {"img": img, "txt": txt}


class FusedSingleBlock:
    """``patches_replace["dit"][("single_block", i)]``: SingleStreamBlock i of a Flux model, fused."""

    def __init__(self, model: torch.nn.Module, index: int):
        self.model = weakref.ref(model)
        self.index = index

    def __call__(self, args: dict, extra: dict) -> dict:
        model = self.model()
        block = model.single_blocks[self.index] if model is not None else None
        x, vec = args["img"], args["vec"]
        if block is None:
            return extra["original_block"](args)
        mod = block.modulation(vec)[0] if block.modulation else vec
        why = _why_not(args, [block.linear1, block.linear2], [block.norm.query_norm, block.norm.key_norm],
                       [mod.shift, mod.scale, mod.gate], x)
        if why is None and (block.yak_mlp or block.mlp_hidden_dim_first != 2 * block.mlp_hidden_dim):
            why = "MLP is not FLUX.2's SwiGLU"
        if why is None and not x.is_contiguous():
            why = "non-contiguous hidden states"
        group = block.linear2.input_rotation() if why is None else 0
        if group and (x.shape[-1] % group or block.mlp_hidden_dim % group):
            why = f"ConvRot group {group} straddles linear2's attention / MLP input boundary"
        if why is not None:
            _fallback(why)
            return extra["original_block"](args)
        b, s, hidden = x.shape
        heads = block.num_heads
        xq, xs = kernels.fused.norm_modulate_quantize(x, mod.shift, mod.scale, block.pre_norm.eps,
                                                      rotate_group=block.linear1.input_rotation())
        h = block.linear1.run_quantized(xq, xs, x.dtype).view(b, s, -1)
        bufs = _qkv_buffers(x, heads, hidden // heads, s)
        kernels.fused.qk_norm_rope(
            h[..., :3 * hidden], _small(block.norm.query_norm.weight, x), _small(block.norm.key_norm.weight, x),
            args["pe"], *bufs, seq_off=0, heads=heads, eps_q=_rms_eps(block.norm.query_norm, x.dtype),
            eps_k=_rms_eps(block.norm.key_norm, x.dtype))
        attn = _attention(*bufs, heads, args.get("transformer_options") or {})
        del bufs
        aq, a_scale = kernels.fused.glu_quantize(attn, h[..., 3 * hidden:], rotate_group=group)
        del h, attn
        block.linear2.run_quantized(aq, a_scale, x.dtype, residual=x, gate=mod.gate)
        if x.dtype == torch.float16:
            x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
        return {"img": x}


@torch.library.custom_op("int8_w8a8::flux_rope_table", mutates_args=())
def rope_table_op(ids: torch.Tensor, theta: float, axes_dim: list[int]) -> torch.Tensor:
    """ComfyUI's ``EmbedND`` table for ``ids`` [B, S, n_axes]: float32 [B, 1, S, sum(axes_dim) / 2, 2, 2]."""
    return EmbedND(sum(axes_dim), theta, axes_dim)(ids)


@rope_table_op.register_fake
def _(ids, theta, axes_dim):
    return ids.new_empty((ids.shape[0], 1, ids.shape[1], sum(axes_dim) // 2, 2, 2), dtype=torch.float32)


class EagerRopeTable(torch.nn.Module):
    """Stands in for a Flux model's ``pe_embedder`` (``EmbedND``, no parameters) and returns its table bit for bit.

    Eager calls run the ``EmbedND`` itself. Traced calls go through ``int8_w8a8::flux_rope_table``, which runs
    the same eager code: Inductor would otherwise fuse the float64 linspace/pow/cos/sin/stack chain into one
    kernel that recomputes the powers and cosines for every output element (1.8 ms vs 0.1 ms per 9B step).
    """

    def __init__(self, embedder: EmbedND):
        super().__init__()
        self.embedder = embedder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedder
        if torch.compiler.is_compiling() and ids.dim() == 3 and ids.shape[-1] == len(e.axes_dim):
            # through torch.ops, like the package's other ops: a second import of this module (ComfyUI loading
            # the pack by path next to ``int8_w8a8``) re-defines the op, and the first definition's handle
            # then points at a destroyed registration (calls through it failed with "vector::reserve")
            return torch.ops.int8_w8a8.flux_rope_table(ids, e.theta, list(e.axes_dim))
        return e(ids)


def install(patcher) -> int:
    """Register the fused blocks on ``patcher`` (a ModelPatcher of ComfyUI's Flux); returns how many.

    Blocks already replaced by another node are left alone. Models of other classes get none. The model's
    ``pe_embedder`` gets an ``EagerRopeTable`` object patch unless another node patched it already.
    """
    model = patcher.model.diffusion_model
    if type(model) is not Flux:
        return 0
    key = "diffusion_model.pe_embedder"
    if type(model.pe_embedder) is EmbedND and key not in patcher.object_patches:
        patcher.add_object_patch(key, EagerRopeTable(model.pe_embedder))
    replaced = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    count = 0
    for kind, blocks, cls, fused in (("double_block", model.double_blocks, DoubleStreamBlock, FusedDoubleBlock),
                                     ("single_block", model.single_blocks, SingleStreamBlock, FusedSingleBlock)):
        for i, block in enumerate(blocks):
            if type(block) is cls and (kind, i) not in replaced:
                patcher.set_model_patch_replace(fused(model, i), "dit", kind, i)
                count += 1
    logger.info("int8_w8a8: fused FLUX blocks registered on %d of %d blocks", count,
                len(model.double_blocks) + len(model.single_blocks))
    return count
