"""LoRA files in the key formats found in the wild, written for a tiny FLUX.2 state dict.

Each writer returns a LoRA state dict whose weight change on every targeted layer has a chosen size
relative to the weight (``rel``: Frobenius norm of the change over that of the weight), so that tests
control how far the LoRA moves the model.
"""

from __future__ import annotations

import math

import torch

# diffusers names of the tiny FLUX.2's layers (one double, one single block) and the weight each maps
# onto, with the slice of fused weights: (weight, (first row, rows)) or just the weight.
H = 256
DIFFUSERS = {
    "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv", (0, H)),
    "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv", (H, H)),
    "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv", (2 * H, H)),
    "transformer_blocks.0.attn.add_q_proj": ("double_blocks.0.txt_attn.qkv", (0, H)),
    "transformer_blocks.0.attn.add_k_proj": ("double_blocks.0.txt_attn.qkv", (H, H)),
    "transformer_blocks.0.attn.add_v_proj": ("double_blocks.0.txt_attn.qkv", (2 * H, H)),
    "transformer_blocks.0.attn.to_out.0": ("double_blocks.0.img_attn.proj", None),
    "transformer_blocks.0.attn.to_add_out": ("double_blocks.0.txt_attn.proj", None),
    "transformer_blocks.0.ff.net.0.proj": ("double_blocks.0.img_mlp.0", None),
    "transformer_blocks.0.ff.net.2": ("double_blocks.0.img_mlp.2", None),
    "transformer_blocks.0.ff_context.net.0.proj": ("double_blocks.0.txt_mlp.0", None),
    "transformer_blocks.0.ff_context.net.2": ("double_blocks.0.txt_mlp.2", None),
    "single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1", (0, H)),
    "single_transformer_blocks.0.attn.to_k": ("single_blocks.0.linear1", (H, H)),
    "single_transformer_blocks.0.attn.to_v": ("single_blocks.0.linear1", (2 * H, H)),
    "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", (3 * H, 4 * H)),
    "single_transformer_blocks.0.proj_out": ("single_blocks.0.linear2", None),
    "x_embedder": ("img_in", None),  # a layer the flux2 profile keeps in BF16
}


def linear_layers(sd: dict) -> list[str]:
    """Every 2-D weight of a (diffusion_model-relative) state dict, as layer names."""
    return sorted(k[: -len(".weight")] for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2)


def _pair(n: int, k: int, rank: int, target_norm: float, gen) -> tuple[torch.Tensor, torch.Tensor]:
    up = torch.randn(n, rank, generator=gen) / math.sqrt(rank)
    down = torch.randn(rank, k, generator=gen) / math.sqrt(k)
    up *= target_norm / (up @ down).norm()
    return up, down


def lora(sd: dict, layers, *, fmt: str = "comfy", rank: int = 8, rel: float = 0.1, seed: int = 0,
         alpha: float | None = None, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A LoRA on ``layers`` of ``sd`` in one of the key formats:

    ``comfy`` ``diffusion_model.<layer>.lora_up/lora_down.weight``; ``peft`` ``diffusion_model.<layer>.lora_B/
    lora_A.weight``; ``kohya`` ``lora_unet_<layer with _>.lora_up/lora_down.weight`` with ``.alpha``;
    ``diffusers`` ``transformer.<diffusers name>.lora_B/lora_A.weight`` (``layers`` are diffusers names then).
    ``alpha`` (default: the rank, i.e. scale 1) is written for comfy and kohya; the change is rel-sized either way.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    scale = (alpha if alpha is not None else rank) / rank
    for layer in layers:
        if fmt == "diffusers":
            target, rows = DIFFUSERS[layer]
            w = sd[f"{target}.weight"].float()
            w = w if rows is None else w[rows[0]: rows[0] + rows[1]]
        else:
            w = sd[f"{layer}.weight"].float()
        up, down = _pair(w.shape[0], w.shape[1], rank, rel * w.norm().item(), gen)
        up /= scale  # ComfyUI multiplies by alpha / rank
        if fmt == "comfy":
            base = f"diffusion_model.{layer}"
            out[f"{base}.lora_up.weight"], out[f"{base}.lora_down.weight"] = up, down
        elif fmt == "peft":
            base = f"diffusion_model.{layer}"
            out[f"{base}.lora_B.weight"], out[f"{base}.lora_A.weight"] = up, down
        elif fmt == "kohya":
            base = "lora_unet_" + layer.replace(".", "_")
            out[f"{base}.lora_up.weight"], out[f"{base}.lora_down.weight"] = up, down
        elif fmt == "diffusers":
            base = f"transformer.{layer}"
            out[f"{base}.lora_B.weight"], out[f"{base}.lora_A.weight"] = up, down
        else:
            raise ValueError(fmt)
        if alpha is not None and fmt in ("comfy", "kohya"):
            out[f"{base}.alpha"] = torch.tensor(float(alpha))
    return {k: v.to(dtype) if v.dim() else v for k, v in out.items()}


def lokr(sd: dict, layers, *, rel: float = 0.1, seed: int = 0, factor: int = 4) -> dict[str, torch.Tensor]:
    """LyCORIS LoKr: the change is ``kron(w1 [f, f], w2 [N/f, K/f])``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        w = sd[f"{layer}.weight"].float()
        w1 = torch.randn(factor, factor, generator=gen)
        w2 = torch.randn(w.shape[0] // factor, w.shape[1] // factor, generator=gen)
        w1 *= rel * w.norm() / torch.kron(w1, w2).norm()
        out[f"diffusion_model.{layer}.lokr_w1"], out[f"diffusion_model.{layer}.lokr_w2"] = w1, w2
    return out


def loha(sd: dict, layers, *, rank: int = 4, rel: float = 0.1, seed: int = 0) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa: the change is ``(w1a @ w1b) * (w2a @ w2b)`` (elementwise), alpha = rank."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        w = sd[f"{layer}.weight"].float()
        n, k = w.shape
        t = [torch.randn(n, rank, generator=gen), torch.randn(rank, k, generator=gen),
             torch.randn(n, rank, generator=gen), torch.randn(rank, k, generator=gen)]
        t[0] *= rel * w.norm() / ((t[0] @ t[1]) * (t[2] @ t[3])).norm()
        base = f"diffusion_model.{layer}"
        for name, v in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), t, strict=True):
            out[f"{base}.{name}"] = v
        out[f"{base}.alpha"] = torch.tensor(float(rank))
    return out


def dora(sd: dict, layers, *, rank: int = 8, rel: float = 0.1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A DoRA: a LoRA plus ``dora_scale [N, 1]`` (the row magnitudes of the patched weight, perturbed)."""
    out = lora(sd, layers, rank=rank, rel=rel, seed=seed, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    for layer in layers:
        w = sd[f"{layer}.weight"].float()
        norms = w.norm(dim=1, keepdim=True)
        out[f"diffusion_model.{layer}.dora_scale"] = norms * (1 + 0.05 * torch.randn(norms.shape, generator=gen))
    return out
