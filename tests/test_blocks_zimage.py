"""Integration tier: Z-Image's main layers on the fused kernels (ops/blocks/zimage.py) inside a real ComfyUI.

A tiny Z-Image (ComfyUI's NextDiT: 2 heads of 128, two main layers, two refiners of each kind) is loaded
through the pack's loader. ComfyUI 0.29's Lumina model has no block hook: the fused layers are per-clone object
patches of each layer's ``forward``. Checked: one quantization feeds w1 and w3, the fused layers match
ComfyUI's on the same INT8 weights and both the float64 twin, eager and traced by torch.compile in one graph;
a clone without the patches runs ComfyUI's layers on the same shared module; every fallback rule (float16,
timestep-zero reference latents, grouped-query attention, lowvram weight functions, w1/w3 with
different ConvRot groups) runs ComfyUI's forward, whose output is then ComfyUI's own bit for bit;
a dynamic LoRA on every layer linear stays fused.
"""

from __future__ import annotations

import pytest
import torch

from . import blocks_util as bu
from .conftest import sqnr_db

pytestmark = pytest.mark.integration

DIM, CTX, LAYERS = 256, 64, 2


def zimage_module(dtype=torch.float32, device="cpu", operations=None, n_kv_heads=2, z_image=True):
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT

    extra = {"z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32} if z_image else {}
    return NextDiT(patch_size=2, in_channels=16, dim=DIM, n_layers=LAYERS, n_refiner_layers=2, n_heads=DIM // 128,
                   n_kv_heads=n_kv_heads, ffn_dim_multiplier=3.0, norm_eps=1e-5, qk_norm=True, cap_feat_dim=CTX,
                   axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0, **extra, dtype=dtype,
                   device=device, operations=operations or comfy.ops.disable_weight_init)


def inputs(batch: int = 2, h: int = 8, w: int = 8, txt: int = 7, seed: int = 7):
    """(x [B, 16, h, w], timesteps [B], context [B, txt, CTX]) and the num_tokens kwarg."""
    gen = torch.Generator().manual_seed(seed)
    return ((torch.randn(batch, 16, h, w, generator=gen), torch.rand(batch, generator=gen),
             torch.randn(batch, txt, CTX, generator=gen)), {"num_tokens": txt})


@pytest.fixture(scope="module")
def models(comfyui):
    with bu.tiny_models(zimage_module, seed=17, dtypes=(torch.bfloat16, torch.float32, torch.float16)) as models:
        yield models


@pytest.fixture
def calls(monkeypatch):
    return bu.count_linear_calls(monkeypatch, bu.count_kernel_calls(monkeypatch), ("run_quantized",))


def test_install_patches_each_clone_not_the_module(models, calls):
    from comfy.ldm.lumina.model import JointTransformerBlock, NextDiT

    from int8_w8a8.ops import blocks
    from int8_w8a8.ops.blocks import common, zimage

    fused = models["fused-bfloat16"]
    dm = fused.model.diffusion_model
    assert type(dm) is NextDiT and blocks.architecture_of(dm).module == "zimage"
    forwards = {f"diffusion_model.layers.{i}.forward" for i in range(LAYERS)}
    assert set(fused.object_patches) == forwards | {"diffusion_model.rope_embedder"}
    assert all(isinstance(fused.object_patches[k], zimage.FusedForward) for k in forwards)
    assert isinstance(fused.object_patches["diffusion_model.rope_embedder"], common.EagerRopeTable)
    assert "patches_replace" not in fused.model_options.get("transformer_options", {})
    assert not models["plain-bfloat16"].object_patches
    # a clone without the patches runs ComfyUI's layers on the same shared module (object patches are per clone)
    args, kwargs = inputs()
    y_fused = bu.run(fused, args, kwargs)
    assert calls["qk_norm_rope"] == LAYERS
    calls.clear()
    unpatched = fused.clone()
    for k in forwards:
        unpatched.object_patches.pop(k)
    assert unpatched.model.diffusion_model is dm
    y = bu.run(unpatched, args, kwargs)
    assert not calls and type(dm.layers[0].forward).__name__ == "method"
    assert torch.equal(y, bu.run(models["plain-bfloat16"], args, kwargs))
    assert sqnr_db(y, y_fused) > 30
    assert blocks.install(unpatched) == LAYERS and type(dm.layers[0]) is JointTransformerBlock


@pytest.mark.parametrize("dtype", ("bfloat16", "float32"))
def test_fused_matches_comfyui_layers_and_float64(models, calls, dtype):
    args, kwargs = inputs()
    comfy = bu.run(models[f"plain-{dtype}"], args, kwargs)
    assert not calls
    fused = bu.run(models[f"fused-{dtype}"], args, kwargs)
    # per layer: the RMSNorm quantization for qkv; the attention's post-norm add with the (shared) w1/w3 one; SwiGLU
    # of the (w1, w3) pair; the feed-forward's post-norm add
    per_layer = {"norm_modulate_quantize": 1, "rms_norm_gate_add_quantize": 1, "qk_norm_rope": 1, "glu_quantize": 1,
                 "glu_quantize:swiglu": 1, "rms_norm_gate_add": 1, "run_quantized": 5}
    assert calls == {k: v * LAYERS for k, v in per_layer.items()}
    assert sqnr_db(comfy, fused) > 30
    truth = bu.float64_truth(models[f"fused-{dtype}"], zimage_module, args, kwargs)
    bu.check_against_float64(fused, comfy, truth, 25)
    bu.check_batch_entries(lambda a: bu.run(models[f"fused-{dtype}"], a, kwargs), args, inputs(seed=8)[0], fused,
                           truth)


def test_glu_gemm_form_matches_the_two_gemm_form(models, calls, monkeypatch):
    """Hopper's SwiGLU GEMM form (w1 and w3 as one ``glu_gemm`` writing ``silu(g) * u``, then ``quantize_rows``)
    run here through ``glu_gemm``'s two-GEMM body by replacing its rule: three linears a layer on pre-quantized
    rows, as close to float64 as the two-GEMM form and ComfyUI's layers (h is rounded to bf16 first)."""
    from int8_w8a8.kernels import fused

    args, kwargs = inputs()
    comfy = bu.run(models["plain-bfloat16"], args, kwargs)
    two = bu.run(models["fused-bfloat16"], args, kwargs)
    calls.clear()
    monkeypatch.setattr(fused, "glu_gemm_rule", lambda *a: None)
    one = bu.run(models["fused-bfloat16"], args, kwargs)
    per_layer = {"norm_modulate_quantize": 1, "rms_norm_gate_add_quantize": 1, "qk_norm_rope": 1, "glu_gemm": 1,
                 "rms_norm_gate_add": 1, "run_quantized": 3}
    assert calls == {k: v * LAYERS for k, v in per_layer.items()}
    assert sqnr_db(two, one) > 35
    truth = bu.float64_truth(models["fused-bfloat16"], zimage_module, args, kwargs)
    bu.check_against_float64(one, comfy, truth, 25)
    bu.check_against_float64(one, two, truth, 25)


def test_glu_gemm_form_with_streamed_weights(models, calls, monkeypatch):
    """ComfyUI's default memory mode (DynamicVRAM) and offloading stream each layer's weight through its cast path
    (``comfy_cast_weights``): the SwiGLU GEMM form takes w1 and w3 from there too, released after the GEMM, with
    the resident weights' result bit for bit."""
    from int8_w8a8.kernels import fused
    from int8_w8a8.ops.comfy_ops import Int8Linear

    monkeypatch.setattr(fused, "glu_gemm_rule", lambda *a: None)
    patcher = models["fused-bfloat16"]
    args, kwargs = inputs()
    resident = bu.run(patcher, args, kwargs)
    layers = [m for m in patcher.model.diffusion_model.layers.modules() if isinstance(m, Int8Linear)]
    casts = []
    import comfy.ops

    cast = comfy.ops.cast_bias_weight
    monkeypatch.setattr(comfy.ops, "cast_bias_weight", lambda s, *a, **k: casts.append(s) or cast(s, *a, **k))
    calls.clear()
    try:
        for layer in layers:
            layer.comfy_cast_weights = True
        streamed = bu.run(patcher, args, kwargs, load=False)
    finally:
        for layer in layers:
            layer.comfy_cast_weights = False
    assert calls["glu_gemm"] == LAYERS and "glu_quantize" not in calls
    ff = [b.feed_forward for b in patcher.model.diffusion_model.layers]
    assert all(casts.count(f.w1) == 1 and casts.count(f.w3) == 1 for f in ff)  # each cast once a step
    assert torch.equal(streamed, resident)


def test_quantize_extra_blocks_fuses_the_noise_refiners(models, calls):
    """``quantize_extra_blocks`` converts the refiners: the two noise refiners run fused like the main layers, the
    context refiners (no modulation, caption tokens) run ComfyUI's block on INT8 linears; the output matches
    ComfyUI's blocks on the same weights and both the float64 twin."""
    from int8_w8a8.ops import layout

    with bu.tiny_detection():
        fused, plain = (bu.load(models["sd"], torch.bfloat16, quantize_extra_blocks=True, fused_blocks=f)
                        for f in (True, False))
    dm = fused.model.diffusion_model
    assert all(layout.is_int8_weight(r.attention.qkv.weight) and layout.is_int8_weight(r.feed_forward.w2.weight)
               and not layout.is_int8_weight(getattr(r.adaLN_modulation[-1], "weight", None))
               for r in (*dm.noise_refiner, *dm.context_refiner) if r.modulation)
    assert all(layout.is_int8_weight(r.attention.out.weight) for r in dm.context_refiner)
    refiners = {f"diffusion_model.noise_refiner.{i}.forward" for i in range(len(dm.noise_refiner))}
    assert refiners <= set(fused.object_patches)
    assert not any("context_refiner" in k for k in fused.object_patches)
    # the default load keeps them in high precision and ComfyUI's blocks run them
    assert not any("refiner" in k for k in models["fused-bfloat16"].object_patches)
    args, kwargs = inputs()
    y = bu.run(fused, args, kwargs)
    assert calls["qk_norm_rope"] == LAYERS + len(refiners)
    comfy = bu.run(plain, args, kwargs)
    assert sqnr_db(comfy, y) > 30
    bu.check_against_float64(y, comfy, bu.float64_truth(fused, zimage_module, args, kwargs), 25)


@pytest.mark.parametrize("group", [64, 256])
def test_convrot_model_stays_fused(models, calls, group):
    from int8_w8a8.ops.config import ConvertOptions

    with bu.tiny_detection():
        rotated = bu.load(models["sd"], torch.bfloat16, convert=ConvertOptions(rotate_group=group))
    args, kwargs = inputs()
    fused = bu.run(rotated, args, kwargs)
    assert calls["qk_norm_rope"] == LAYERS
    with bu.tiny_detection():
        plain = bu.load(models["sd"], torch.bfloat16, convert=ConvertOptions(rotate_group=group), fused_blocks=False)
    assert sqnr_db(bu.run(plain, args, kwargs), fused) > 30


def _same_as_comfyui(fused, plain, calls, args, kwargs):
    y = bu.run(fused, args, kwargs)
    assert "qk_norm_rope" not in calls
    assert torch.equal(y, bu.run(plain, args, kwargs))


def test_float16_falls_back(models, calls):
    _same_as_comfyui(models["fused-float16"], models["plain-float16"], calls, *inputs())


def test_timestep_zero_reference_falls_back(models, calls):
    """Z-Image omni (reference latents): the reference tokens are modulated at timestep 0."""
    args, kwargs = inputs()
    kwargs = {**kwargs, "ref_latents": [torch.randn(2, 16, 4, 4).to(torch.bfloat16)]}
    _same_as_comfyui(models["fused-bfloat16"], models["plain-bfloat16"], calls, args, kwargs)


def test_lowvram_weight_function_falls_back(models, calls):
    """ComfyUI's lowvram load with a LoRA on layer 1's w3 (applied on the fly): layer 1 runs ComfyUI's forward,
    layer 0 stays fused on its offloaded weights; close to ComfyUI's layers under the same load."""
    args, kwargs = inputs()
    with bu.lowvram(models["fused-bfloat16"].clone(), ["layers.1.feed_forward.w3"]) as fused:
        y = bu.run(fused, args, kwargs, load=False)
    assert calls["qk_norm_rope"] == 1  # layer 0 fused, layer 1 ComfyUI's
    with bu.lowvram(models["plain-bfloat16"].clone(), ["layers.1.feed_forward.w3"]) as plain:
        assert sqnr_db(bu.run(plain, args, kwargs, load=False), y) > 30


def test_grouped_query_attention_falls_back(comfyui, calls):
    """Lumina 2's layout (fewer key/value heads than query heads) runs ComfyUI's layers."""
    sd = bu.random_state_dict(zimage_module(device="meta", n_kv_heads=1), seed=18)
    with bu.tiny_detection():
        fused, plain = (bu.load(sd, torch.bfloat16, fused_blocks=f) for f in (True, False))
    assert fused.model.diffusion_model.layers[0].attention.n_local_kv_heads == 1
    _same_as_comfyui(fused, plain, calls, *inputs())


def test_w1_w3_with_different_convrot_groups_fall_back(models, calls):
    """A file whose w3 is not rotated while w1 is (one quantization cannot serve both): that layer runs ComfyUI's."""
    patcher = bu.load_one_unrotated(models["sd"], "layers.", "layers.0.feed_forward.w3")
    ff = patcher.model.diffusion_model.layers[0].feed_forward
    assert (ff.w1.input_rotation(), ff.w3.input_rotation()) == (64, 0)
    args, kwargs = inputs()
    y = bu.run(patcher, args, kwargs)
    assert calls["qk_norm_rope"] == 1  # layer 1 fused, layer 0 ComfyUI's
    assert bool(y.isfinite().all())


@pytest.mark.parametrize("glu_gemm", [False, True], ids=["two-gemms", "glu-gemm-rule"])
def test_dynamic_lora_stays_fused(models, calls, tmp_path, monkeypatch, glu_gemm):
    """A dynamic LoRA on every linear of the main layers (w1 and w3, which share one quantization, each with its
    own term) keeps them fused and matches ComfyUI's layers with the same LoRA; where the SwiGLU GEMM's rule
    allows it (replaced here), the LoRA terms keep w1 and w3 as two GEMMs (the SwiGLU GEMM has no LoRA epilogue)."""
    if glu_gemm:
        from int8_w8a8.kernels import fused

        monkeypatch.setattr(fused, "glu_gemm_rule", lambda *a: None)
    without = bu.run(models["fused-bfloat16"], *inputs())
    want_calls = dict(calls)
    if glu_gemm:  # without a LoRA the SwiGLU GEMM ran; with one, the two GEMMs and glu_quantize as by default
        assert want_calls.pop("glu_gemm") == LAYERS and want_calls["run_quantized"] == 3 * LAYERS
        want_calls.update({"glu_quantize": LAYERS, "glu_quantize:swiglu": LAYERS, "run_quantized": 5 * LAYERS})
    calls.clear()
    dyn, plain = bu.dynamic_lora([models["fused-bfloat16"], models["plain-bfloat16"]], models["sd"], ("layers.",),
                                 tmp_path, monkeypatch)
    y = bu.run(dyn, *inputs())
    assert calls == want_calls and calls["qk_norm_rope"] == LAYERS
    bu.check_dynamic_lora(y, bu.run(plain, *inputs()), without)


@pytest.mark.parametrize("glu_gemm", [False, True], ids=["two-gemms", "glu-gemm"])
def test_torch_compile_traces_fused_layers_in_one_graph(models, calls, monkeypatch, glu_gemm):
    """One graph with the fused kernels' ops, the eager output; also in Hopper's SwiGLU GEMM form (its rule
    replaced: w1 and w3 read as traced weights into ``glu_gemm``'s op)."""
    from int8_w8a8.kernels import fused

    bu.sdpa_attention(monkeypatch)
    if glu_gemm:
        monkeypatch.setattr(fused, "glu_gemm_rule", lambda *a: None)
    patcher = models["fused-bfloat16"]
    args, kwargs = inputs()
    want = bu.run(patcher, args, kwargs)  # loads the patcher: the object patches are applied
    eager_calls = dict(calls)
    y = bu.compiled_in_one_graph(patcher, args, kwargs, options={}, ops=(
        "norm_modulate_quantize", "glu_gemm" if glu_gemm else "glu_quantize", "qk_norm_rope", "rms_norm_gate_add",
        "rms_norm_gate_add_quantize", "flux_rope_table"))
    assert eager_calls["qk_norm_rope"] == LAYERS
    assert sqnr_db(want, y) > 60
