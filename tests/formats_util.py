"""Writers of every INT8 checkpoint format the pack reads, for tests (no ComfyUI needed).

Each takes a float state dict in BFL/ComfyUI key naming and a predicate choosing the layers to
quantize, and returns (state dict, safetensors header metadata) as that format's tools write them.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from int8_w8a8.kernels import reference as ref


def _conf(obj: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)


def _linear_layers(sd: dict, quantize: Callable[[str], bool]) -> list[str]:
    return [k[:-7] for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2 and quantize(k[:-7])]


def native(sd, quantize, *, per_row=True, convrot=0, header_only=False, per_layer_only=False):
    """ComfyUI native int8_tensorwise: comfy_quant tensors and/or the _quantization_metadata header."""
    out, layers = dict(sd), {}
    for layer in _linear_layers(sd, quantize):
        q, s = ref.quantize_weight(sd[f"{layer}.weight"].float(), per_row=per_row, rotate_group=convrot)
        conf = {"format": "int8_tensorwise"}
        if convrot:
            conf.update(convrot=True, convrot_groupsize=convrot)
        out[f"{layer}.weight"], out[f"{layer}.weight_scale"] = q, s
        if not header_only:
            out[f"{layer}.comfy_quant"] = _conf(conf)
        layers[layer] = conf
    header = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    meta = None if per_layer_only else header
    return out, meta


def modelopt(sd, quantize):
    """NVIDIA ModelOpt / vistralis: [N, 1] float32 weight_scale plus a static scalar input_scale."""
    out = dict(sd)
    for layer in _linear_layers(sd, quantize):
        q, s = ref.quantize_weight(sd[f"{layer}.weight"].float())
        out[f"{layer}.weight"], out[f"{layer}.weight_scale"] = q, s
        out[f"{layer}.input_scale"] = torch.tensor(0.0213, dtype=torch.float32)
    return out, {"modelopt_version": "0.29.0"}


def smoothing(k: int, seed: int = 0) -> torch.Tensor:
    """A SmoothQuant smoothing vector s [K] (float32): per input channel, between e^-0.75 and e^0.75."""
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(k).uniform_(-0.75, 0.75, generator=gen))


def modelopt_smoothquant(sd, quantize, *, dtype=torch.bfloat16):
    """NVIDIA ModelOpt INT8 SmoothQuant export: the weight stored as ``W * s`` per input channel and quantized
    per row, ``pre_quant_scale = 1 / s`` (activations are multiplied by it) in the model's dtype, a static
    ``input_scale``."""
    out = dict(sd)
    for i, layer in enumerate(_linear_layers(sd, quantize)):
        w = sd[f"{layer}.weight"].float()
        s = smoothing(w.shape[1], seed=i)
        q, scale = ref.quantize_weight(w * s)
        out[f"{layer}.weight"], out[f"{layer}.weight_scale"] = q, scale
        out[f"{layer}.pre_quant_scale"] = (1.0 / s).to(dtype)
        out[f"{layer}.input_scale"] = torch.tensor(0.0213, dtype=torch.float32)
    return out, {"modelopt_version": "0.29.0"}


def int8_fast(sd, quantize, *, style="quarot"):
    """ComfyUI-INT8-Fast saves: 'model.' prefix, comfy_quant without a 'format' key, rotated weights."""
    out = {}
    for k, v in sd.items():
        out[f"model.{k}"] = v
    for layer in _linear_layers(sd, quantize):
        q, s = ref.quantize_weight(sd[f"{layer}.weight"].float(), rotate_group=256)
        out[f"model.{layer}.weight"], out[f"model.{layer}.weight_scale"] = q, s
        conf = ({"quarot": True, "quarot_groupsize": 256} if style == "quarot"
                else {"convrot": True, "convrot_groupsize": 256, "per_row": True})
        out[f"model.{layer}.comfy_quant"] = _conf(conf)
    return out, None


def one_d_scales(sd, quantize, *, dtype=torch.float16):
    """W8A16-style exports (torchao): int8 weights with 1-D [N] scales in float16, no metadata."""
    out = dict(sd)
    for layer in _linear_layers(sd, quantize):
        q, s = ref.quantize_weight(sd[f"{layer}.weight"].float())
        out[f"{layer}.weight"], out[f"{layer}.weight_scale"] = q, s.reshape(-1).to(dtype)
    return out, None


def legacy_names(sd, quantize):
    """Older tools: per-tensor scales under '.scale_weight' and a top-level 'scaled_fp8'-style marker absent."""
    out = dict(sd)
    for layer in _linear_layers(sd, quantize):
        q, s = ref.quantize_weight(sd[f"{layer}.weight"].float(), per_row=False)
        out[f"{layer}.weight"], out[f"{layer}.scale_weight"] = q, s
    return out, None


def fp8_scaled(sd, quantize):
    """FP8 scaled checkpoints: float8_e4m3fn weights, scalar float32 weight_scale, 'scaled_fp8' marker."""
    out = dict(sd)
    for layer in _linear_layers(sd, quantize):
        w = sd[f"{layer}.weight"].float()
        scale = w.abs().amax() / 448.0
        out[f"{layer}.weight"] = (w / scale).to(torch.float8_e4m3fn)
        out[f"{layer}.weight_scale"] = scale.reshape(())
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, None


def blockwise(sd, quantize, block=64):
    """convert_to_quant int8_blockwise: [N/bs, K/bs] scales (not readable by this pack)."""
    out = dict(sd)
    for layer in _linear_layers(sd, quantize):
        w = sd[f"{layer}.weight"].float()
        n, k = w.shape
        out[f"{layer}.weight"] = torch.zeros(n, k, dtype=torch.int8)
        out[f"{layer}.weight_scale"] = torch.ones(n // block, k // block)
        out[f"{layer}.comfy_quant"] = _conf({"format": "int8_blockwise", "group_size": block})
    return out, None


# Every INT8 format: name -> writer(sd, quantize) -> (state dict, header metadata). Both the unit tier
# (formats.normalize) and the integration tier (files through ComfyUI) run all of them.
INT8_WRITERS: dict[str, Callable] = {
    "native": lambda sd, quantize: native(sd, quantize),
    "native-header-only": lambda sd, quantize: native(sd, quantize, header_only=True),
    "native-per-layer-only": lambda sd, quantize: native(sd, quantize, per_layer_only=True),
    "native-per-tensor": lambda sd, quantize: native(sd, quantize, per_row=False),
    "native-convrot": lambda sd, quantize: native(sd, quantize, convrot=256),
    "modelopt": lambda sd, quantize: modelopt(sd, quantize),
    "modelopt-smoothquant": lambda sd, quantize: modelopt_smoothquant(sd, quantize),
    "int8-fast-quarot": lambda sd, quantize: int8_fast(sd, quantize),
    "int8-fast-convrot": lambda sd, quantize: int8_fast(sd, quantize, style="convrot"),
    "1d-fp16-scales": lambda sd, quantize: one_d_scales(sd, quantize),
    "legacy-scale-names": lambda sd, quantize: legacy_names(sd, quantize),
}
