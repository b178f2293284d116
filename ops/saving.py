"""Saving a MODEL as a ComfyUI-native int8_tensorwise file that stock ComfyUI runs without the pack (ComfyUI glue).

``save_model(model, path)`` (``save`` returns a report) writes what stock ComfyUI (0.27+, comfy-kitchen) runs,
and nothing else:

* INT8 layers as ``int8_tensorwise``: int8 weight ``[N, K]``, float32 ``weight_scale`` (``[N, 1]`` or ``[]``),
  a ``comfy_quant`` tensor per layer and the ``_quantization_metadata`` header; ConvRot groups 64 and 256;
* every LoRA on the model merged into the weights. ComfyUI patches (the merge nodes, the loader's LoRA input
  on layers it keeps in float) are applied by ComfyUI's patcher as for sampling. Dynamic low-rank terms (the
  dynamic nodes' ``int8_lora`` object patches, ``ops.lowrank``) are first turned into ordinary patches on a
  clone, so that each patched INT8 weight is dequantized, gets every LoRA in float and is requantized once
  (``Int8Linear.set_weight``), exactly as the merge node does;
* float tensors (layers kept in high precision, norms, biases) in the dtype the source had them: ComfyUI
  holds the whole model in float32 on the CPU, which would make the INT8 file larger than its BF16 source.

Refused before anything is loaded or written, naming the layers and what to do instead: ConvRot groups that
comfy-kitchen cannot run (it builds Hadamard matrices of sizes 4^n only, so 128 fails at the first step),
SmoothQuant layers (the native format has no smoothing vector) and models without INT8 layers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import torch
from comfy.weight_adapter.lora import LoRAAdapter
from comfy_kitchen.tensor import QuantizedTensor

from . import formats, layout, lowrank

logger = logging.getLogger(__name__)

# ConvRot groups stock ComfyUI runs: comfy-kitchen's "regular" Hadamard matrices are Kronecker powers of a 4x4 one.
STOCK_ROTATE_GROUPS = (64, 256)
# Attribute of ComfyUI's BaseModel where the loader records each float tensor's dtype in the source (key -> dtype).
SOURCE_DTYPES = "int8_w8a8_source_dtypes"
_SIDECARS = frozenset(formats.LAYER_KEYS - {"weight", "bias"} | {formats.SMOOTH})
PREFIX = "diffusion_model."


class Int8SaveError(ValueError):
    """A model the save node cannot write as a file stock ComfyUI runs: says which layers, why, what to choose."""

    __module__ = "int8_w8a8"  # what ComfyUI shows as the error's type (not the install path)


@dataclass(frozen=True)
class SaveReport:
    """What ``save_model`` wrote: the file, its size, INT8 layers, kept float weights by dtype, merged LoRAs."""

    path: str
    size: int
    int8: int
    kept: Counter
    patched: int  # weights with LoRA patches (merge nodes, loader LoRAs on kept layers) merged in
    dynamic: int  # of those, layers whose dynamic LoRA terms were merged in

    def summary(self) -> str:
        kept = " and ".join(f"{n} in {dtype}" for dtype, n in sorted(self.kept.items())) or "none"
        text = (f"saved {self.path} ({self.size / 2**20:.1f} MiB): {self.int8} INT8 layers, kept in high precision: "
                f"{kept}")
        if self.patched:
            text += f"; LoRAs merged into {self.patched} weights"
            if self.dynamic:
                text += f" ({self.dynamic} of them from dynamic LoRA nodes, requantized once)"
        return text


def source_dtypes(nsd: dict) -> dict[str, torch.dtype]:
    """The dtype each float tensor of the normalized state dict ``nsd`` has in the source (FP8 weights, kept in
    float, count as BF16); taken before ComfyUI's loader consumes ``nsd``."""
    dtypes = {}
    for key, value in nsd.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if key.rpartition(".")[2] in _SIDECARS:
            continue
        dtypes[key] = torch.bfloat16 if value.dtype in formats.FP8_FORMATS else value.dtype
    return dtypes


def remember_source_dtypes(base_model, dtypes: dict[str, torch.dtype]) -> None:
    """Record ``source_dtypes`` on ComfyUI's ``base_model``; ``save_model`` writes float tensors back in them."""
    setattr(base_model, SOURCE_DTYPES, dict(dtypes))


def check_stock_runs(dm: torch.nn.Module) -> int:
    """The number of INT8 layers of the diffusion model ``dm``; raises Int8SaveError when stock ComfyUI could not
    run one of them (or there are none)."""
    rotated, smoothed, n = {}, [], 0
    for name, module in dm.named_modules():
        w = getattr(module, "weight", None)
        if not layout.is_int8_weight(w):
            continue
        n += 1
        group = layout.rotate_group_of(w._params)
        if group and group not in STOCK_ROTATE_GROUPS:
            rotated.setdefault(group, []).append(name)
        if getattr(w._params, "smooth", None) is not None:
            smoothed.append(name)
    if rotated:
        group, names = next(iter(rotated.items()))
        raise Int8SaveError(
            f"{len(names)} INT8 layer(s) use ConvRot group {group} (first: {names[0]}), which stock ComfyUI cannot "
            f"run: comfy-kitchen builds Hadamard matrices of sizes 4^n only ({', '.join(map(str, STOCK_ROTATE_GROUPS))}"
            f"), so the file would load and then fail at the first step. Set convrot_group to 256 (or 64, or 0) on "
            f"the INT8 loader or Quantize Model to INT8 and save that model; ConvRot-{group} models run with this "
            "pack's loader as they are.")
    if smoothed:
        raise Int8SaveError(
            f"{len(smoothed)} INT8 layer(s) use SmoothQuant (first: {smoothed[0]}); ComfyUI's native int8_tensorwise "
            "format has no smoothing vector, so stock ComfyUI would compute them wrong. Keep using the file with this "
            "pack's loader, or convert the BF16 model and save that.")
    if not n:
        raise Int8SaveError("the model has no INT8 layers to save; quantize it first (Load Diffusion Model (INT8 "
                            "W8A8) or Quantize Model to INT8)")
    return n


def _is_lowrank_forward(patch) -> bool:
    return isinstance(patch, functools.partial) and patch.func is lowrank.forward_with_lowrank


def dynamic_terms_as_patches(model) -> tuple[object, int]:
    """``model`` with its dynamic LoRA terms turned into ordinary ComfyUI patches, and how many layers had one.

    Returns ``model`` itself when it has none; otherwise a clone without the ``int8_lora`` object patches (and
    the per-clone forwards that add them on ComfyUI's own layers), with a LoRA patch ``b @ a`` (strength 1, the
    strength is already in ``b``) per layer instead, applied with the model's other patches in one rounding.
    """
    terms = {key: term for key, term in model.object_patches.items()
             if key.endswith(f".{lowrank.ATTR}") and isinstance(term, lowrank.LowRank)}
    if not terms:
        return model, 0
    clone = model.clone()
    patches = {}
    for key, term in terms.items():
        path = key[: -len(lowrank.ATTR) - 1]
        del clone.object_patches[key]
        if _is_lowrank_forward(clone.object_patches.get(f"{path}.forward")):
            del clone.object_patches[f"{path}.forward"]
        up, down = term.b.detach().float().cpu(), term.a.detach().float().cpu()
        patches[f"{path}.weight"] = LoRAAdapter(set(), (up, down, None, None, None, None))
    added = set(clone.add_patches(patches, 1.0))
    missing = sorted(set(patches) - added)
    if missing:  # a term on a module without a weight ComfyUI can patch: never silently dropped
        raise Int8SaveError(f"dynamic LoRA terms on {', '.join(missing[:3])} cannot be merged into the saved "
                            "weights; merge those LoRAs with Load LoRA (INT8 merge) instead")
    return clone, len(terms)


def _to_source_dtypes(sd: dict, dtypes: dict | None) -> None:
    for key, t in list(sd.items()):
        want = (dtypes or {}).get(key)
        if want is not None and isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != want:
            # .to("cpu") first: ComfyUI's lazily patched parameters (lowvram, DynamicVRAM) cast on that call
            sd[key] = t.to("cpu").to(want)


def _lazily_cast(module) -> bool:
    """A layer ComfyUI patches and casts on the fly (lowvram, DynamicVRAM) instead of holding it patched."""
    return hasattr(module, "comfy_cast_weights") and not getattr(module, "comfy_patched_weights", False)


def _state_dict_for_saving(model, dm) -> dict:
    """ComfyUI's ``ModelPatcher.model_state_dict_for_saving(dm, PREFIX)``, except for quantized weights that
    ComfyUI casts lazily: their pieces are read (patched) right away through ComfyUI's own
    ``LazyCastingQuantizedParam``. ComfyUI 0.29 wraps each such piece in a ``torch.nn.Parameter``, which int8
    data cannot be ("Only Tensors of floating point and complex dtype can require gradients"), so its saver
    fails on every INT8 model under DynamicVRAM (seen on the H200, tests/test_gpu_comfy.py). Models without
    such weights go through ComfyUI's function as they are."""
    if not any(isinstance(getattr(m, "weight", None), QuantizedTensor) and _lazily_cast(m) for m in dm.modules()):
        return model.model_state_dict_for_saving(dm, PREFIX)
    original = dm.state_dict()
    out, keys = {}, list(original)
    while keys:
        k = keys.pop(0)
        module_name, _, leaf = k.rpartition(".")
        try:
            op = comfy.utils.get_attr(dm, module_name) if module_name and leaf in ("weight", "bias") else None
        except AttributeError:
            op = None
        if op is None or not _lazily_cast(op):
            out[k] = original[k]
            continue
        weight = comfy.utils.get_attr(model.model, PREFIX + k)
        if isinstance(weight, QuantizedTensor):
            caster = comfy.model_patcher.LazyCastingQuantizedParam(model, PREFIX + k)
            for piece in [x for x in weight.state_dict(k) if x in original]:
                if piece in keys:
                    keys.remove(piece)
                out[piece] = caster.state_dict_tensor(PREFIX + piece)
            continue
        out[k] = comfy.model_patcher.LazyCastingParam(model, PREFIX + k, weight)
    return out


def _prepare(model) -> tuple[dict, dict, int, int, int]:
    """(state dict, header, INT8 layers, patched weights, layers with dynamic terms) for ``model``."""
    n_int8 = check_stock_runs(model.model.diffusion_model)
    model, dynamic = dynamic_terms_as_patches(model)
    comfy.model_management.load_models_gpu([model])  # patched and resident: ComfyUI's saver reads it then
    dm = model.model.diffusion_model
    sd = _state_dict_for_saving(model, dm)
    _to_source_dtypes(sd, getattr(model.model, SOURCE_DTYPES, None))
    layers = {}
    for key in [k for k in sd if k.endswith(".comfy_quant")]:
        conf = json.loads(bytes(sd[key].to(torch.uint8).cpu().numpy().tobytes()))
        layers[key[: -len(".comfy_quant")]] = conf
    header = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    patched = sum(1 for k, v in model.patches.items() if v and k.startswith(PREFIX))
    return sd, header, n_int8, patched, dynamic


def native_state_dict(model) -> tuple[dict, dict]:
    """The diffusion model's weights in ComfyUI's native int8_tensorwise form, every LoRA merged.

    Returns (state dict, safetensors header metadata with ``_quantization_metadata``).
    """
    sd, header, *_ = _prepare(model)
    return sd, header


def save_model(model, path: str) -> str:
    """Write ``model``'s diffusion model to ``path`` as a native int8_tensorwise safetensors file; returns ``path``."""
    return save(model, path).path


def save(model, path: str) -> SaveReport:
    """``save_model`` with a report of what was written (the save node shows it)."""
    sd, header, n_int8, patched, dynamic = _prepare(model)
    kept = Counter()
    for k, t in list(sd.items()):
        if isinstance(t, torch.Tensor) and not t.is_contiguous():
            sd[k] = t.contiguous()
        if k.endswith(".weight") and t.is_floating_point() and t.dim() == 2:
            kept[formats.dtype_name(t.dtype)] += 1
    tmp = f"{path}.partial"
    comfy.utils.save_torch_file(sd, tmp, metadata=header)
    os.replace(tmp, path)  # never leave a truncated file under the final name
    report = SaveReport(path, os.path.getsize(path), n_int8, kept, patched, dynamic)
    logger.info("int8_w8a8: %s", report.summary())
    return report
