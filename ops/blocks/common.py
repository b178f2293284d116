"""What every architecture's fused blocks share: the fallback rules and their logging, the q/k/v buffers,
the attention call (ComfyUI's or 8-bit: ``attention_choice``), the MLP activations the kernels compute,
ComfyUI's RoPE table behind a custom op, and the registration of block replacements on a ModelPatcher.

A fused block checks its call against ``why_not`` (plus its architecture's own rules) and, when a rule fails,
runs ComfyUI's block with the reason logged once per process and architecture (``fallback``; in eager calls
only: logging inside a traced function would break the graph). Nothing is half-fused: the decision is made
before the first kernel runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable

import torch
from comfy.ldm.flux.layers import EmbedND, SiLUActivation
from comfy.model_management import supports_fp64

from ... import kernels
from ..comfy_ops import Int8Linear, run_glu, run_quantized_shared
from . import attention_choice
from .log_once import log_once

logger = logging.getLogger(__name__)

_LOGGED: set[tuple[str, str]] = set()  # (architecture, reason) already logged (once per process)

# A transformer-options key under which a model-level wrapper tells the fused blocks of one call why they must
# hand it to ComfyUI's blocks (e.g. Qwen-Image's text mask, which its block hook does not pass on).
OFF_KEY = "int8_w8a8_fused_blocks_off"


def run_shared(layers, xq: torch.Tensor, xs: torch.Tensor, dtype: torch.dtype, shape: tuple) -> tuple:
    """Layers fed one quantization of the same rows (q/k/v, w1/w3), each output viewed as ``shape``; their dynamic
    LoRA terms' down projections run as one GEMM (``comfy_ops.run_quantized_shared``)."""
    return tuple(y.view(shape) for y in run_quantized_shared(layers, xq, xs, dtype))


def glu_quantized(xq: torch.Tensor, xs: torch.Tensor, dtype: torch.dtype, gate, up, rotate_group: int) -> tuple:
    """The int8 rows ``(q [M, F], scale [M])`` of a SwiGLU MLP's hidden activation ``silu(g) * u`` for the down
    projection (rotated by its ConvRot group), from rows quantized for the up projections: ``gate`` and ``up`` two
    layers (Z-Image's w1, w3) or ``up`` None and ``gate``'s output halves ``[g | u]`` (FLUX.2). On Hopper's Gluon
    row one GEMM writes ``h`` in the activation dtype and ``quantize_rows`` reads it (``comfy_ops.run_glu``: half
    the bytes); elsewhere, and with a dynamic LoRA term, the layers' GEMMs and ``glu_quantize`` (h in float32)."""
    h = run_glu(xq, xs, dtype, gate, up)
    if h is not None:
        hq, hs = kernels.quantize_rows(h, rotate_group=rotate_group)
        return hq, hs.reshape(-1)
    if up is None:
        return kernels.fused.glu_quantize(None, gate.run_quantized(xq, xs, dtype), rotate_group=rotate_group)
    g, u = run_shared((gate, up), xq, xs, dtype, (xq.shape[0], -1))
    return kernels.fused.glu_quantize(None, (g, u), rotate_group=rotate_group)


def fallback(arch: str, reason: str) -> None:
    """Log once that ``arch``'s fused blocks hand a call to ComfyUI's block, and why."""
    log_once(logger, _LOGGED, (arch, reason), "int8_w8a8: fused %s blocks: %s; running ComfyUI's block", arch, reason)


def rms_eps(norm, dtype: torch.dtype) -> float:
    """An RMSNorm's epsilon as torch applies it (``None``: the dtype's machine epsilon)."""
    return norm.eps if norm.eps is not None else torch.finfo(dtype).eps


def small(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A norm weight on the activation's device and dtype (a few hundred elements; may be offloaded)."""
    return t.to(device=like.device, dtype=like.dtype)


def plain(module) -> bool:
    """No lowvram weight functions (patches applied on the fly) on a norm or linear."""
    return not getattr(module, "weight_function", None) and not getattr(module, "bias_function", None)


def per_batch(m: torch.Tensor, x: torch.Tensor) -> bool:
    """``m`` is one modulation row per batch entry for ``x [B, S, D]``: ``[B', 1, D]`` or ``[B', D]``, B' = B or 1."""
    if m.dim() == 3 and m.shape[1] != 1:
        return False
    return m.dim() in (2, 3) and m.shape[0] in (1, x.shape[0]) and m.shape[-1] == x.shape[-1]


def why_not(args: dict, linears: Iterable, norms: Iterable, mods: Iterable[torch.Tensor],
            x: torch.Tensor, attention_patches: bool = True) -> str | None:
    """The first shared rule a block call breaks, or None when the fused block may run.

    args: the block-replacement arguments (``attn_mask``, ``pe``, ``transformer_options``); linears: the block's
    Linear layers the kernels feed; norms: the norms whose weights the kernels read; mods: the modulation
    tensors (shift/scale/gate) of the hidden states ``x [B, S, D]``; attention_patches: whether ComfyUI's block
    applies ``attn1_patch``/``attn1_output_patch`` (then their presence is a reason to run it).
    """
    options = args.get("transformer_options") or {}
    if options.get(OFF_KEY):
        return options[OFF_KEY]
    if args.get("attn_mask") is not None:
        return "attention mask present"
    if args.get("pe") is None:
        return "no positional embedding"
    patches = options.get("patches", {})
    if attention_patches and ("attn1_patch" in patches or "attn1_output_patch" in patches):
        return "attention patches present"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activations in {x.dtype}"
    if not all(per_batch(m, x) for m in mods):
        return "per-token modulation (reference-image timesteps)"
    if not all(isinstance(layer, Int8Linear) and layer.fusable() for layer in linears):
        return ("a linear layer is not a plain INT8 layer (SmoothQuant, kept in float, lowvram patches or forced "
                "casting; dynamic LoRAs run fused)")
    if not all(plain(n) and getattr(n, "weight", None) is not None for n in norms):
        return "norm weights patched on the fly or absent"
    return None


def convrot_split(group: int, *widths: int) -> str | None:
    """The rule that a ConvRot group does not straddle the parts of a fused quantizer's row."""
    if group and any(w % group for w in widths):
        return f"ConvRot group {group} straddles the boundary of a fused row ({' | '.join(map(str, widths))})"
    return None


def one_rotation(what: str, *layers) -> str | None:
    """The rule that layers fed by one fused quantization (``what`` names them) expect one ConvRot group."""
    if len({layer.input_rotation() for layer in layers}) != 1:
        return f"{what} rotated by different ConvRot groups (they share one quantization)"
    return None


def rope_mismatch(pe: torch.Tensor, batch: int, tokens: int, head_dim: int, token_axis: int) -> str | None:
    """The rule that ComfyUI's RoPE table ``pe`` covers every token the fused q/k kernel rotates: 6 dimensions,
    ``[B' (1 or batch), ..., head_dim / 2, 2, 2]`` with ``tokens`` on ``token_axis`` (1: ``[B', S, 1, ...]``, as
    Wan and Z-Image build it; 2: ``[B', 1, S, ...]``, as Qwen-Image does)."""
    if (pe.dim() != 6 or pe.shape[0] not in (1, batch) or pe.shape[token_axis] != tokens
            or (token_axis == 1 and pe.shape[2] != 1) or tuple(pe.shape[3:]) != (head_dim // 2, 2, 2)):
        return f"RoPE table {list(pe.shape)} does not match {tokens} tokens of head dim {head_dim}"
    return None


def mlp_activation(act) -> str | None:
    """The ``kernels.fused.glu_quantize`` activation for a ComfyUI activation module, or None for one the
    kernels do not compute: SiLUActivation (``silu(g) * u``) -> "swiglu", ``nn.GELU(approximate="tanh")`` ->
    "gelu_tanh"."""
    if isinstance(act, SiLUActivation):
        return "swiglu"
    if isinstance(act, torch.nn.GELU) and act.approximate == "tanh":
        return "gelu_tanh"
    return None


def attention(q, k, v, heads: int, transformer_options: dict) -> torch.Tensor:
    """The block's attention on [B, H, S, D] q/k/v (already rotated); returns [B, S, H*D]: ComfyUI's, or the
    pack's 8-bit attention where the load chose it and the rules of ``attention_choice`` allow it."""
    return attention_choice.attention(q, k, v, heads, transformer_options)


def qkv_buffers(x: torch.Tensor, heads: int, head_dim: int, seq: int, count: int = 3):
    """q, k, v (the first ``count``) ``[B, H, S, D]`` views of ``[B, S, H, D]`` buffers: attention kernels (cuDNN,
    flash) write their output in q's layout, so ``[B, S, H * D]`` is then a view, not a transposing copy (1.6 ms
    per 9B step)."""
    shape = (x.shape[0], seq, heads, head_dim)
    return tuple(torch.empty(shape, device=x.device, dtype=x.dtype).transpose(1, 2) for _ in range(count))


def heads_of(proj: torch.Tensor, heads: int) -> torch.Tensor:
    """A projection ``[B, S, H * D]`` as its own ``[B, H, S, D]`` view: given to ``qk_norm_rope`` as q, k or v, it is
    normalized in place (q, k) or read where it is (v), instead of copied into a buffer. With q, k and v the column
    thirds of one packed ``[B, S, 3 * H * D]`` projection (Z-Image's qkv), attention reads them as cuDNN's
    packed-QKV layout; with a v projection of its own (Wan), as the layout of ``qkv_buffers``."""
    b, s, width = proj.shape
    return proj.view(b, s, heads, width // heads).transpose(1, 2)


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """What ComfyUI's blocks do to float16 hidden states after their residual adds."""
    if x.dtype == torch.float16:
        return torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


# ---- ComfyUI's RoPE table (EmbedND) in a few kernels, behind a custom op -------------------------------------
@functools.lru_cache(maxsize=16)
def _frequencies(theta: float, axes_dim: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(omega float64 [F], axis int64 [F]): every axis's frequencies as ComfyUI's ``rope`` computes them, in
    ``EmbedND``'s order (axis 0's, then axis 1's, ...; F = sum(axes_dim) / 2), and the axis each belongs to."""
    omegas = []
    for dim in axes_dim:
        scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=device)
        omegas.append(1.0 / (theta ** scale))
    axis = torch.cat([torch.full((d // 2,), i, dtype=torch.long) for i, d in enumerate(axes_dim)]).to(device)
    return torch.cat(omegas), axis


def rope_table(ids: torch.Tensor, theta: float, axes_dim: list[int]) -> torch.Tensor:
    """ComfyUI's ``EmbedND`` table for ``ids`` [B, S, n_axes] (n_axes = len(axes_dim)): float32
    [B, 1, S, F, 2, 2], bit for bit, in 8 kernels instead of ~13 per axis and a concatenation (~40 launches, each
    a few microseconds of host time while the GPU waits at the start of a step). The same float64 operations per
    element: the position (rounded to float32, as ``rope`` does) times its frequency, cos and sin of that, stacked
    as ``[[cos, -sin], [sin, cos]]``, rounded to float32; the frequencies are computed once per device."""
    omega, axis = _frequencies(float(theta), tuple(axes_dim), ids.device)
    angles = ids[..., axis].to(torch.float32).to(torch.float64) * omega  # [B, S, F]
    cos, sin = torch.cos(angles), torch.sin(angles)
    table = torch.stack([cos, -sin, sin, cos], dim=-1).view(*angles.shape, 2, 2)
    return table.to(torch.float32).unsqueeze(1)


@torch.library.custom_op("int8_w8a8::flux_rope_table", mutates_args=())
def rope_table_op(ids: torch.Tensor, theta: float, axes_dim: list[int]) -> torch.Tensor:
    """``rope_table`` as an op: float32 [B, 1, S, sum(axes_dim) / 2, 2, 2]."""
    return rope_table(ids, theta, axes_dim)


@rope_table_op.register_fake
def _(ids, theta, axes_dim):
    return ids.new_empty((ids.shape[0], 1, ids.shape[1], sum(axes_dim) // 2, 2, 2), dtype=torch.float32)


class EagerRopeTable(torch.nn.Module):
    """Stands in for a model's ``pe_embedder`` (``EmbedND``, no parameters) and returns its table bit for bit.

    Calls run ``rope_table``, traced ones through ``int8_w8a8::flux_rope_table``: Inductor would otherwise fuse
    ComfyUI's float64 linspace/pow/cos/sin/stack chain into one kernel that recomputes the powers and cosines for
    every output element (1.8 ms vs 0.1 ms per 9B step). Ids of another shape, and devices without float64
    (ComfyUI computes the table on the CPU there), run the ``EmbedND`` itself.
    """

    def __init__(self, embedder: EmbedND):
        super().__init__()
        self.embedder = embedder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedder
        if ids.dim() != 3 or ids.shape[-1] != len(e.axes_dim) or not supports_fp64(ids.device):
            return e(ids)
        if torch.compiler.is_compiling():
            # through torch.ops, like the package's other ops: a second import of this module (ComfyUI loading
            # the pack by path next to ``int8_w8a8``) re-defines the op, and the first definition's handle
            # then points at a destroyed registration (calls through it failed with "vector::reserve")
            return torch.ops.int8_w8a8.flux_rope_table(ids, e.theta, list(e.axes_dim))
        return rope_table(ids, e.theta, e.axes_dim)


def patch_rope_table(patcher, model: torch.nn.Module, attr: str = "pe_embedder") -> bool:
    """Object-patch ``model.<attr>`` (an ``EmbedND``) with an ``EagerRopeTable`` on ``patcher`` unless another
    node patched it already; returns whether it did."""
    key = f"diffusion_model.{attr}"
    if type(getattr(model, attr, None)) is EmbedND and key not in patcher.object_patches:
        patcher.add_object_patch(key, EagerRopeTable(getattr(model, attr)))
        return True
    return False


def register(patcher, arch: str, groups: Iterable[tuple[str, Iterable, type, Callable]]) -> int:
    """Register fused blocks as ComfyUI "dit" block replacements on ``patcher``; returns how many.

    groups: ``(kind, blocks, block_class, make)``: each block of exactly ``block_class`` at index i of ``blocks``
    gets ``make(i)`` as ``patches_replace["dit"][(kind, i)]``, unless another node replaced that block already.
    """
    replaced = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    count = total = 0
    for kind, blocks, cls, make in groups:
        for i, block in enumerate(blocks):
            total += 1
            if type(block) is cls and (kind, i) not in replaced:
                patcher.set_model_patch_replace(make(i), "dit", kind, i)
                count += 1
    logger.info("int8_w8a8: fused %s blocks registered on %d of %d blocks", arch, count, total)
    return count
