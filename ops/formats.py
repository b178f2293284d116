"""Readers for every INT8 checkpoint format in the wild, normalized into one representation.

``normalize(sd, metadata, source)`` takes a state dict as read from a file (plus its safetensors
header metadata) and returns the diffusion model's state dict in ComfyUI's native form, whatever the
file's format was:

* quantized layers: ``<layer>.weight`` int8 ``[N, K]``, ``<layer>.weight_scale`` float32 ``[N, 1]``
  (per-row) or ``[]`` (per-tensor), ``<layer>.comfy_quant`` = uint8 JSON
  ``{"format": "int8_tensorwise"[, "convrot": true, "convrot_groupsize": G]}``;
* FP8 layers (to be converted): ``<layer>.weight`` float8, ``<layer>.weight_scale`` float32 ``[]``,
  ``comfy_quant`` ``{"format": "float8_e4m3fn" | "float8_e5m2"}``;
* everything else unchanged (float weights, biases, norms, parameters).

Formats read (see ../shared/research/anchors.md section 4):
native ``int8_tensorwise`` (per-layer ``comfy_quant`` tensors or the ``_quantization_metadata``
header; scalar or ``[N, 1]`` scales; ConvRot), ComfyUI-INT8-Fast (no ``format`` key, ``quarot``/
``convrot`` keys, ``model.`` prefix), NVIDIA ModelOpt / vistralis (``weight_scale [N, 1]`` plus a
static ``input_scale``, which is dropped: activations are quantized per token), 1-D ``[N]`` scales
(also float16, e.g. torchao W8A16 exports), legacy ``scale_weight`` names, convert_to_quant output,
FP8 scaled files. Rejected with the layer and the format named: blockwise INT8 scales, QuIP files,
NVFP4/MXFP8, unknown ``format`` strings, int8 weights without a scale, scales of other shapes or with
non-finite or non-positive values.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

INT8_FORMAT = "int8_tensorwise"
FP8_FORMATS = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}
ROTATION_GROUPS = (64, 128, 256)
# Prefixes under which files store the diffusion model (checkpoints, ComfyUI saves, INT8-Fast saves).
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.model.", "model.")
# Sidecar keys of a weight (suffixes after the layer name) consumed by the readers.
SCALE_KEYS = ("weight_scale", "scale_weight")
INPUT_SCALE_KEYS = ("input_scale", "scale_input")
QUIP_KEYS = ("hadamard_quip", "hadamard_size_in", "hadamard_size_out", "sign_row", "sign_col", "quip_s_u",
             "quip_s_v")


class Int8FormatError(ValueError):
    """A checkpoint the pack cannot load: says which file, which layer, what is wrong, what to do."""


@dataclass
class FormatReport:
    """What ``normalize`` found: layer counts per source format, the prefix removed, dropped keys."""

    source: str
    prefix: str = ""
    layers: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> int:
        return sum(v for k, v in self.layers.items() if k.startswith("int8"))

    def summary(self) -> str:
        parts = [f"{n} {kind}" for kind, n in sorted(self.layers.items())]
        text = f"{self.source}: " + ", ".join(parts)
        if self.prefix:
            text += f" (prefix '{self.prefix}' removed)"
        if self.dropped:
            text += "; ignored " + ", ".join(f"{n} {k}" for k, n in sorted(self.dropped.items()))
        return text


def _fail(source: str, layer: str, what: str, fix: str) -> Int8FormatError:
    return Int8FormatError(f"{source}: layer '{layer}': {what}. {fix}")


def _quant_conf(raw) -> dict | None:
    if raw is None:
        return None
    if isinstance(raw, torch.Tensor):
        raw = bytes(raw.to(torch.uint8).cpu().numpy().tobytes()).decode("utf-8")
    conf = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(conf, dict):
        raise ValueError(f"comfy_quant is not a JSON object: {conf!r}")
    params = conf.get("params")
    if isinstance(params, dict):  # ComfyUI also reads these keys nested under "params"
        conf = {**params, **conf}
    return conf


def _strip_prefix(sd: dict) -> tuple[dict, str]:
    keys = list(sd)
    for prefix in PREFIXES:
        hits = [k for k in keys if k.startswith(prefix)]
        # a checkpoint keeps the diffusion model under one prefix beside VAE / text encoder keys
        if hits and (prefix.startswith(("model.diffusion_model.", "diffusion_model.")) or len(hits) == len(keys)):
            return {k[len(prefix):]: sd[k] for k in hits}, prefix
    return dict(sd), ""


def _header_layers(metadata: dict | None, prefix: str) -> dict[str, dict]:
    if not metadata or "_quantization_metadata" not in metadata:
        return {}
    try:
        layers = json.loads(metadata["_quantization_metadata"]).get("layers", {})
    except (json.JSONDecodeError, AttributeError) as exc:
        raise Int8FormatError(f"the _quantization_metadata header is not valid JSON ({exc})") from exc
    out = {}
    for name, conf in layers.items():
        if prefix and name.startswith(prefix):
            name = name[len(prefix):]
        out[name] = conf
    return out


def _normalize_scale(scale: torch.Tensor, n: int, source: str, layer: str) -> torch.Tensor:
    """[] / [1] / [1, 1] -> [] and [N] / [N, 1] -> [N, 1], float32; anything else is an error."""
    if not scale.is_floating_point():
        raise _fail(source, layer, f"weight scale has dtype {scale.dtype}", "expected a float scale tensor")
    shape = tuple(scale.shape)
    if scale.numel() == 1 and len(shape) <= 2:
        out = scale.reshape(())
    elif shape in ((n,), (n, 1)):
        out = scale.reshape(n, 1)
    elif len(shape) == 2 and shape[1] > 1:
        raise _fail(source, layer, f"weight scale of shape {list(shape)} is a blockwise scale (int8_blockwise)",
                    "blockwise INT8 is not supported; use a per-row or per-tensor INT8 file, or the BF16 model")
    else:
        raise _fail(source, layer, f"weight scale has shape {list(shape)}",
                    f"expected [] (per-tensor), [{n}] or [{n}, 1] (per-row); the file does not match its weights")
    out = out.to(torch.float32)
    bad = ~(torch.isfinite(out) & (out > 0))
    if bool(bad.any()):
        raise _fail(source, layer, f"weight scale has {int(bad.sum())} non-finite or non-positive value(s)",
                    "the file is corrupt; download or convert it again")
    return out


def _rotation(conf: dict | None, source: str, layer: str, k: int) -> int:
    if not conf:
        return 0
    if conf.get("convrot"):
        group = int(conf.get("convrot_groupsize", 256))
    elif conf.get("quarot"):  # ComfyUI-INT8-Fast's name for the same rotation
        group = int(conf.get("quarot_groupsize", 256))
    else:
        return 0
    if group not in ROTATION_GROUPS or k % group:
        raise _fail(source, layer, f"ConvRot group {group} with {k} input features",
                    f"supported groups are {ROTATION_GROUPS} dividing the input width")
    return group


def _conf_tensor(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def normalize(sd: dict, metadata: dict | None = None, source: str = "model") -> tuple[dict, FormatReport]:
    """Normalize a diffusion-model state dict of any supported INT8 format (see module docstring).

    Tensors are not copied (int8 data and float weights pass through as they are); only scales are
    converted. Raises Int8FormatError before anything is built when any layer cannot be read.
    """
    sd, prefix = _strip_prefix(sd)
    report = FormatReport(source=source, prefix=prefix)
    header = _header_layers(metadata, prefix)
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()

    for key in sorted(k for k in sd if k.endswith(".weight")):
        layer = key[: -len(".weight")]
        w = sd[key]
        conf_raw = sd.get(f"{layer}.comfy_quant")
        try:
            conf = _quant_conf(conf_raw) if conf_raw is not None else _quant_conf(header.get(layer))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _fail(source, layer, f"comfy_quant metadata is unreadable ({exc})", "the file is corrupt") from exc
        scale_key = next((f"{layer}.{s}" for s in SCALE_KEYS if f"{layer}.{s}" in sd), None)
        consumed.update({f"{layer}.comfy_quant", *(f"{layer}.{s}" for s in SCALE_KEYS)})
        for name in INPUT_SCALE_KEYS:
            if f"{layer}.{name}" in sd:
                consumed.add(f"{layer}.{name}")
                report.dropped["static input scales (activations are quantized per token)"] += 1
        fmt = conf.get("format") if conf else None
        quip = [q for q in QUIP_KEYS if f"{layer}.{q}" in sd]
        if quip:
            raise _fail(source, layer, f"QuIP-quantized weights ({', '.join(quip)})",
                        "QuIP files store weights in a rotated basis this pack cannot read; use an INT8 "
                        "tensorwise/ConvRot file or the BF16 model")
        if fmt not in (None, INT8_FORMAT, *FP8_FORMATS.values()):
            what = {"int8_blockwise": "blockwise INT8 (int8_blockwise)", "nvfp4": "NVFP4", "mxfp8": "MXFP8"}.get(
                fmt, f"unknown quantization format '{fmt}'")
            raise _fail(source, layer, what, "load it with ComfyUI's stock loader, or use an INT8 tensorwise/"
                        "ConvRot file or the BF16 model")

        if w.dtype == torch.int8:
            if w.dim() != 2:
                raise _fail(source, layer, f"int8 weight of shape {list(w.shape)}", "only Linear weights [N, K]")
            if scale_key is None:
                raise _fail(source, layer, "int8 weight without a scale (no weight_scale)",
                            "the file is incomplete or not an INT8 checkpoint; download or convert it again")
            n, k = w.shape
            scale = _normalize_scale(sd[scale_key], n, source, layer)
            group = _rotation(conf, source, layer, k)
            kind = ("int8 native" if fmt == INT8_FORMAT else
                    "int8 INT8-Fast" if conf else "int8 without format metadata (ModelOpt and others)")
            if group:
                kind += f" ConvRot-{group}"
            report.layers[kind] += 1
            qconf = {"format": INT8_FORMAT}
            if group:
                qconf.update(convrot=True, convrot_groupsize=group)
            out[key], out[f"{layer}.weight_scale"], out[f"{layer}.comfy_quant"] = w, scale, _conf_tensor(qconf)
        elif w.dtype in FP8_FORMATS:
            scale = sd[scale_key] if scale_key is not None else torch.ones(())
            if scale.numel() != 1:
                raise _fail(source, layer, f"FP8 weight with a scale of shape {list(scale.shape)}",
                            "only per-tensor scaled FP8 can be converted; use the BF16 model")
            report.layers["fp8 scaled (converted)"] += 1
            out[key], out[f"{layer}.weight_scale"] = w, scale.reshape(()).to(torch.float32)
            out[f"{layer}.comfy_quant"] = _conf_tensor({"format": FP8_FORMATS[w.dtype]})
        elif fmt == INT8_FORMAT or (scale_key is not None and not w.is_floating_point()):
            raise _fail(source, layer, f"marked {fmt or 'quantized'} but its weight has dtype {w.dtype}",
                        "the file is corrupt or of a format this pack does not read")
        else:
            if w.is_floating_point() and w.dim() == 2:
                report.layers["float"] += 1
            out[key] = w
            if scale_key is not None:  # a float weight with a scale beside it: apply it (scaled fp16/bf16 dumps)
                out[key] = w.float() * _normalize_scale(sd[scale_key], w.shape[0], source, layer).to(w.device)

    for key, value in sd.items():
        if key in out or key in consumed or key.endswith(".weight"):
            continue
        if key == "scaled_fp8" or key.endswith(".comfy_quant"):
            report.dropped["quantization markers"] += 1
            continue
        out[key] = value
    logger.info("int8_w8a8: %s", report.summary())
    return out, report
