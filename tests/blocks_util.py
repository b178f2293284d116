"""Helpers for the fused-block tests of architectures beyond FLUX.2 (integration tier).

Tiny models are built with ComfyUI's own model classes (random BF16 weights) and loaded through the pack's
loader (``loader.build``: ComfyUI's ``load_diffusion_model_state_dict`` with the pack's operations), so the
fused blocks are installed where they are for users. ComfyUI's model detection reads most widths from the
keys but assumes some of the real models' widths (Chroma's approximator: 3072 wide, 5120 hidden, 5 layers;
Qwen-Image: 24 heads of 128, a 3584-wide text input; Z-Image: recognized by its 3840 width; Wan: a 4096-wide
text input): ``tiny_detection`` reads those from the keys too, so a tiny model of the same class loads. Each
fused model is compared with ComfyUI's blocks on the same INT8 weights and both with a float64 twin: ComfyUI's
class in float64 with the INT8 weights dequantized.

What the GPU run sees is what ComfyUI does: inputs reach the model as ComfyUI's ``_apply_model`` converts them
(``model_inputs``: dtype and load device, lists such as ``ref_latents`` included), lowvram weight functions
come from ComfyUI's own lowvram load (``lowvram``; a load resets weight functions set by hand), and batch
entries are compared bit for bit only at equal shapes (``check_batch_entries``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import pytest
import torch

from int8_w8a8.kernels import fused as fused_kernels

from .conftest import sqnr_db

KERNELS = ("norm_modulate_quantize", "glu_quantize", "qk_norm_rope", "int8_gemm_residual")  # FLUX-style blocks
COUNTED = (*KERNELS, "rms_norm_gate_add", "rms_norm_gate_add_quantize", "glu_gemm", "split_glu_gemm")


def random_state_dict(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random BF16 weights for ``module``'s keys: N(0, 1/fan_in) matrices, unit norm weights, small biases."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        if v.dim() >= 2:
            sd[k] = torch.randn(v.shape, generator=gen) / math.sqrt(v[0].numel())
        elif "norm" in k:
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=gen)
        elif v.is_floating_point():
            sd[k] = torch.randn(v.shape, generator=gen) * 0.02
        else:
            sd[k] = v
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}


def _chroma_widths(sd: dict, prefix: str) -> dict:
    n_layers = len({k.split(".")[2] for k in sd if k.startswith(f"{prefix}distilled_guidance_layer.norms.")})
    w = sd[f"{prefix}distilled_guidance_layer.in_proj.weight"]
    return {"in_dim": w.shape[1], "hidden_dim": w.shape[0], "n_layers": n_layers,
            "out_dim": sd[f"{prefix}distilled_guidance_layer.out_proj.weight"].shape[0]}


def _lumina_widths(sd: dict, prefix: str) -> dict:
    """Z-Image's settings (ComfyUI applies them only at Z-Image's width, 3840) with the heads read from the keys;
    a Lumina 2 layout (SiLU before its adaLN projection) keeps ComfyUI's defaults but for the heads."""
    head_dim = sd[f"{prefix}layers.0.attention.q_norm.weight"].shape[0]
    dim = sd[f"{prefix}cap_embedder.1.weight"].shape[0]
    qkv = sd[f"{prefix}layers.0.attention.qkv.weight"].shape[0]
    widths = {"n_heads": dim // head_dim, "n_kv_heads": (qkv - dim) // (2 * head_dim),
              "ffn_dim_multiplier": sd[f"{prefix}layers.0.feed_forward.w1.weight"].shape[0] / dim,
              "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0}
    if f"{prefix}layers.0.adaLN_modulation.0.weight" in sd:  # Z-Image: one Linear, no SiLU
        widths.update(z_image_modulation=True, time_scale=1000.0)
        if f"{prefix}cap_pad_token" in sd:
            widths["pad_tokens_multiple"] = 32
    return widths


def _qwen_widths(sd: dict, prefix: str) -> dict:
    head_dim = sd[f"{prefix}transformer_blocks.0.attn.norm_q.weight"].shape[0]
    return {"attention_head_dim": head_dim, "num_attention_heads": sd[f"{prefix}img_in.weight"].shape[0] // head_dim,
            "joint_attention_dim": sd[f"{prefix}txt_norm.weight"].shape[0],
            "out_channels": sd[f"{prefix}proj_out.weight"].shape[0] // 4}


# image_model -> the widths ComfyUI's detection assumes for the real model, read from a state dict instead
def _wan_widths(sd: dict, prefix: str) -> dict:
    return {"text_dim": sd[f"{prefix}text_embedding.0.weight"].shape[1]}


_WIDTHS: dict[str, Callable[[dict, str], dict]] = {"chroma": _chroma_widths, "chroma_radiance": _chroma_widths,
                                                   "qwen_image": _qwen_widths, "lumina2": _lumina_widths,
                                                   "wan2.1": _wan_widths}


@contextlib.contextmanager
def tiny_detection():
    """ComfyUI's ``detect_unet_config`` with the assumed widths of ``_WIDTHS`` read from the state dict."""
    import comfy.model_detection

    original = comfy.model_detection.detect_unet_config

    def detect(state_dict, key_prefix, metadata=None):
        config = original(state_dict, key_prefix, metadata=metadata)
        widths = _WIDTHS.get((config or {}).get("image_model"))
        return {**config, **widths(state_dict, key_prefix)} if widths else config

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(comfy.model_detection, "detect_unet_config", detect)
        yield


@contextlib.contextmanager
def tiny_models(build: Callable[..., torch.nn.Module], seed: int,
                dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32)):
    """A module-scoped ``models`` fixture's value, inside ``tiny_detection`` for the fixture's scope: ``"sd"``,
    random BF16 weights for ``build(device="meta")`` (``random_state_dict``), and ``"fused-<dtype>"`` /
    ``"plain-<dtype>"`` (e.g. ``"fused-bfloat16"``): the pack's loads of them with and without fused blocks."""
    sd = random_state_dict(build(device="meta"), seed=seed)
    with tiny_detection():
        yield {"sd": sd, **{f"{name}-{str(dt)[6:]}": load(sd, dt, fused_blocks=(name == "fused"))
                            for name in ("fused", "plain") for dt in dtypes}}


def load(sd: dict, dtype: torch.dtype, **options):
    """The pack's loader on ``sd`` (BF16 weights converted to INT8 on load) with activations in ``dtype``."""
    from int8_w8a8.ops import formats, loader

    nsd, report = formats.normalize(dict(sd), None, "tiny")
    return loader.build(nsd, report, loader.LoadOptions(**options), "tiny", model_options={"dtype": dtype},
                        disable_dynamic=True)


def load_bf16(sd: dict, dtype: torch.dtype = torch.bfloat16):
    """ComfyUI's stock loader on ``sd``, without the pack: the float model the INT8 one is made from."""
    import comfy.sd

    return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": dtype}, disable_dynamic=True)


def comfy_lora(patcher, path, strength: float = 1.0):
    """A clone of ``patcher`` with the LoRA file at ``path`` applied by ComfyUI's own LoRA code (its key map and
    converter, weight patches merged when the model loads): on a BF16 model, the reference "BF16 + LoRA"."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.utils

    clone = patcher.clone()
    lora_sd = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(path)))
    patches = comfy.lora.load_lora(lora_sd, comfy.lora.model_lora_keys_unet(clone.model, {}))
    applied = clone.add_patches(patches, strength)
    assert patches and len(applied) == len(patches), f"ComfyUI applied {len(applied)} of {len(patches)} LoRA patches"
    return clone


def load_one_unrotated(sd: dict, prefix: str, unrotated: str):
    """The pack's load (bfloat16 activations) of a file made from ``sd`` whose layers under ``prefix`` are
    stored as ComfyUI native INT8 with ConvRot group 64, all but ``unrotated``, which is INT8 without rotation."""
    import json

    from int8_w8a8.ops import formats, loader

    from . import formats_util

    def chosen(convrot):
        return lambda layer: layer.startswith(prefix) and ((layer == unrotated) != bool(convrot))

    sd, layers = dict(sd), {}
    for convrot in (64, 0):
        sd, meta = formats_util.native(sd, chosen(convrot), convrot=convrot)
        layers.update(json.loads(meta["_quantization_metadata"])["layers"])
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    nsd, report = formats.normalize(sd, meta, "mixed.safetensors")
    with tiny_detection():
        return loader.build(nsd, report, loader.LoadOptions(), "mixed", model_options={"dtype": torch.bfloat16},
                            disable_dynamic=True)


def model_inputs(patcher, args: tuple, kwargs: dict | None = None) -> tuple[tuple, dict]:
    """``args`` (x, timesteps, context) and ``kwargs`` as ComfyUI's ``BaseModel._apply_model`` hands them to the
    diffusion model for the samplers: x and context in the model's dtype, timesteps [B] (or [B, frames]) in
    float32, every other tensor argument, also each tensor of a list (``ref_latents``), through ComfyUI's
    ``convert_tensor`` (floats to the model's dtype), all on the patcher's load device."""
    import comfy.model_base

    dtype, dev = patcher.model.get_dtype(), patcher.load_device
    args = tuple(a.to(dev, torch.float32 if i == 1 else dtype) if a.is_floating_point() else a.to(dev)
                 for i, a in enumerate(args))
    kwargs = {k: [comfy.model_base.convert_tensor(t, dtype, dev) for t in v] if isinstance(v, list)
              else comfy.model_base.convert_tensor(v, dtype, dev) for k, v in (kwargs or {}).items()}
    return args, kwargs


def run(patcher, args: tuple, kwargs: dict | None = None, fused: bool = True, options: dict | None = None,
        load: bool = True):
    """The diffusion model on ``args`` (x, timesteps, context) and ``kwargs`` (converted by ``model_inputs``)
    with the patcher's transformer options and wrappers. ``fused=False`` drops the block replacements;
    ``load=False`` runs the model as the caller loaded it (e.g. ``lowvram``) instead of loading it through
    ComfyUI's model management (a full load, which would replace a lowvram load)."""
    import comfy.model_management
    import comfy.patcher_extension

    if load:
        comfy.model_management.load_models_gpu([patcher])
    args, kwargs = model_inputs(patcher, args, kwargs)
    opts = comfy.patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    if not fused:
        opts.pop("patches_replace", None)
    opts["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
    opts.update(options or {})
    with torch.inference_mode():
        return patcher.model.diffusion_model(*args, transformer_options=opts, **kwargs).float()


@contextlib.contextmanager
def lowvram(patcher, layers: Iterable[str], rank: int = 4):
    """``patcher`` (a clone of a shared model) loaded the way ComfyUI loads a model that does not fit its device,
    with a LoRA on each of ``layers`` (names relative to the diffusion model).

    ComfyUI's ``ModelPatcher.load`` with a memory budget leaves every weight offloaded (cast to the device per
    layer) and gives each patched layer a ``LowVramPatch`` weight function that applies the LoRA on the fly; a
    load resets every other layer's weight functions. This is that load (``patch_model`` with a 1-byte budget,
    after ComfyUI's model management unloaded everything, as when it frees the device for it); the model runs
    as loaded (``run(..., load=False)``) and is unpatched after.
    """
    import comfy.model_management
    from comfy.model_patcher import LowVramPatch
    from comfy.weight_adapter.lora import LoRAAdapter

    dm = patcher.model.diffusion_model
    for i, layer in enumerate(layers):
        n, k = dm.get_submodule(layer).weight.shape
        gen = torch.Generator().manual_seed(i)
        up, down = torch.randn(n, rank, generator=gen) * 0.05, torch.randn(rank, k, generator=gen) * 0.05
        key = f"diffusion_model.{layer}.weight"
        assert patcher.add_patches({key: LoRAAdapter(set(), (up, down, None, None, None, None))}, 1.0) == [key]
    comfy.model_management.unload_all_models()
    patcher.patch_model(device_to=patcher.load_device, lowvram_model_memory=1)
    try:
        functions = {name: m.weight_function for name, m in dm.named_modules() if getattr(m, "weight_function", None)}
        assert set(functions) == set(layers) and all(
            len(f) == 1 and isinstance(f[0], LowVramPatch) for f in functions.values()), functions
        yield patcher
    finally:
        patcher.unpatch_model(device_to=patcher.offload_device)


DYNAMIC_LORA = "dyn.safetensors"  # the file ``dynamic_lora`` writes into its ``tmp_path``


def dynamic_lora(patchers: Iterable, sd: dict, prefixes: tuple[str, ...], tmp_path, monkeypatch, rank: int = 4,
                 rel: float = 0.2) -> list:
    """Clones of ``patchers`` with one LoRA applied by the pack's dynamic LoRA (``lora/dynamic.apply``, what the
    "Load LoRA (INT8 dynamic)" node runs): rank ``rank`` on every linear layer of ``sd`` under ``prefixes`` (the
    blocks; separate q/k/v projections each get their own pair), each changing its weight by ``rel`` of its norm,
    written as a real safetensors file (``tmp_path / DYNAMIC_LORA``) and read through ComfyUI's LoRA loader."""
    import folder_paths
    import safetensors.torch

    from int8_w8a8.lora import dynamic, loading

    from . import lora_util

    layers = [name for name in lora_util.linear_layers(sd) if name.startswith(prefixes)]
    safetensors.torch.save_file(lora_util.lora(sd, layers, rank=rank, rel=rel), str(tmp_path / DYNAMIC_LORA))
    monkeypatch.setattr(folder_paths, "get_full_path", lambda kind, name: str(tmp_path / name))
    clones = []
    for patcher in patchers:
        clone, reports = dynamic.apply(patcher, [loading.LoraSpec(DYNAMIC_LORA, 1.0)])
        assert reports[0].matched_keys == reports[0].total_keys == 2 * len(layers), reports[0].summary()
        clones.append(clone)
    return clones


def check_dynamic_lora(fused: torch.Tensor, comfy: torch.Tensor, fused_without: torch.Tensor,
                       floor_db: float = 30) -> None:
    """The fused blocks with a dynamic LoRA (``fused``) match ComfyUI's blocks with the same LoRA (``comfy``)
    above ``floor_db``, and the LoRA is there: the fused model without it (``fused_without``) is 10 dB further."""
    s_with, s_without = sqnr_db(comfy, fused), sqnr_db(comfy, fused_without)
    print(f"[sqnr vs ComfyUI's blocks + LoRA] fused + LoRA {s_with:.2f} dB, fused without it {s_without:.2f} dB")
    assert s_with > floor_db and s_with > s_without + 10, (s_with, s_without)


def comfy_class(patcher) -> Callable[..., torch.nn.Module]:
    """A ``build(dtype=, device=, operations=)`` for ``float64_twin``: the class of ``patcher``'s diffusion model
    with the unet config ComfyUI built it from (what ``BaseModel.__init__`` calls), at another dtype."""
    cls = type(patcher.model.diffusion_model)
    config = {k: v for k, v in patcher.model.model_config.unet_config.items() if k != "dtype"}

    def build(dtype, device, operations):
        return cls(**config, dtype=dtype, device=device, operations=operations)

    return build


def float64_twin(patcher, build: Callable[..., torch.nn.Module], device: str | torch.device = "cpu") -> torch.nn.Module:
    """ComfyUI's model class (``build(dtype=, device=, operations=)``) in float64 on ``device`` with ``patcher``'s
    weights, INT8 ones dequantized: the INT8 model's exact math without activation quantization or bf16 rounding.
    (At real widths ``device`` is the GPU: a CPU float64 step of a 3072-wide block takes minutes.)"""
    import comfy.ops

    from int8_w8a8.ops import layout

    dm = patcher.model.diffusion_model
    sd = {}
    for name, t in [*dm.named_parameters(), *dm.named_buffers()]:
        t = t.dequantize() if layout.is_int8_weight(t) else t
        sd[name] = t.to(device, torch.float64) if t.is_floating_point() else t.to(device)
    twin = build(dtype=torch.float64, device=device, operations=comfy.ops.disable_weight_init)
    missing, unexpected = twin.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("__") for k in missing), (missing, unexpected)
    return twin.eval()


def float64_truth(patcher, build: Callable[..., torch.nn.Module], args: tuple,
                  kwargs: dict | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """``float64_twin(patcher, build, device)`` in float64, on the values ``run`` gives the patcher's model
    (``model_inputs``: rounded to the model's dtype where ComfyUI rounds them), so both see the same inputs.
    ComfyUI's training flag is set for the call: its RoPE and q/k-norm functions then take their pure-torch path
    (comfy-kitchen's refuse float64)."""
    import comfy.model_management

    def as64(v):
        if isinstance(v, list):
            return [as64(t) for t in v]
        if isinstance(v, torch.Tensor):
            return v.to(device, torch.float64) if v.is_floating_point() else v.to(device)
        return v

    twin = float64_twin(patcher, build, device)
    args, kwargs = model_inputs(patcher, args, kwargs)
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(comfy.model_management, "in_training", True)
        return twin(*(as64(a) for a in args), **{k: as64(v) for k, v in kwargs.items()}).float()


def check_against_float64(fused: torch.Tensor, comfy: torch.Tensor, truth: torch.Tensor, floor_db: float) -> None:
    """The fused blocks at least as close to the float64 truth as ComfyUI's blocks on the same INT8 weights
    (within 0.5 dB: both quantize activations; ComfyUI also rounds to bf16 after every op), above a floor."""
    s_fused, s_comfy = sqnr_db(truth.cpu(), fused.cpu()), sqnr_db(truth.cpu(), comfy.cpu())
    print(f"[sqnr vs float64] fused {s_fused:.2f} dB, ComfyUI blocks {s_comfy:.2f} dB")
    assert s_fused > floor_db and s_fused > s_comfy - 0.5, (s_fused, s_comfy)


def check_batch_entries(run_batch: Callable[[tuple], torch.Tensor], args: tuple, other: tuple,
                        batched: torch.Tensor, truth: torch.Tensor, margin_db: float = 1.0) -> None:
    """Batch entries are independent: ``run_batch(args)`` of a batch of two gave ``batched``; ``other`` are
    inputs of the same shapes (another seed); ``truth`` is the float64 (or unquantized) output for ``args``.

    Entry 1 replaced by ``other``'s: entry 0 stays the same bit for bit (same shapes, so the same kernels; a
    change is entry 1 leaking into entry 0). Entry 0 alone (a batch of one): as close to ``truth`` as in the
    batch, within ``margin_db``, but not bit for bit. At another problem size a float op may round differently
    in the last bit (cuBLAS picks its GEMM kernels by shape; no TF32 is involved: PyTorch leaves it off for
    matmuls, neither ComfyUI nor the pack turns it on, and the pack's only float Triton dots rotate ConvRot
    groups). That moves an activation at the midpoint of two INT8 codes to the other code, and the flip spreads
    through the later quantizations: on an H200 a float32 Z-Image's batch of one was 44.9 dB from its batched
    entry; on the CPU a 2^-23 change of one input element moved its output by 40 dB, about its distance to
    float64 (39.4 dB). A flip swaps a rounding error for one of the same size and the other sign, so the error
    power is still the activation quantization's; only its realization differs, whose SQNR against ``truth``
    moved by at most 0.26 dB in 64 simulated ones (Chroma, Qwen-Image, Wan, Z-Image in float32 and bf16, every
    float linear's result moved by up to 4 float32 ulps before its rounding to the model's dtype)."""
    swapped = run_batch(tuple(torch.cat([a[:1], o[1:]]) for a, o in zip(args, other, strict=True)))
    assert torch.equal(swapped[:1], batched[:1]), "batch entry 0 changed with entry 1"
    single = run_batch(tuple(a[:1] for a in args))
    t = truth[:1].cpu()
    s_batched, s_single = sqnr_db(t, batched[:1].cpu()), sqnr_db(t, single.cpu())
    print(f"[sqnr vs truth] entry 0 in the batch {s_batched:.2f} dB, alone {s_single:.2f} dB")
    assert s_single > s_batched - margin_db, (s_single, s_batched)


def count_kernel_calls(monkeypatch, activations: bool = True) -> dict:
    """Count calls of the fused kernels (counting wrappers around the pack's own functions); ``glu_quantize``
    calls are also counted per activation (``"glu_quantize:gelu_tanh"``)."""
    counts: dict[str, int] = {}

    def counting(name, fn):
        def wrapped(*a, **k):
            counts[name] = counts.get(name, 0) + 1
            if name == "glu_quantize" and activations:
                key = f"{name}:{k.get('activation', 'swiglu')}"
                counts[key] = counts.get(key, 0) + 1
            return fn(*a, **k)
        return wrapped

    for name in COUNTED:
        monkeypatch.setattr(fused_kernels, name, counting(name, getattr(fused_kernels, name)))
    return counts


def count_linear_calls(monkeypatch, counts: dict, names: tuple[str, ...] = ("run_quantized", "forward")) -> dict:
    """Also count, in ``counts`` (``count_kernel_calls``'), how often Int8Linear layers ran on rows quantized
    before them (``"run_quantized"``) or, fusable layers only, quantized their own input (``"forward"``)."""
    from int8_w8a8.ops.comfy_ops import Int8Linear

    for name in names:
        original = getattr(Int8Linear, name)

        def counting(self, *a, _name=name, _fn=original, **k):
            if _name == "run_quantized" or self.fusable():
                counts[_name] = counts.get(_name, 0) + 1
            return _fn(self, *a, **k)

        monkeypatch.setattr(Int8Linear, name, counting)
    return counts


def compiled_in_one_graph(patcher, args: tuple, kwargs: dict | None = None, options: dict | None = None,
                          ops: Iterable[str] = (*KERNELS, "flux_rope_table")) -> torch.Tensor:
    """The patcher's diffusion model traced by ``torch.compile(fullgraph=True)`` (aot_eager) and run on ``args``
    (x, timesteps, context: on the load device, timesteps [B] in float32, the others in the model's dtype),
    ``kwargs`` as given and ``transformer_options=options`` (default ``{}``): checks one graph, no breaks, each
    of ``ops`` in it; returns the output in float32."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(patcher.model.diffusion_model, backend=backend, fullgraph=True)
    dev, dtype = patcher.load_device, patcher.model.get_dtype()
    with torch.inference_mode():
        y = compiled(*(a.to(dev, dtype if a.dim() > 1 else torch.float32) for a in args), **(kwargs or {}),
                     transformer_options={} if options is None else options).float()
    assert not counters["graph_break"] and backend.frame_count == 1
    names = {str(n.target) for g in backend.graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in ops:
        assert any(op in name for name in names), (op, sorted(names))
    return y


def sdpa_attention(monkeypatch) -> None:
    """ComfyUI's PyTorch SDPA attention everywhere, also where a model module imported the function by name (its
    CPU default asks psutil for free memory, which breaks torch.compile graphs; GPUs use SDPA, as here)."""
    import importlib

    import comfy.ldm.modules.attention

    sdpa = comfy.ldm.modules.attention.attention_pytorch
    for module, names in (("comfy.ldm.modules.attention", ("optimized_attention", "optimized_attention_masked")),
                          ("comfy.ldm.flux.math", ("optimized_attention",)),
                          ("comfy.ldm.qwen_image.model", ("optimized_attention_masked",)),
                          ("comfy.ldm.lumina.model", ("optimized_attention_masked",)),
                          ("comfy.ldm.wan.model", ("optimized_attention",))):
        for name in names:
            monkeypatch.setattr(importlib.import_module(module), name, sdpa)
