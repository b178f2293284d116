"""Integration tier: Wan's attention blocks on the fused kernels (ops/blocks/wan.py) inside a real ComfyUI.

A tiny Wan 2.1 text-to-video model (ComfyUI's WanModel: 2 heads of 128, two blocks, a 2-frame latent video)
is loaded through the pack's loader. Checked: one quantization feeds self-attention's q, k and v, the q/k
norms over the whole row, the fused blocks match ComfyUI's on the same INT8 weights and both the float64 twin,
eager and traced by torch.compile in one graph; every fallback rule (image cross-attention, per-frame
modulation, attention patches, lowvram weight functions) runs ComfyUI's block, whose output is then ComfyUI's
own bit for bit; a dynamic LoRA on every block linear stays fused.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from . import blocks_util as bu
from .conftest import sqnr_db

pytestmark = pytest.mark.integration

DIM, CTX, LAYERS = 256, 64, 2


def wan_module(dtype=torch.float32, device="cpu", operations=None, model_type="t2v"):
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    return WanModel(model_type=model_type, patch_size=(1, 2, 2), text_len=16, in_dim=16 if model_type == "t2v" else 36,
                    dim=DIM, ffn_dim=512,
                    freq_dim=256, text_dim=CTX, out_dim=16, num_heads=DIM // 128, num_layers=LAYERS, qk_norm=True,
                    cross_attn_norm=True, eps=1e-6, dtype=dtype, device=device,
                    operations=operations or comfy.ops.disable_weight_init)


def inputs(batch: int = 2, frames: int = 2, h: int = 8, w: int = 8, seed: int = 7, channels: int = 16):
    """(x [B, channels, frames, h, w], timestep [B], context [B, 16, CTX])."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, frames, h, w, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, 16, CTX, generator=gen))


@pytest.fixture(scope="module")
def models(comfyui):
    with bu.tiny_models(wan_module, seed=19) as models:
        yield models


@pytest.fixture
def calls(monkeypatch):
    return bu.count_linear_calls(monkeypatch, bu.count_kernel_calls(monkeypatch))


def test_install_registers_wan_blocks(models):
    from comfy.ldm.wan.model import WanModel

    from int8_w8a8.ops import blocks
    from int8_w8a8.ops.blocks import common

    fused = models["fused-bfloat16"]
    assert type(fused.model.diffusion_model) is WanModel
    assert blocks.architecture_of(fused.model.diffusion_model).module == "wan"
    dit = fused.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(dit) == {("double_block", i) for i in range(LAYERS)}
    assert isinstance(fused.object_patches["diffusion_model.rope_embedder"], common.EagerRopeTable)
    assert not models["plain-bfloat16"].object_patches


@pytest.mark.parametrize("dtype", ("bfloat16", "float32"))
def test_fused_matches_comfyui_blocks_and_float64(models, calls, dtype):
    fused_model = models[f"fused-{dtype}"]
    args = inputs()
    comfy = bu.run(fused_model, args, fused=False)
    assert set(calls) == {"forward"} and calls["forward"] == 10 * LAYERS
    calls.clear()
    fused = bu.run(fused_model, args)
    # per block: one quantization for q/k/v, one for the cross-attention's q (norm3 fused), one for the FFN; the
    # cross-attention's k and v (text tokens) run as ComfyUI's layers, its o adds the residual in its epilogue
    per_block = {"norm_modulate_quantize": 3, "qk_norm_rope": 1, "glu_quantize": 1, "glu_quantize:gelu_tanh": 1,
                 "int8_gemm_residual": 3, "run_quantized": 8, "forward": 2}
    assert calls == {k: v * LAYERS for k, v in per_block.items()}
    assert torch.equal(comfy, bu.run(models[f"plain-{dtype}"], args))
    assert sqnr_db(comfy, fused) > 30
    truth = bu.float64_truth(fused_model, wan_module, args)
    bu.check_against_float64(fused, comfy, truth, 25)
    bu.check_batch_entries(lambda a: bu.run(fused_model, a), args, inputs(seed=8), fused, truth)


@pytest.mark.parametrize("group", [64, 256])
def test_convrot_model_stays_fused(models, calls, group):
    from int8_w8a8.ops.config import ConvertOptions

    with bu.tiny_detection():
        rotated = bu.load(models["sd"], torch.bfloat16, convert=ConvertOptions(rotate_group=group))
    args = inputs()
    comfy = bu.run(rotated, args, fused=False)
    fused = bu.run(rotated, args)
    assert calls["qk_norm_rope"] == LAYERS
    assert sqnr_db(comfy, fused) > 30


def _attn_patch(args):
    return args["x"]


@pytest.mark.parametrize("rule", ["attn1_patch", "attn2_patch", "per-frame modulation", "lowvram weight function"])
def test_fallback_rules(models, calls, rule):
    patcher = models["fused-bfloat16"].clone()
    args, lowvram = inputs(), rule == "lowvram weight function"
    if rule in ("attn1_patch", "attn2_patch"):
        patcher.set_model_patch(_attn_patch, rule)
    elif rule == "per-frame modulation":  # Wan 2.2 TI2V: one timestep per latent frame
        args = (args[0], torch.rand(2, 2), args[2])
    # lowvram: a LoRA applied on the fly (ComfyUI's lowvram load) on one layer of each block
    with bu.lowvram(patcher, ["blocks.0.self_attn.k", "blocks.1.ffn.2"]) if lowvram else contextlib.nullcontext():
        y = bu.run(patcher, args, load=not lowvram)
        assert "qk_norm_rope" not in calls
        assert torch.equal(y, bu.run(patcher, args, fused=False, load=not lowvram))


def test_image_cross_attention_falls_back(comfyui, calls):
    """Wan 2.1 I2V: the image cross-attention needs the CLIP token count, which the block hook does not pass."""
    sd = bu.random_state_dict(wan_module(device="meta", model_type="i2v"), seed=20)
    with bu.tiny_detection():
        patcher = bu.load(sd, torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    kwargs = {"clip_fea": torch.randn(2, 257, 1280, generator=gen).to(torch.bfloat16)}
    args = inputs(channels=36)  # the latent and the image conditioning ComfyUI concatenates to it
    y = bu.run(patcher, args, kwargs)
    assert "qk_norm_rope" not in calls
    assert torch.equal(y, bu.run(patcher, args, kwargs, fused=False))


def test_dynamic_lora_stays_fused(models, calls, tmp_path, monkeypatch):
    """A dynamic LoRA on every linear of the blocks (self-attention's q, k and v, which share one quantization,
    each with its own term; the cross-attention and FFN) keeps every block fused and matches ComfyUI's blocks
    with the same LoRA."""
    without = bu.run(models["fused-bfloat16"], inputs())
    want_calls = dict(calls)
    calls.clear()
    dyn, plain = bu.dynamic_lora([models["fused-bfloat16"], models["plain-bfloat16"]], models["sd"], ("blocks.",),
                                 tmp_path, monkeypatch)
    y = bu.run(dyn, inputs())
    assert calls == want_calls and calls["qk_norm_rope"] == LAYERS
    bu.check_dynamic_lora(y, bu.run(plain, inputs()), without)


def test_torch_compile_traces_fused_blocks_in_one_graph(models, calls, monkeypatch):
    bu.sdpa_attention(monkeypatch)
    patcher = models["fused-bfloat16"]
    args = inputs()
    want = bu.run(patcher, args)
    eager_calls = dict(calls)
    y = bu.compiled_in_one_graph(patcher, args, options=dict(patcher.model_options["transformer_options"]))
    assert eager_calls["qk_norm_rope"] == LAYERS
    assert sqnr_db(want, y) > 60
