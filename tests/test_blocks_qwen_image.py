"""Integration tier: Qwen-Image's blocks on the fused kernels (ops/blocks/qwen_image.py) inside a real ComfyUI.

A tiny Qwen-Image (ComfyUI's own class: 2 heads of 128, two joint blocks, 64-wide text input) is loaded
through the pack's loader. Checked: the fused blocks quantize each stream's modulated activation once for its
three projections, match ComfyUI's blocks on the same INT8 weights and both the float64 twin, eager and
traced by torch.compile in one graph; reference latents that keep one modulation per batch entry stay fused;
every fallback rule (text mask, timestep-zero reference latents, attention patches, lowvram weight functions,
q/k/v layers with different ConvRot groups) runs ComfyUI's block, whose output is then
ComfyUI's own bit for bit;
a dynamic LoRA on every block linear stays fused, also traced. On the CPU here, on the load device (the GPU) there.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from . import blocks_util as bu
from .conftest import sqnr_db

pytestmark = pytest.mark.integration

HEADS, HEAD_DIM, CTX, LAYERS = 2, 128, 64, 2


def qwen_module(dtype=torch.float32, device="cpu", operations=None):
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=LAYERS,
                                       attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=CTX,
                                       axes_dims_rope=(16, 56, 56), dtype=dtype, device=device,
                                       operations=operations or comfy.ops.disable_weight_init)


def inputs(batch: int = 2, h: int = 8, w: int = 8, txt: int = 7, seed: int = 7):
    """(x [B, 16, 1, h, w], timestep [B], context [B, txt, CTX])."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 1, h, w, generator=gen), torch.rand(batch, generator=gen),
            torch.randn(batch, txt, CTX, generator=gen))


@pytest.fixture(scope="module")
def models(comfyui):
    with bu.tiny_models(qwen_module, seed=13) as models:
        yield models


@pytest.fixture
def calls(monkeypatch):
    """Fused-kernel calls, and how often Int8Linear layers ran on rows quantized before them (``run_quantized``)
    or quantized their own input (``forward``)."""
    return bu.count_linear_calls(monkeypatch, bu.count_kernel_calls(monkeypatch))


def test_install_registers_blocks_and_mask_wrapper(models):
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    from comfy.patcher_extension import WrappersMP

    from int8_w8a8.ops import blocks
    from int8_w8a8.ops.blocks import common, qwen_image

    fused = models["fused-bfloat16"]
    assert type(fused.model.diffusion_model) is QwenImageTransformer2DModel
    assert blocks.architecture_of(fused.model.diffusion_model).module == "qwen_image"
    dit = fused.model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(dit) == {("double_block", i) for i in range(LAYERS)}
    assert fused.get_wrappers(WrappersMP.DIFFUSION_MODEL, qwen_image.WRAPPER_KEY) == [qwen_image._mask_rule]
    assert isinstance(fused.object_patches["diffusion_model.pe_embedder"], common.EagerRopeTable)
    clone = fused.clone()  # clones carry the replacements and the wrapper; installing again adds nothing
    assert blocks.install(clone) == 0
    assert len(clone.get_wrappers(WrappersMP.DIFFUSION_MODEL, qwen_image.WRAPPER_KEY)) == 1
    plain = models["plain-bfloat16"]
    assert "patches_replace" not in plain.model_options.get("transformer_options", {}) and not plain.wrappers.get(
        WrappersMP.DIFFUSION_MODEL) and not plain.object_patches


@pytest.mark.parametrize("dtype", ("bfloat16", "float32"))
def test_fused_matches_comfyui_blocks_and_float64(models, calls, dtype):
    fused_model = models[f"fused-{dtype}"]
    args = inputs()
    comfy = bu.run(fused_model, args, fused=False)
    assert set(calls) == {"forward"}  # ComfyUI's blocks: every INT8 layer quantizes its own input
    assert calls["forward"] == 14 * LAYERS
    calls.clear()
    fused = bu.run(fused_model, args)
    # per block and stream: one modulated-norm quantization feeds q, k and v; one more feeds the FFN
    per_block = {"norm_modulate_quantize": 4, "qk_norm_rope": 2, "glu_quantize": 2, "glu_quantize:gelu_tanh": 2,
                 "int8_gemm_residual": 4, "run_quantized": 12, "forward": 2}  # forward: img_mod, txt_mod
    assert calls == {k: v * LAYERS for k, v in per_block.items()}
    assert torch.equal(comfy, bu.run(models[f"plain-{dtype}"], args))
    assert sqnr_db(comfy, fused) > 30
    truth = bu.float64_truth(fused_model, qwen_module, args)
    bu.check_against_float64(fused, comfy, truth, 25)
    bu.check_batch_entries(lambda a: bu.run(fused_model, a), args, inputs(seed=8), fused, truth)


def test_reference_latents_stay_fused(models, calls):
    """Edit-style reference latents ("index": extra image tokens, one modulation per batch entry) stay fused."""
    patcher = models["fused-bfloat16"]
    gen = torch.Generator().manual_seed(3)
    kwargs = {"ref_latents": [torch.randn(2, 16, 1, 4, 4, generator=gen).to(torch.bfloat16)]}
    comfy = bu.run(patcher, inputs(), kwargs, fused=False)
    fused = bu.run(patcher, inputs(), kwargs)
    assert calls["qk_norm_rope"] == 2 * LAYERS
    assert sqnr_db(comfy, fused) > 30


@pytest.mark.parametrize("group", [64, 256])
def test_convrot_model_stays_fused(models, calls, group):
    from int8_w8a8.ops.config import ConvertOptions

    with bu.tiny_detection():
        rotated = bu.load(models["sd"], torch.bfloat16, convert=ConvertOptions(rotate_group=group))
    attn = rotated.model.diffusion_model.transformer_blocks[0].attn
    assert attn.to_q.input_rotation() == attn.to_k.input_rotation() == group
    args = inputs()
    comfy = bu.run(rotated, args, fused=False)
    fused = bu.run(rotated, args)
    assert calls["qk_norm_rope"] == 2 * LAYERS
    assert sqnr_db(comfy, fused) > 30


def _attn_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
    return {"q": q, "k": k, "v": v}


@pytest.mark.parametrize("rule", ["text mask", "timestep-zero reference", "attn1_patch", "lowvram weight function"])
def test_fallback_rules(models, calls, rule):
    patcher = models["fused-bfloat16"].clone()
    args, kwargs, lowvram = inputs(), {}, rule == "lowvram weight function"
    if rule == "text mask":  # ComfyUI's Qwen text encoder passes one when a prompt has padded tokens
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        kwargs = {"attention_mask": mask}
    elif rule == "timestep-zero reference":  # Qwen-Image-Edit 2511: reference tokens modulated at timestep 0
        kwargs = {"ref_latents": [torch.randn(2, 16, 1, 4, 4).to(torch.bfloat16)],
                  "ref_latents_method": "index_timestep_zero"}
    elif rule == "attn1_patch":
        patcher.set_model_attn1_patch(_attn_patch)
    # lowvram: a LoRA applied on the fly (ComfyUI's lowvram load) on one layer of each block
    layers = ["transformer_blocks.0.attn.add_v_proj", "transformer_blocks.1.txt_mlp.net.2"]
    with bu.lowvram(patcher, layers) if lowvram else contextlib.nullcontext():
        y = bu.run(patcher, args, kwargs, load=not lowvram)
        assert "qk_norm_rope" not in calls
        assert torch.equal(y, bu.run(patcher, args, kwargs, fused=False, load=not lowvram))


def test_qkv_with_different_convrot_groups_falls_back(models, calls):
    """A file whose to_k is not rotated while to_q/to_v are (one quantization cannot serve both) runs ComfyUI's
    block for that block only."""
    patcher = bu.load_one_unrotated(models["sd"], "transformer_blocks.", "transformer_blocks.0.attn.to_k")
    attn = patcher.model.diffusion_model.transformer_blocks[0].attn
    assert (attn.to_q.input_rotation(), attn.to_k.input_rotation()) == (64, 0)
    y = bu.run(patcher, inputs())
    assert calls["qk_norm_rope"] == 2  # block 1 fused, block 0 ComfyUI's
    assert sqnr_db(bu.run(patcher, inputs(), fused=False), y) > 30


def test_dynamic_lora_stays_fused(models, calls, tmp_path, monkeypatch):
    """A dynamic LoRA on every linear of the blocks (to_q, to_k and to_v, which share one quantization, each with
    its own term) keeps every block fused and matches ComfyUI's blocks with the same LoRA."""
    without = bu.run(models["fused-bfloat16"], inputs())
    want_calls = dict(calls)
    calls.clear()
    dyn, plain = bu.dynamic_lora([models["fused-bfloat16"], models["plain-bfloat16"]], models["sd"],
                                 ("transformer_blocks.",), tmp_path, monkeypatch)
    attn = dyn.model.diffusion_model.transformer_blocks[0].attn
    y = bu.run(dyn, inputs())
    assert calls == want_calls and calls["qk_norm_rope"] == 4  # two streams in each of two blocks
    assert len({id(layer.int8_lora) for layer in (attn.to_q, attn.to_k, attn.to_v)}) == 3  # set while loaded
    bu.check_dynamic_lora(y, bu.run(plain, inputs()), without)


def test_torch_compile_with_a_dynamic_lora_in_one_graph(models, calls, tmp_path, monkeypatch):
    """Traced with a dynamic LoRA on every block linear: still one graph without breaks, the fused kernels and the
    LoRA's GEMMs in it, and the eager output."""
    import comfy.patcher_extension

    bu.sdpa_attention(monkeypatch)
    (dyn,) = bu.dynamic_lora([models["fused-bfloat16"]], models["sd"], ("transformer_blocks.",), tmp_path,
                             monkeypatch)
    args = inputs()
    want = bu.run(dyn, args)
    assert calls["qk_norm_rope"] == 2 * LAYERS
    options = {**dyn.model_options["transformer_options"],
               "wrappers": comfy.patcher_extension.copy_nested_dicts(dyn.wrappers)}
    y = bu.compiled_in_one_graph(dyn, args, options=options, ops=(*bu.KERNELS, "int8_gemm", "flux_rope_table"))
    assert sqnr_db(want, y) > 60


def test_torch_compile_traces_fused_blocks_in_one_graph(models, calls, monkeypatch):
    """Traced by torch.compile (the mask wrapper included): one graph, no breaks, the fused kernels and the
    RoPE-table op in it, and the eager fused model's output."""
    import comfy.patcher_extension

    bu.sdpa_attention(monkeypatch)
    patcher = models["fused-bfloat16"]
    args = inputs()
    want = bu.run(patcher, args)
    eager_calls = dict(calls)
    options = {**patcher.model_options["transformer_options"],
               "wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)}
    y = bu.compiled_in_one_graph(patcher, args, options=options)
    assert eager_calls["qk_norm_rope"] == 2 * LAYERS
    assert sqnr_db(want, y) > 60
