"""FLUX.2 klein transformers with random weights inside ComfyUI, for model-level benchmarks (GPU).

Built with ComfyUI's own ``comfy.ldm.flux.model.Flux`` at the real widths and depths, weights
~ N(0, 1/fan_in) generated on the GPU (no checkpoint needed, nothing leaves the GPU). The BF16 model
goes through ComfyUI's stock ``load_diffusion_model_state_dict``; the INT8 one through the pack's
loader from the same BF16 tensors (converted on the GPU, layer by layer). Needs COMFYUI_PATH.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Flux2Config:
    """Transformer widths of a FLUX.2 model (ComfyUI's Flux with image_model="flux2")."""

    name: str
    hidden: int
    heads: int
    depth: int
    single: int
    context: int


CONFIGS = {
    "klein9b": Flux2Config("klein 9B", hidden=4096, heads=32, depth=8, single=24, context=12288),
    "klein4b": Flux2Config("klein 4B", hidden=3072, heads=24, depth=5, single=20, context=7680),
    "tiny": Flux2Config("tiny FLUX.2", hidden=256, heads=2, depth=1, single=1, context=64),  # CPU smoke runs
}


def setup_comfyui(cpu: bool = False, pytorch_attention: bool | None = None) -> None:
    """Import ComfyUI from COMFYUI_PATH (on the GPU, or on the CPU for smoke runs); ``pytorch_attention``: ComfyUI's
    ``--use-pytorch-cross-attention`` (SDPA, its default on NVIDIA GPUs), by default on for the CPU too: ComfyUI's
    CPU default, sub-quadratic attention, picks its chunk sizes from the host's free memory at each call, so a
    compiled CPU run recompiles whenever other processes move that memory (a timed step of an ``--overlap`` run
    compiled a new graph in CI)."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (bench/run_on_gpu.sh does it for a carried .comfyui/)")
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args

    args.cpu = cpu  # before comfy.model_management is imported
    args.use_pytorch_cross_attention = args.use_pytorch_cross_attention or (cpu if pytorch_attention is None
                                                                            else pytorch_attention)
    import comfy.model_management  # noqa: F401


def unet_config(cfg: Flux2Config) -> dict:
    """ComfyUI's unet config for ``cfg``: what its detection returns for a FLUX.2 klein file of these widths."""
    return {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
            "context_in_dim": cfg.context, "hidden_size": cfg.hidden, "mlp_ratio": 3.0, "num_heads": cfg.heads,
            "depth": cfg.depth, "depth_single_blocks": cfg.single, "axes_dim": [32, 32, 32, 32], "theta": 2000,
            "patch_size": 1, "qkv_bias": False, "guidance_embed": False, "txt_ids_dims": [3],
            "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index",
            "ref_index_scale": 10.0}


def module(cfg: Flux2Config, device="meta", dtype=torch.bfloat16):
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    return Flux(**unet_config(cfg), operations=comfy.ops.disable_weight_init, device=device, dtype=dtype)


def random_state_dict(cfg: Flux2Config, device: str = "cuda", seed: int = 0) -> dict[str, torch.Tensor]:
    """BF16 weights on ``device``: N(0, 1/fan_in) matrices, ones for norms, small biases."""
    return random_weights(module(cfg).state_dict(), device, seed)


def random_weights(template: dict[str, torch.Tensor], device: str = "cuda", seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded BF16 tensors shaped like ``template`` (e.g. a meta module's state dict), made on ``device``:
    tensors of 2+ dims ~ N(0, 1/fan_in) with fan_in the product of all but the first dim (a Linear's K, a
    convolution's C*kernel), 1-D tensors named like norms = 1, other 1-D tensors (biases) ~ N(0, 0.02^2)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for k, v in template.items():
        if v.dim() >= 2:
            t = torch.randn(v.shape, device=device, generator=gen, dtype=torch.bfloat16)
            sd[k] = t.mul_(1 / math.sqrt(math.prod(v.shape[1:])))
        elif "norm" in k:
            sd[k] = torch.ones(v.shape, device=device, dtype=torch.bfloat16)
        else:
            sd[k] = torch.randn(v.shape, device=device, generator=gen, dtype=torch.bfloat16) * 0.02
    return sd


def inputs(cfg: Flux2Config, device: str = "cuda", image: int = 1024, text: int = 512, seed: int = 1):
    """(x [1, 128, image/16, image/16], timestep [1], context [1, text, context]) in BF16 on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    side = image // 16
    return (torch.randn(1, 128, side, side, device=device, generator=gen, dtype=torch.bfloat16),
            torch.tensor([0.7], device=device, dtype=torch.bfloat16),
            torch.randn(1, text, cfg.context, device=device, generator=gen, dtype=torch.bfloat16))


def _options(device: str, dynamic: bool = False) -> dict:
    """Load and keep the model on ``device``: no host round trip for a model that fits (the H200's case).
    ``dynamic``: as ComfyUI's default on NVIDIA, DynamicVRAM (``enable_dynamic_vram``): the weights stay in host
    memory (the offload device) and comfy-aimdo stages them in VRAM as layers run."""
    if dynamic:
        # ComfyUI's own load device (cuda:N, never a bare "cuda"): comfy-aimdo's VBAR takes the device index
        import comfy.model_management

        return {"offload_device": torch.device("cpu"), "load_device": comfy.model_management.get_torch_device()}
    return {"offload_device": torch.device(device), "load_device": torch.device(device)}


def enable_dynamic_vram() -> None:
    """ComfyUI's DynamicVRAM as its main.py turns it on (comfy-aimdo's library loaded and its devices set up, then
    ModelPatcherDynamic as the core patcher); call before CUDA is initialized. Raises SystemExit when comfy-aimdo is
    missing or cannot initialize here."""
    try:
        import comfy_aimdo.control
    except ImportError as exc:
        raise SystemExit(f"DynamicVRAM needs comfy-aimdo: {exc}") from exc
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher

    if not comfy_aimdo.control.init():
        raise SystemExit("comfy-aimdo's library did not load: DynamicVRAM is unavailable")
    devices = [d.index or 0 for d in comfy.model_management.get_all_torch_devices()]
    try:
        ok = comfy_aimdo.control.init_devices((i, 0) for i in devices)
    except TypeError:  # comfy-aimdo 0.4.9's protocol
        ok = comfy_aimdo.control.init_devices(iter(devices))
    if not ok:
        raise SystemExit("comfy-aimdo could not initialize DynamicVRAM on this machine")
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True


def load_bf16(sd: dict, device: str = "cuda", dynamic: bool = False):
    """ComfyUI's stock loader on a copy of ``sd``'s dict (tensors are copied into the model)."""
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=_options(device, dynamic),
                                                    disable_dynamic=not dynamic)


def load_int8(sd: dict, device: str = "cuda", options=None, source: str = "random FLUX.2", dynamic: bool = False):
    """The pack's loader on ``sd`` (converted on the GPU when there is one, layer by layer)."""
    from ..ops import formats, loader

    nsd, report = formats.normalize(dict(sd), None, source)
    return loader.build(nsd, report, options or loader.LoadOptions(), source, model_options=_options(device, dynamic),
                        disable_dynamic=not dynamic)


def load_fp8_fast(sd: dict, device: str = "cuda", dynamic: bool = False):
    """ComfyUI's stock loader with weight_dtype fp8_e4m3fn_fast: FP8 weights and torch._scaled_mm where the GPU
    has FP8 (activations cast to FP8 with a per-tensor scale of 1)."""
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model_state_dict(
        dict(sd), model_options={**_options(device, dynamic), "dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
        disable_dynamic=not dynamic)
    if dynamic:
        _store_in_model_dtype(patcher.model.diffusion_model)
    return patcher


def _store_in_model_dtype(model: torch.nn.Module) -> None:
    """Cast each parameter to the dtype its module was built for (``<name>_comfy_model_dtype``), as an FP8 checkpoint
    file stores it. Why: under DynamicVRAM ComfyUI loads the state dict by assignment, so a BF16 state dict loaded
    with weight_dtype fp8_e4m3fn keeps BF16 parameters, ``fp8_linear`` declines them (it reads the parameter's dtype)
    and every matmul runs in BF16 (measured on the H200, bench/NOTES.md item 53: SQNR inf against BF16, 12.3 GB of
    weights on Z-Image). Without DynamicVRAM the load copies into FP8 parameters; this is the same cast."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            dtype = getattr(module, f"{name}_comfy_model_dtype", None)
            if dtype is not None and param.dtype != dtype:
                setattr(module, name, torch.nn.Parameter(param.detach().to(dtype), requires_grad=False))


def load_comfy_int8(nsd: dict, header: dict, device: str = "cuda"):
    """ComfyUI's stock loader on a native int8_tensorwise state dict with ComfyUI's own layout and
    comfy-kitchen's kernels, as without the pack (the pack's layout hook is switched off for the load; call
    ``native.install()`` afterwards to switch it back on)."""
    import comfy.sd

    from ..ops import native

    native.uninstall("TensorWiseINT8Layout")
    patcher = comfy.sd.load_diffusion_model_state_dict(nsd, model_options=_options(device), metadata=header,
                                                       disable_dynamic=True)
    layouts = {getattr(m.weight, "_layout_cls", None) for m in patcher.model.diffusion_model.modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor)}
    if "TensorWiseINT8Layout" not in layouts or "Int8W8A8Layout" in layouts:
        raise RuntimeError(f"ComfyUI's native INT8 load did not use kitchen's layout alone: {layouts}")
    return patcher


def forward(patcher, x) -> torch.Tensor:
    """One transformer forward (the patcher's patches applied by ComfyUI first)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    with torch.inference_mode():
        return patcher.model.diffusion_model(*(t.to(dtype) for t in x))


def weight_bytes(patcher) -> int:
    """Bytes of the diffusion model's parameters and buffers (INT8 data and scales for INT8 layers)."""
    from ..ops import layout

    total = 0
    for t in list(patcher.model.diffusion_model.parameters()) + list(patcher.model.diffusion_model.buffers()):
        if layout.is_int8_weight(t):
            total += t._qdata.numel() + t._params.scale.numel() * 4
        else:
            total += t.numel() * t.element_size()
    return total
