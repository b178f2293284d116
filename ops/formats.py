"""Readers for every INT8 checkpoint format in the wild, normalized into one representation.

``normalize(sd, metadata, source)`` takes a state dict as read from a file (plus its safetensors
header metadata) and returns the diffusion model's state dict in ComfyUI's native form, whatever the
file's format was:

* quantized layers: ``<layer>.weight`` int8 ``[N, K]``, ``<layer>.weight_scale`` float32 ``[N, 1]``
  (per-row) or ``[]`` (per-tensor), ``<layer>.comfy_quant`` = uint8 JSON
  ``{"format": "int8_tensorwise"[, "convrot": true, "convrot_groupsize": G]}``, and for SmoothQuant
  layers ``<layer>.smooth`` float32 ``[K]`` (the weight is stored as ``W * smooth`` per input channel,
  activations are divided by it; ModelOpt stores its reciprocal as ``pre_quant_scale``);
* FP8 layers (to be converted): ``<layer>.weight`` float8, ``<layer>.weight_scale`` float32 ``[]``,
  ``comfy_quant`` ``{"format": "float8_e4m3fn" | "float8_e5m2"}``;
* everything else unchanged (float weights, biases, norms, parameters).

Formats read (see ../shared/research/anchors.md section 4):
native ``int8_tensorwise`` (per-layer ``comfy_quant`` tensors or the ``_quantization_metadata``
header; scalar or ``[N, 1]`` scales; ConvRot), ComfyUI-INT8-Fast (no ``format`` key, ``quarot``/
``convrot`` keys, ``model.`` prefix), NVIDIA ModelOpt / vistralis (``weight_scale [N, 1]`` plus a
static ``input_scale``, which is dropped: activations are quantized per token; SmoothQuant's
``pre_quant_scale``), 1-D ``[N]`` scales (also float16, e.g. torchao W8A16 exports), legacy
``scale_weight`` names, convert_to_quant output, FP8 scaled files. Rejected with the layer and the
format named: blockwise INT8 scales, QuIP files, NVFP4/MXFP8, unknown ``format`` strings, int8
weights without a scale, scales of other shapes or with non-finite or non-positive values, and any
other key beside a quantized layer's weight that no reader here consumes (zero points, second-level
scales, ...): ComfyUI would drop it, and the layer would compute with the wrong weights.
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
SMOOTH_KEYS = ("pre_quant_scale",)  # ModelOpt SmoothQuant: activations are multiplied by it before quantizing
QUIP_KEYS = ("hadamard_quip", "hadamard_size_in", "hadamard_size_out", "sign_row", "sign_col", "quip_s_u",
             "quip_s_v")
# Every key a quantized layer may carry beside its weight; any other one is an error (see normalize).
LAYER_KEYS = frozenset(("weight", "bias", "comfy_quant", *SCALE_KEYS, *INPUT_SCALE_KEYS, *SMOOTH_KEYS))
SMOOTH = "smooth"  # the normalized name of the smoothing vector: <layer>.smooth, float32 [K]
DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "FP16", torch.float32: "FP32", torch.float64: "FP64"}


class Int8FormatError(ValueError):
    """A checkpoint the pack cannot load: says which file, which layer, what is wrong, what to do."""

    __module__ = "int8_w8a8"  # what ComfyUI shows as the error's type (not the install path)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _count(counter: Counter) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counter.items()))


@dataclass
class FormatReport:
    """What ``normalize`` found, per kind of layer weight.

    int8: INT8 layers as stored, by how the file stores them ("ComfyUI native int8_tensorwise, ConvRot-256");
    fp8: FP8 scaled layers (converted on load), by FP8 format; floating: 2-D float weights by dtype ("BF16");
    prefix: the key prefix removed; dropped: keys read but not used, by kind.
    """

    source: str
    prefix: str = ""
    int8: Counter = field(default_factory=Counter)
    fp8: Counter = field(default_factory=Counter)
    floating: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)

    @property
    def quantized(self) -> int:
        """INT8 layers as stored."""
        return sum(self.int8.values())

    def summary(self) -> str:
        """What the file holds, in words, e.g. ``klein.safetensors: 10 INT8 layers (ComfyUI native
        int8_tensorwise), 9 BF16 weights``."""
        parts = []
        if self.int8:
            parts.append(f"{self.quantized} INT8 layers ({'; '.join(sorted(self.int8))})")
        if self.fp8:
            parts.append(f"{sum(self.fp8.values())} FP8 scaled layers ({', '.join(sorted(self.fp8))})")
        if self.floating:
            parts.append(f"{_count(self.floating)} weights")
        text = f"{self.source}: " + (", ".join(parts) or "no 2-D weights")
        if self.prefix:
            text += f" (key prefix '{self.prefix}' removed)"
        if self.dropped:
            text += "; ignored " + _count(self.dropped)
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


def _normalize_smooth(pre_quant_scale: torch.Tensor, k: int, source: str, layer: str) -> torch.Tensor:
    """ModelOpt's ``pre_quant_scale`` ([K] or [1, K], activations are multiplied by it) -> the layout's ``smooth``
    (float32 [K], activations are divided by it): its reciprocal."""
    v = pre_quant_scale
    if not v.is_floating_point() or v.numel() != k or (v.dim() == 2 and v.shape[0] != 1) or v.dim() > 2:
        raise _fail(source, layer, f"SmoothQuant pre_quant_scale of shape {list(v.shape)} and dtype {v.dtype}",
                    f"expected a float vector of {k} values (one per input channel); the file does not match "
                    "its weights")
    v = v.reshape(k).to(torch.float32)
    bad = ~(torch.isfinite(v) & (v > 0))
    if bool(bad.any()):
        raise _fail(source, layer, f"SmoothQuant pre_quant_scale has {int(bad.sum())} non-finite or non-positive "
                    "value(s)", "the file is corrupt; download or convert it again")
    return 1.0 / v


def _int8_kind(fmt: str | None, conf: dict | None, per_row: bool, group: int, smooth: bool) -> str:
    """How a file stores an INT8 layer, in words (the load report)."""
    kind = ("ComfyUI native int8_tensorwise" if fmt == INT8_FORMAT else
            "ComfyUI-INT8-Fast" if conf else "no format metadata (ModelOpt and others)")
    kind += ", per-row scales" if per_row else ", per-tensor scales"
    if group:
        kind += f", ConvRot-{group}"
    if smooth:
        kind += ", SmoothQuant"
    return kind


def _sidecars(sd: dict) -> dict[str, set[str]]:
    """Module path -> the rest of every key under it (``a.b.weight_scale`` -> ``{"a": {"b.weight_scale"},
    "a.b": {"weight_scale"}}``): a Linear layer has no submodules, so everything under it belongs to its weight."""
    out: dict[str, set[str]] = {}
    for key in sd:
        parts = key.split(".")
        for i in range(1, len(parts)):
            out.setdefault(".".join(parts[:i]), set()).add(".".join(parts[i:]))
    return out


def _check_sidecars(names: set[str], source: str, layer: str) -> None:
    """A key beside a quantized weight that no reader consumes would be dropped silently (ComfyUI drops keys it
    does not know), and the layer would compute something else than the file means: refuse it."""
    unknown = sorted(names - LAYER_KEYS - set(QUIP_KEYS))
    if unknown:
        keys = ", ".join(f"'{layer}.{n}'" for n in unknown)
        raise _fail(source, layer, f"the quantized weight comes with {keys}, which this pack does not know how to "
                    "apply", "the file uses a quantization scheme the pack does not read (zero points, second-level "
                    "or group scales, ...); loading it without that key would give wrong weights. Use an INT8 "
                    "tensorwise/ConvRot/SmoothQuant file or the BF16 model")


def normalize(sd: dict, metadata: dict | None = None, source: str = "model") -> tuple[dict, FormatReport]:
    """Normalize a diffusion-model state dict of any supported INT8 format (see module docstring).

    Tensors are not copied (int8 data and float weights pass through as they are); only scales are
    converted. Raises Int8FormatError before anything is built when any layer cannot be read.
    """
    sd, prefix = _strip_prefix(sd)
    report = FormatReport(source=source, prefix=prefix)
    header = _header_layers(metadata, prefix)
    sidecars = _sidecars(sd)
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
        smooth_key = next((f"{layer}.{s}" for s in SMOOTH_KEYS if f"{layer}.{s}" in sd), None)
        consumed.update({f"{layer}.comfy_quant", *(f"{layer}.{s}" for s in (*SCALE_KEYS, *SMOOTH_KEYS))})
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
            _check_sidecars(sidecars[layer], source, layer)
            n, k = w.shape
            scale = _normalize_scale(sd[scale_key], n, source, layer)
            group = _rotation(conf, source, layer, k)
            report.int8[_int8_kind(fmt, conf, scale.dim() == 2, group, smooth_key is not None)] += 1
            qconf = {"format": INT8_FORMAT}
            if group:
                qconf.update(convrot=True, convrot_groupsize=group)
            out[key], out[f"{layer}.weight_scale"], out[f"{layer}.comfy_quant"] = w, scale, _conf_tensor(qconf)
            if smooth_key is not None:
                out[f"{layer}.{SMOOTH}"] = _normalize_smooth(sd[smooth_key], k, source, layer)
        elif w.dtype in FP8_FORMATS:
            _check_sidecars(sidecars[layer], source, layer)
            if smooth_key is not None:
                raise _fail(source, layer, f"FP8 weight with a SmoothQuant/AWQ '{smooth_key}'",
                            "converting smoothed FP8 weights is not supported; use the BF16 model")
            scale = sd[scale_key] if scale_key is not None else torch.ones(())
            if scale.numel() != 1:
                raise _fail(source, layer, f"FP8 weight with a scale of shape {list(scale.shape)}",
                            "only per-tensor scaled FP8 can be converted; use the BF16 model")
            report.fp8[FP8_FORMATS[w.dtype]] += 1
            out[key], out[f"{layer}.weight_scale"] = w, scale.reshape(()).to(torch.float32)
            out[f"{layer}.comfy_quant"] = _conf_tensor({"format": FP8_FORMATS[w.dtype]})
        elif fmt == INT8_FORMAT or (scale_key is not None and not w.is_floating_point()):
            raise _fail(source, layer, f"marked {fmt or 'quantized'} but its weight has dtype {w.dtype}",
                        "the file is corrupt or of a format this pack does not read")
        else:
            if w.is_floating_point() and w.dim() == 2:
                report.floating[dtype_name(w.dtype)] += 1
            out[key] = w
            if scale_key is not None:  # a float weight with a scale beside it: apply it (scaled fp16/bf16 dumps)
                out[key] = w.float() * _normalize_scale(sd[scale_key], w.shape[0], source, layer).to(w.device)
            if smooth_key is not None:
                if not (w.is_floating_point() and w.dim() == 2):
                    raise _fail(source, layer, f"'{smooth_key}' beside a weight of shape {list(w.shape)} and "
                                f"dtype {w.dtype}", "only Linear weights [N, K] can be smoothed; the file is corrupt")
                # a smoothed float weight (stored as W / pre_quant_scale): fold the vector back in
                smooth = _normalize_smooth(sd[smooth_key], w.shape[1], source, layer).to(w.device)
                out[key] = (out[key].float() / smooth).to(out[key].dtype)

    for key, value in sd.items():
        if key in out or key in consumed or key.endswith(".weight"):
            continue
        if key == "scaled_fp8" or key.endswith(".comfy_quant"):
            report.dropped["quantization markers"] += 1
            continue
        out[key] = value
    logger.debug("int8_w8a8: %s", report.summary())
    return out, report
