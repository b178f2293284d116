"""GPU tier inside ComfyUI: a FLUX.2-shaped model loaded by the pack on the GPU.

Needs a CUDA GPU and COMFYUI_PATH (bench/run_on_gpu.sh sets both up on the GPU machine). Covers
conversion on the GPU with bounded memory, the pack's kernels inside a loaded model (no host
syncs, no dequantized weights), and ComfyUI's DynamicVRAM (comfy-aimdo) with a LoRA applied on cast.
"""

from __future__ import annotations

import importlib.util
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
    total = sum(v.numel() * 2 for v in sd.values())
    gen = torch.Generator().manual_seed(3)
    inputs = (torch.randn(1, 128, 32, 32, generator=gen), torch.tensor([0.7]), torch.randn(1, 64, CTX, generator=gen))
    return {"path": str(path), "largest_bf16": largest, "total_bf16": total, "inputs": inputs}


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
    # layer by layer: the GPU holds a layer's float copy, its INT8 result and the quantizer's temporaries,
    # far below the INT8 model (half the BF16 size), let alone the BF16 one
    print(f"conversion peak {peak / 2**20:.0f} MiB; largest BF16 layer {model_file['largest_bf16'] / 2**20:.0f} MiB, "
          f"BF16 model {model_file['total_bf16'] / 2**20:.0f} MiB")
    assert peak < 4 * model_file["largest_bf16"] and peak < model_file["total_bf16"] / 2
    layers = [m for m in patcher.model.diffusion_model.modules() if layout.is_int8_weight(getattr(m, "weight", None))]
    assert len(layers) == 8 * DEPTH + 2 * SINGLE

    y_ref = _forward(comfy.sd.load_diffusion_model(model_file["path"], disable_dynamic=True), model_file["inputs"])
    comfy.model_management.unload_all_models()
    _forward(patcher, model_file["inputs"])  # compile the kernels outside the checks below
    calls = []
    original = layout.Int8W8A8Layout.dequantize.__func__
    monkeypatch.setattr(layout.Int8W8A8Layout, "dequantize",
                        classmethod(lambda cls, q, p: calls.append(1) or original(cls, q, p)))
    y = _forward(patcher, model_file["inputs"])
    # the TMA kernel on Hopper, the pointer-load one where the dispatch takes the sm_8x table
    ran = triton_gemm._GEMM_TMA.cache or triton_gemm._GEMM.cache
    assert calls == [] and ran, "the INT8 layers did not run on the pack's kernels"
    assert sqnr_db(y_ref, y) >= 25
    # each INT8 layer's forward is free of host syncs, for GPU-resident and offloaded weights alike
    for m in layers:
        for rows in (1, 300):
            x = torch.randn(1, rows, m.in_features, device="cuda", dtype=torch.bfloat16)
            m(x)  # kernels compiled for this shape outside the check
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                m(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")


DYNAMIC_VRAM_SCRIPT = r"""
import sys
import comfy_aimdo.control  # must load its library before torch initializes CUDA (as ComfyUI's main.py does)
if not comfy_aimdo.control.init():
    print("SKIP comfy-aimdo library did not load"); sys.exit(3)
sys.path.insert(0, sys.argv[1])
import torch
import comfy.model_management
from int8_w8a8.bench import flux2_model
try:
    flux2_model.enable_dynamic_vram()  # what the DynamicVRAM benchmarks run (bench_arch --modes eager-dvram)
except SystemExit as exc:
    print(f"SKIP {exc}"); sys.exit(3)
from comfy.weight_adapter.lora import LoRAAdapter
from int8_w8a8.ops import layout, loader

path = sys.argv[2]
gen = torch.Generator().manual_seed(3)
x, t, ctx = torch.randn(1, 128, 32, 32, generator=gen), torch.tensor([0.7]), torch.randn(1, 64, 7680, generator=gen)

def forward(p):
    comfy.model_management.load_models_gpu([p])
    d = p.model.manual_cast_dtype or p.model.get_dtype()
    with torch.inference_mode():
        return p.model.diffusion_model(*(i.to("cuda", d) for i in (x, t, ctx))).float()

def sqnr(a, b):
    return float(20 * torch.log10(a.norm() / (a - b).norm()))

patcher = loader.load_file(path)
assert patcher.is_dynamic(), type(patcher)
y_plain = forward(patcher)
layer = "double_blocks.0.img_mlp.0"
w = patcher.model.diffusion_model.get_submodule(layer).weight
up = torch.randn(w.shape[0], 16, generator=gen) * 0.05
down = torch.randn(16, w.shape[1], generator=gen) * 0.05
lora = patcher.clone()
lora.add_patches({f"diffusion_model.{layer}.weight": LoRAAdapter(set(), (up, down, None, None, None, None))}, 1.0)
comfy.model_management.unload_all_models()
y_lora = forward(lora)
assert layout.is_int8_weight(patcher.model.diffusion_model.get_submodule(layer).weight)
assert sqnr(y_plain, y_lora) < 40, sqnr(y_plain, y_lora)
comfy.model_management.unload_all_models()
y_again = forward(patcher)
assert sqnr(y_plain, y_again) > 60, sqnr(y_plain, y_again)
print(f"OK dynamic: plain vs lora {sqnr(y_plain, y_lora):.1f} dB, plain vs plain again {sqnr(y_plain, y_again):.1f} dB")

# the pack's LoRA nodes under DynamicVRAM: merge (on cast, requantized into the VRAM copy) and dynamic
import os, tempfile
import safetensors.torch
from int8_w8a8.lora import dynamic, loading, merge
lora_sd = {}
for name in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "single_blocks.1.linear2", "img_in"):
    n, k = patcher.model.diffusion_model.get_submodule(name).weight.shape
    lora_sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(n, 16, generator=gen) * 0.025
    lora_sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(16, k, generator=gen) / k ** 0.5
lora_path = os.path.join(tempfile.mkdtemp(), "lora.safetensors")
safetensors.torch.save_file(lora_sd, lora_path)
merged = merge.merge(patcher, [loading.LoraSpec(lora_path)])[0]
comfy.model_management.unload_all_models()
y_merged = forward(merged)
comfy.model_management.unload_all_models()
dyn = dynamic.apply(patcher, [loading.LoraSpec(lora_path)])[0]
y_dyn = forward(dyn)
assert sqnr(y_plain, y_dyn) < 40, sqnr(y_plain, y_dyn)
assert sqnr(y_merged, y_dyn) > 25, sqnr(y_merged, y_dyn)
comfy.model_management.unload_all_models()
y_third = forward(patcher)
assert sqnr(y_plain, y_third) > 60, sqnr(y_plain, y_third)
print(f"OK nodes: merged vs dynamic {sqnr(y_merged, y_dyn):.1f} dB, plain vs dynamic {sqnr(y_plain, y_dyn):.1f} dB")

# Save INT8 Model on the DynamicVRAM model with the dynamic LoRA: its terms become patches that ComfyUI applies
# lazily while the file is written (requantized once); stock ComfyUI (comfy-kitchen's layout) runs the file
import comfy.sd
from int8_w8a8.ops import saving
comfy.model_management.unload_all_models()
report = saving.save(dyn, os.path.join(tempfile.mkdtemp(), "saved.safetensors"))
comfy.model_management.unload_all_models()
stock = comfy.sd.load_diffusion_model(report.path, disable_dynamic=True)
assert {m.weight._layout_cls for m in stock.model.diffusion_model.modules()
        if layout.is_int8_weight(getattr(m, "weight", None))} == {"TensorWiseINT8Layout"}
y_saved = forward(stock)
assert report.dynamic == 4 and set(report.kept) == {"BF16"}, report
assert sqnr(y_dyn, y_saved) > 30, sqnr(y_dyn, y_saved)
print(f"OK save: {report.summary()}; stock ComfyUI vs dynamic {sqnr(y_dyn, y_saved):.1f} dB")
"""


def test_dynamic_vram_with_lora(model_file, comfyui):
    """ComfyUI's DynamicVRAM (comfy-aimdo): the model loads on ModelPatcherDynamic, runs, takes a LoRA
    on cast (requantized into the VRAM copy) and drops it again; the pack's merge and dynamic LoRAs
    agree there, and Save INT8 Model writes the dynamic one into a file stock ComfyUI runs. In a fresh
    process: aimdo must be initialized before torch touches CUDA."""
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("comfy_aimdo") is None:
        pytest.skip("comfy-aimdo is not installed: DynamicVRAM is unavailable")
    out = subprocess.run([sys.executable, "-c", DYNAMIC_VRAM_SCRIPT, comfyui.path, model_file["path"]],
                         capture_output=True, text=True, timeout=500, env=dict(os.environ))
    # comfy-aimdo logs every host-buffer operation; keep the script's own lines
    stdout, stderr = ("\n".join(ln for ln in text.splitlines() if "aimdo:" not in ln)
                      for text in (out.stdout, out.stderr))
    print(stdout[-2000:])
    if out.returncode == 3:
        pytest.skip(stdout.strip().splitlines()[-1])
    assert out.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert "OK dynamic" in stdout and "OK nodes" in stdout and "OK save" in stdout
