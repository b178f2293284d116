"""Integration tier: Chroma's blocks on the fused kernels (ops/blocks/flux.py) inside a real ComfyUI.

Chroma runs ComfyUI's Flux double/single stream blocks with ``modulation=False`` (the model's approximator
precomputes every block's shift/scale/gate) and a GELU-tanh MLP. A tiny Chroma (ComfyUI's own class: hidden
256, 2 heads of 128, one double and one single block) is loaded through the pack's loader; its fused
blocks are compared with ComfyUI's blocks on the same INT8 weights and both with the float64 twin, eager
and traced by torch.compile in one graph; every fallback rule a Chroma call can break runs ComfyUI's block
(then the output is ComfyUI's own bit for bit);
a dynamic LoRA on every block linear stays fused. On the CPU here, on the load device (the GPU) there.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from . import blocks_util as bu
from .conftest import sqnr_db

pytestmark = pytest.mark.integration

H, CTX = 256, 64


def chroma_module(dtype=torch.float32, device="cpu", operations=None):
    import comfy.ops
    from comfy.ldm.chroma.model import Chroma

    return Chroma(in_channels=64, out_channels=64, context_in_dim=CTX, hidden_size=H, mlp_ratio=4.0,
                  num_heads=H // 128, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
                  patch_size=2, qkv_bias=True, in_dim=64, out_dim=H, hidden_dim=128, n_layers=2, txt_ids_dims=[],
                  vec_in_dim=None, dtype=dtype, device=device, operations=operations or comfy.ops.disable_weight_init)


def radiance_module(dtype=torch.float32, device="cpu", operations=None):
    """A tiny Chroma Radiance (pixel space, 2x2 patches, a conv NeRF head): Chroma's blocks in another model."""
    import comfy.ops
    from comfy.ldm.chroma_radiance.model import ChromaRadiance

    return ChromaRadiance(in_channels=3, out_channels=3, context_in_dim=CTX, hidden_size=H, mlp_ratio=4.0,
                          num_heads=H // 128, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
                          patch_size=2, qkv_bias=True, in_dim=64, out_dim=H, hidden_dim=128, n_layers=2,
                          txt_ids_dims=[], vec_in_dim=None, nerf_hidden_size=64, nerf_mlp_ratio=4, nerf_depth=4,
                          nerf_max_freqs=8, nerf_tile_size=512, nerf_final_head_type="conv",
                          nerf_embedder_dtype=torch.float32, use_x0=False, use_sequential_txt_ids=False,
                          dtype=dtype, device=device, operations=operations or comfy.ops.disable_weight_init)


def inputs(batch: int = 2, h: int = 8, w: int = 8, seed: int = 7, channels: int = 16):
    """(x [B, channels, h, w], timestep [B], context [B, 8, CTX]) and the guidance kwarg Chroma's forward takes."""
    gen = torch.Generator().manual_seed(seed)
    args = (torch.randn(batch, channels, h, w, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, 8, CTX, generator=gen))
    return args, {"guidance": torch.zeros(batch)}


@pytest.fixture(scope="module")
def models(comfyui):
    with bu.tiny_models(chroma_module, seed=11) as models:
        yield models


@pytest.fixture
def calls(monkeypatch):
    return bu.count_kernel_calls(monkeypatch)


def test_install_registers_chroma_blocks(models):
    from comfy.ldm.chroma.model import Chroma

    from int8_w8a8.ops import blocks
    from int8_w8a8.ops.blocks import common

    fused = models["fused-bfloat16"]
    assert type(fused.model.diffusion_model) is Chroma
    assert blocks.architecture_of(fused.model.diffusion_model).module == "flux"
    dit = fused.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(dit) == {("double_block", 0), ("single_block", 0)}
    assert isinstance(fused.object_patches["diffusion_model.pe_embedder"], common.EagerRopeTable)
    plain = models["plain-bfloat16"]
    assert "patches_replace" not in plain.model_options.get("transformer_options", {}) and not plain.object_patches
    # the blocks the kernels feed are INT8 and fusable: 8 in the double block, linear1/linear2 in the single one
    int8 = [n for n, m in fused.model.diffusion_model.named_modules() if hasattr(m, "fusable") and m.fusable()]
    assert len(int8) == 10 and all(n.startswith(("double_blocks.", "single_blocks.")) for n in int8)


@pytest.mark.parametrize("dtype", ("bfloat16", "float32"))
def test_fused_matches_comfyui_blocks_and_float64(models, calls, dtype):
    fused_model = models[f"fused-{dtype}"]
    args, kwargs = inputs()
    comfy = bu.run(fused_model, args, kwargs, fused=False)
    assert not calls
    fused = bu.run(fused_model, args, kwargs)
    # double block: 2 streams x (norm1, norm2); single block: pre_norm. GELU-tanh: 2 streams + single block
    assert calls == {"norm_modulate_quantize": 5, "glu_quantize": 3, "glu_quantize:gelu_tanh": 3,
                     "qk_norm_rope": 3, "int8_gemm_residual": 5}
    assert torch.equal(comfy, bu.run(models[f"plain-{dtype}"], args, kwargs))
    assert sqnr_db(comfy, fused) > 30  # the same INT8 model, intermediates rounded differently
    truth = bu.float64_truth(fused_model, chroma_module, args, kwargs)
    bu.check_against_float64(fused, comfy, truth, 25)
    bu.check_batch_entries(lambda a: bu.run(fused_model, a, {"guidance": torch.zeros(a[0].shape[0])}), args,
                           inputs(seed=8)[0], fused, truth)


def test_through_apply_model(models, calls):
    """The way samplers call the model (``apply_model`` with the patcher's options) runs the fused blocks."""
    import comfy.model_management

    patcher = models["fused-bfloat16"]
    comfy.model_management.load_models_gpu([patcher])
    (x, t, ctx), _ = inputs()
    dev = patcher.load_device
    options = {**patcher.model_options["transformer_options"], "wrappers": dict(patcher.wrappers)}
    with torch.inference_mode():
        y = patcher.model.apply_model(x.to(dev), t.to(dev), c_crossattn=ctx.to(dev),
                                      guidance=torch.zeros(2, device=dev), transformer_options=options)
    assert calls["glu_quantize:gelu_tanh"] == 3 and bool(y.isfinite().all())


@pytest.mark.parametrize("group", [64, 256])
def test_convrot_model_stays_fused(models, calls, group):
    """ConvRot weights keep the fused blocks (each fused quantizer rotates by its consumer's group), close to
    ComfyUI's blocks on the same rotated weights."""
    from int8_w8a8.ops.config import ConvertOptions

    with bu.tiny_detection():
        rotated = bu.load(models["sd"], torch.bfloat16, convert=ConvertOptions(rotate_group=group))
    fed = [m for m in rotated.model.diffusion_model.modules() if hasattr(m, "fusable") and m.fusable()]
    assert len(fed) == 10 and all(m.input_rotation() == group for m in fed)
    args, kwargs = inputs()
    comfy = bu.run(rotated, args, kwargs, fused=False)
    fused = bu.run(rotated, args, kwargs)
    assert calls["glu_quantize:gelu_tanh"] == 3
    assert sqnr_db(comfy, fused) > 30


def _attn_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
    return {"q": q, "k": k, "v": v}


def _attn_output_patch(attn, extra_options):
    return attn


@pytest.mark.parametrize("rule", ["attention mask", "attn1_patch", "attn1_output_patch", "lowvram weight function"])
def test_fallback_rules(models, calls, rule):
    """Each rule a Chroma call can break runs ComfyUI's blocks, whose output is then ComfyUI's bit for bit."""
    patcher = models["fused-bfloat16"].clone()
    args, kwargs = inputs()
    lowvram = rule == "lowvram weight function"
    if rule == "attention mask":  # an additive mask over the 8 text + 16 image tokens (Chroma's attention_mask)
        mask = torch.zeros(2, 1, 8 + 16, 8 + 16, dtype=torch.bfloat16)
        mask[:, :, :, 5:8] = -1e4
        kwargs = {**kwargs, "attention_mask": mask}
    elif rule == "attn1_patch":
        patcher.set_model_attn1_patch(_attn_patch)
    elif rule == "attn1_output_patch":
        patcher.set_model_attn1_output_patch(_attn_output_patch)
    # lowvram: a LoRA applied on the fly (ComfyUI's lowvram load) on one layer of each block
    layers = ["double_blocks.0.txt_mlp.2", "single_blocks.0.linear1"]
    with bu.lowvram(patcher, layers) if lowvram else contextlib.nullcontext():
        y = bu.run(patcher, args, kwargs, load=not lowvram)
        assert not calls
        assert torch.equal(y, bu.run(patcher, args, kwargs, fused=False, load=not lowvram))


def test_dynamic_and_merged_lora_stay_fused(models, calls, tmp_path, monkeypatch):
    """A dynamic LoRA on every linear of both blocks keeps them fused (the same kernel calls as without it) and
    matches ComfyUI's blocks with the same LoRA; the LoRA merged instead stays fused too."""
    from int8_w8a8.lora import loading, merge

    args, kwargs = inputs()
    without = bu.run(models["fused-bfloat16"], args, kwargs)
    want_calls = dict(calls)
    calls.clear()
    dyn, plain = bu.dynamic_lora([models["fused-bfloat16"], models["plain-bfloat16"]], models["sd"],
                                 ("double_blocks.", "single_blocks."), tmp_path, monkeypatch)
    y_dyn = bu.run(dyn, args, kwargs)
    assert calls == want_calls and calls["glu_quantize:gelu_tanh"] == 3
    bu.check_dynamic_lora(y_dyn, bu.run(plain, args, kwargs), without)
    calls.clear()
    merged, _ = merge.merge(models["fused-bfloat16"], [loading.LoraSpec("dyn.safetensors", 1.0)])
    y_merged = bu.run(merged, args, kwargs)
    assert calls == want_calls
    assert sqnr_db(y_dyn, y_merged) > 25


def test_torch_compile_traces_fused_blocks_in_one_graph(models, calls, monkeypatch):
    """Traced by torch.compile: one graph, no breaks, the fused kernels and the RoPE-table op in it, and the
    eager fused model's output."""
    import comfy.model_management

    bu.sdpa_attention(monkeypatch)
    patcher = models["fused-bfloat16"]
    comfy.model_management.load_models_gpu([patcher])
    args, kwargs = inputs()
    want = bu.run(patcher, args, kwargs)
    eager_calls = dict(calls)
    y = bu.compiled_in_one_graph(patcher, args, {"guidance": kwargs["guidance"].to(patcher.load_device)},
                                 dict(patcher.model_options["transformer_options"]))
    assert eager_calls["glu_quantize:gelu_tanh"] == 3
    assert sqnr_db(want, y) > 60


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_chroma_radiance_runs_the_same_fused_blocks(comfyui, monkeypatch, dtype):
    """Chroma Radiance (pixel space, NeRF head) runs Chroma's blocks through Chroma's forward: fused the same
    way, against ComfyUI's blocks and the float64 twin."""
    from comfy.ldm.chroma_radiance.model import ChromaRadiance

    calls = bu.count_kernel_calls(monkeypatch)
    sd = bu.random_state_dict(radiance_module(device="meta"), seed=12)
    with bu.tiny_detection():
        patcher = bu.load(sd, dtype)
    assert type(patcher.model.diffusion_model) is ChromaRadiance
    assert set(patcher.model_options["transformer_options"]["patches_replace"]["dit"]) == {
        ("double_block", 0), ("single_block", 0)}
    args, kwargs = inputs(channels=3)
    comfy = bu.run(patcher, args, kwargs, fused=False)
    fused = bu.run(patcher, args, kwargs)
    assert calls["glu_quantize:gelu_tanh"] == 3 and calls["norm_modulate_quantize"] == 5
    truth = bu.float64_truth(patcher, radiance_module, args, kwargs)
    bu.check_against_float64(fused, comfy, truth, 20)
