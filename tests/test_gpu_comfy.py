"""GPU tier inside ComfyUI: a FLUX.2-shaped model loaded by the pack on the GPU.

Needs a CUDA GPU and COMFYUI_PATH (bench/run_on_gpu.sh sets both up on the GPU machine). Covers
conversion on the GPU with bounded memory, the pack's kernels inside a loaded model (no host
syncs, no dequantized weights), and ComfyUI's DynamicVRAM (comfy-aimdo) with a LoRA applied on cast.
"""

from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from .conftest import sqnr_db

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

H, CTX, DEPTH, SINGLE = 3072, 7680, 2, 4  # klein-4B widths, fewer blocks


def _module():
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    return Flux(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=CTX,
                hidden_size=H, mlp_ratio=3.0, num_heads=H // 128, depth=DEPTH, depth_single_blocks=SINGLE,
                axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False,
                txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False,
                default_ref_method="index", ref_index_scale=10.0, operations=comfy.ops.disable_weight_init,
                device="meta", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def model_file(comfyui, tmp_path_factory):
    gen = torch.Generator(device="cuda").manual_seed(7)
    sd = {}
    for k, v in _module().state_dict().items():
        if v.dim() >= 2:
            w = torch.randn(v.shape, device="cuda", generator=gen) / math.sqrt(v.shape[1])
            sd[k] = w.to(torch.bfloat16).cpu()
        else:
            sd[k] = (torch.ones if "norm" in k else torch.zeros)(v.shape, dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("gpu") / "flux2-4b-shaped-bf16.safetensors"
    safetensors.torch.save_file(sd, str(path))
    largest = max(v.numel() * 2 for v in sd.values())
    gen = torch.Generator().manual_seed(3)
    inputs = (torch.randn(1, 128, 32, 32, generator=gen), torch.tensor([0.7]), torch.randn(1, 64, CTX, generator=gen))
    return {"path": str(path), "largest_bf16": largest, "inputs": inputs}


def _forward(patcher, inputs):
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    model = patcher.model
    dtype = model.manual_cast_dtype or model.get_dtype()
    x, t, ctx = (i.to("cuda", dtype) for i in inputs)
    with torch.inference_mode():
        return model.diffusion_model(x, t, ctx).float()


def test_convert_on_gpu_with_bounded_memory_and_run_on_the_kernels(model_file, monkeypatch):
    import comfy.model_management
    import comfy.sd

    from int8_w8a8.kernels import triton_gemm
    from int8_w8a8.ops import layout, loader

    comfy.model_management.unload_all_models()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    patcher = loader.load_file(model_file["path"], disable_dynamic=True)
    peak = torch.cuda.max_memory_allocated() - base
    # layer by layer: the GPU holds one layer's float copy and its INT8 result at a time
    assert peak < 3 * model_file["largest_bf16"], f"conversion peak {peak / 2**20:.0f} MiB"
    layers = [m for m in patcher.model.diffusion_model.modules() if layout.is_int8_weight(getattr(m, "weight", None))]
    assert len(layers) == 8 * DEPTH + 2 * SINGLE

    y_ref = _forward(comfy.sd.load_diffusion_model(model_file["path"], disable_dynamic=True), model_file["inputs"])
    comfy.model_management.unload_all_models()
    _forward(patcher, model_file["inputs"])  # compile the kernels outside the checks below
    calls = []
    original = layout.Int8W8A8Layout.dequantize.__func__
    monkeypatch.setattr(layout.Int8W8A8Layout, "dequantize",
                        classmethod(lambda cls, q, p: calls.append(1) or original(cls, q, p)))
    torch.cuda.set_sync_debug_mode("error")  # any host sync in forward raises
    try:
        y = _forward(patcher, model_file["inputs"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls == [] and triton_gemm._GEMM_TMA.cache, "the INT8 layers did not run on the pack's kernels"
    assert sqnr_db(y_ref, y) >= 25


def test_dynamic_vram_with_lora(model_file):
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher

    try:
        import comfy_aimdo.control
    except ImportError:
        pytest.skip("comfy-aimdo is not installed: DynamicVRAM is unavailable")
    devices = [d.index or 0 for d in comfy.model_management.get_all_torch_devices()]
    try:
        ok = comfy_aimdo.control.init_devices((i, 0) for i in devices)
    except TypeError:
        ok = comfy_aimdo.control.init_devices(iter(devices))
    if not ok:
        pytest.skip("comfy-aimdo could not initialize DynamicVRAM on this machine")
    previous = (comfy.model_patcher.CoreModelPatcher, comfy.memory_management.aimdo_enabled)
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True
    try:
        from comfy.weight_adapter.lora import LoRAAdapter

        from int8_w8a8.ops import layout, loader

        comfy.model_management.unload_all_models()
        patcher = loader.load_file(model_file["path"])
        assert patcher.is_dynamic()
        y_plain = _forward(patcher, model_file["inputs"])
        layer = "double_blocks.0.img_mlp.0"
        w = patcher.model.diffusion_model.get_submodule(layer).weight
        gen = torch.Generator().manual_seed(0)
        up = torch.randn(w.shape[0], 16, generator=gen) * 0.05
        down = torch.randn(16, w.shape[1], generator=gen) * 0.05
        lora = patcher.clone()
        adapter = LoRAAdapter(set(), (up, down, None, None, None, None))
        lora.add_patches({f"diffusion_model.{layer}.weight": adapter}, 1.0)
        comfy.model_management.unload_all_models()
        y_lora = _forward(lora, model_file["inputs"])
        assert layout.is_int8_weight(patcher.model.diffusion_model.get_submodule(layer).weight)
        assert sqnr_db(y_plain, y_lora) < 40  # the LoRA changed the output
        comfy.model_management.unload_all_models()
        assert torch.equal(_forward(patcher, model_file["inputs"]), y_plain)  # and is gone without it
    finally:
        comfy.model_patcher.CoreModelPatcher, comfy.memory_management.aimdo_enabled = previous
        comfy.model_management.unload_all_models()
