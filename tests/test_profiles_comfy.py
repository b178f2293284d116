"""Profiles against the key sets of ComfyUI's own model classes (built on the meta device)."""

from __future__ import annotations

import pytest
import torch

from int8_w8a8.ops import profiles

pytestmark = pytest.mark.integration


def _chroma(ops):
    from comfy.ldm.chroma.model import Chroma

    return Chroma(in_channels=64, out_channels=64, context_in_dim=64, hidden_size=256, mlp_ratio=4.0, num_heads=2,
                  depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                  in_dim=64, out_dim=256, hidden_dim=128, n_layers=2, txt_ids_dims=[], vec_in_dim=None,
                  device="meta", dtype=torch.bfloat16, operations=ops)


def _z_image(ops):
    from comfy.ldm.lumina.model import NextDiT

    return NextDiT(patch_size=2, in_channels=16, dim=256, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                   cap_feat_dim=64, axes_dims=[32, 48, 48], qk_norm=True, z_image_modulation=True, device="meta",
                   dtype=torch.bfloat16, operations=ops)


def _qwen_image(ops):
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                       attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64,
                                       device="meta", dtype=torch.bfloat16, operations=ops)


def _wan(ops):
    from comfy.ldm.wan.model import WanModel

    return WanModel(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=256, ffn_dim=512,
                    freq_dim=256, text_dim=64, out_dim=16, num_heads=2, num_layers=1, device="meta",
                    dtype=torch.bfloat16, operations=ops)


def _flux2(ops):
    from comfy.ldm.flux.model import Flux

    return Flux(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=64,
                hidden_size=256, mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[32] * 4,
                theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False, txt_ids_dims=[3],
                global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                ref_index_scale=10.0, device="meta", dtype=torch.bfloat16, operations=ops)


# architecture -> (builder, Linear layers quantized, Linear layers in all)
ARCHS = {
    "flux2": (_flux2, 10, 19),
    "chroma": (_chroma, 10, 19),
    "z-image": (_z_image, 10, 29),
    "qwen-image": (_qwen_image, 14, 20),
    "wan": (_wan, 10, 16),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_profile_on_comfyui_model_class(comfyui, name):
    import comfy.ops

    build, n_quantized, n_linear = ARCHS[name]
    model = build(comfy.ops.disable_weight_init)
    profile = profiles.detect(model.state_dict())
    assert profile is not None and profile.name == name
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    quantized = [n for n in linears if not profile.keeps(n)]
    assert (len(quantized), len(linears)) == (n_quantized, n_linear), sorted(set(linears) - set(quantized))
    # only the repeated transformer blocks are quantized; embedders, global modulation, refiners and output
    # heads stay in high precision
    blocks = ("double_blocks", "single_blocks", "layers", "transformer_blocks", "blocks")
    assert all(n.split(".")[0] in blocks for n in quantized), quantized
    # quantize_extra_blocks converts the optional blocks' layers too (Z-Image's refiners), still not their modulation
    more = [n for n in linears if not profile.with_optional().keeps(n) and n not in quantized]
    assert all(n.split(".")[0] in profile.optional and "adaLN_modulation" not in n for n in more), more
    assert len(more) == (10 if name == "z-image" else 0), more
