"""A tiny FLUX.2 (hidden 256, one double and one single block) built with ComfyUI's own Flux class.

Helpers for the integration tier: the model's random BF16 state dict, fixed inputs, a forward pass,
which layers the flux2 profile quantizes, and writing safetensors files. Imports ComfyUI lazily.
"""

from __future__ import annotations

import math

import safetensors.torch
import torch

H, CTX = 256, 64
QUANTIZED = 10  # 4 img + 4 txt layers of the double block, linear1 and linear2 of the single block


def flux2_module(dtype=torch.float32, device="cpu", operations=None):
    """ComfyUI's Flux class at the tiny widths (the ``build`` signature of ``blocks_util``)."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    return Flux(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=CTX,
                hidden_size=H, mlp_ratio=3.0, num_heads=H // 128, depth=1, depth_single_blocks=1,
                axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False,
                txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False,
                default_ref_method="index", ref_index_scale=10.0,
                operations=operations or comfy.ops.disable_weight_init, device=device, dtype=dtype)


def make() -> dict:
    """State dict (BF16, random), fixed inputs and the BF16 model's output through ComfyUI's stock loader."""
    import comfy.sd

    gen = torch.Generator().manual_seed(1234)
    sd = {}
    for k, v in flux2_module().state_dict().items():
        if v.dim() >= 2:
            sd[k] = torch.randn(v.shape, generator=gen) / math.sqrt(v.shape[1])
        elif "norm" in k:
            sd[k] = torch.ones(v.shape)
        else:
            sd[k] = torch.randn(v.shape, generator=gen) * 0.02
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    inputs = (torch.randn(1, 128, 4, 4, generator=gen), torch.tensor([0.6]), torch.randn(1, 8, CTX, generator=gen))
    ref = forward(comfy.sd.load_diffusion_model_state_dict(dict(sd), disable_dynamic=True), inputs)
    return {"sd": sd, "inputs": inputs, "ref": ref}


def forward(patcher, inputs) -> torch.Tensor:
    """The diffusion model's output (float32) for ``inputs`` = (x, timestep, context), in its compute dtype."""
    model = patcher.model
    dtype = model.manual_cast_dtype or model.get_dtype()
    x, t, ctx = (i.to(dtype) for i in inputs)
    with torch.inference_mode():
        return model.diffusion_model(x, t, ctx).float()


def quantized_layer(layer: str) -> bool:
    from int8_w8a8.ops import profiles

    return not profiles.BY_NAME["flux2"].keeps(layer)


def write(folder, name, sd, meta=None) -> str:
    path = folder / name
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return str(path)


def int8_layers(patcher) -> list[str]:
    from int8_w8a8.ops import layout

    return [n for n, m in patcher.model.diffusion_model.named_modules()
            if layout.is_int8_weight(getattr(m, "weight", None))]


def vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A FLUX.2 VAE (ComfyUI's AutoencoderKL, 32 z-channels, batch-norm latent: 128 channels at 1/16) with
    random weights N(0, 1/fan_in); ComfyUI's VAE class detects it from these keys like the real one."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
                "batch_norm_latent": True}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in AutoencoderKL(ddconfig=ddconfig, embed_dim=32).state_dict().items():
        if v.dim() >= 2:
            sd[k] = torch.randn(v.shape, generator=gen) / math.sqrt(v[0].numel())
        elif k.endswith("running_var") or (k.endswith("weight") and "norm" in k):
            sd[k] = torch.ones(v.shape)
        elif v.is_floating_point():
            sd[k] = torch.zeros(v.shape)
        else:
            sd[k] = v
    return sd
