"""Loading and converting INT8 diffusion models through ComfyUI's own loader (ComfyUI glue).

``load_file``      a diffusion-model file of any supported format -> ModelPatcher on Int8Linear layers
``quantize_model`` a MODEL from any loader (e.g. stock BF16) -> a clone whose Linear weights are INT8
``save_model``     (saving.py, re-exported here) a MODEL -> a ComfyUI-native int8_tensorwise file

All three fail before anything is built or written when the input cannot be used, with the file,
the layer and what to do in the message; nothing half-loaded is returned.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.model_management
import comfy.sd
import comfy.utils
import torch

from . import blocks, formats, layout, profiles, saving
from .comfy_ops import default_compute_device, make_operations
from .config import ATTENTION_CHOICES, ConvertOptions, LoadConfig, WeightPrep

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    """What the loader node asks for: a profile name ("auto" or one of profiles.CHOICES) and how to convert.

    prepare: an optional factory, called with the normalized state dict, of the ``WeightPrep`` that
    changes float weights before their first quantization (``lora.preload`` builds one from a LoRA stack).
    quant_in_graph, traced_weights: see ``LoadConfig``.
    fused_blocks: run transformer blocks whose linears are INT8 on the fused kernels, eager and compiled
    (``blocks``, per architecture; other models and unsupported calls use ComfyUI's blocks).
    attention: the fused blocks' attention, one of ``ATTENTION_CHOICES``: "auto" (8-bit only where measured
    faster on the GPU generation and within the accuracy bound), "bf16" (ComfyUI's attention), "8-bit"
    (``blocks.attention_choice`` has the rules). Blocks that run ComfyUI's code keep ComfyUI's attention.
    quantize_extra_blocks: also convert the layers the profile keeps only by convention
    (``ModelProfile.optional``: Z-Image's refiners), for speed; no effect on pre-quantized files, which decide
    their layers themselves (the loader nodes' ``quantize_extra_blocks`` input).
    notify: called with what the load did, in words (``describe``), e.g. to show it on the node.
    """

    profile: str = profiles.AUTO
    convert: ConvertOptions = field(default_factory=ConvertOptions)
    prepare: Callable[[dict], WeightPrep] | None = None
    quant_in_graph: bool = False
    traced_weights: bool = True
    fused_blocks: bool = True
    attention: str = "auto"
    quantize_extra_blocks: bool = False
    notify: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention: expected one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")


def read_file(path: str) -> tuple[dict, dict | None]:
    """The state dict and safetensors header of ``path``, with a readable error for broken files."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return comfy.utils.load_torch_file(path, return_metadata=True)
    except Exception as exc:  # safetensors raises its own error types; all mean "unreadable"
        raise formats.Int8FormatError(
            f"{name}: cannot be read ({type(exc).__name__}: {exc}). The file is truncated or is not a "
            "safetensors/PyTorch checkpoint; download or copy it again."
        ) from exc


def _linear_weights(sd: dict) -> list[str]:
    return [k[:-7] for k, v in sd.items() if k.endswith(".weight") and isinstance(v, torch.Tensor) and v.dim() == 2]


def _plan(nsd: dict, report: formats.FormatReport, options: LoadOptions, source: str):
    """The profile to convert with (None for pre-quantized sources), how many layers it converts and the
    dtypes of the 2-D float weights it keeps (name -> count)."""
    keys = set(nsd)
    floats = [k for k in _linear_weights(nsd) if nsd[f"{k}.weight"].is_floating_point()]
    if report.quantized:
        # A pre-quantized file decides itself which layers are INT8; its float layers stay float.
        if options.profile != profiles.AUTO:
            profiles.resolve(options.profile, keys, source)  # still refuse the wrong architecture
        return None, 0, Counter(formats.dtype_name(nsd[f"{k}.weight"].dtype) for k in floats)
    profile = profiles.resolve(options.profile, keys, source)
    if options.quantize_extra_blocks:
        profile = profile.with_optional()
    todo = [k for k in floats if not profile.keeps(k)]
    fp8 = [k[:-12] for k in nsd if k.endswith(".comfy_quant")]
    kept = Counter(formats.dtype_name(nsd[f"{k}.weight"].dtype) for k in floats if profile.keeps(k))
    return profile, len(todo) + len([k for k in fp8 if not profile.keeps(k)]), kept


def _dtype_counts(counts: Counter) -> str:
    return " and ".join(f"{n} in {dtype}" for dtype, n in sorted(counts.items()))


def held_dtypes(diffusion_model: torch.nn.Module) -> Counter:
    """The dtypes (``formats.dtype_name``) of the 2-D float weights a built model holds outside its INT8 layers:
    what ComfyUI cast the layers kept in high precision to (its weight dtype for the model on this device)."""
    return Counter(formats.dtype_name(w.dtype) for m in diffusion_model.modules()
                   if isinstance(w := getattr(m, "weight", None), torch.Tensor) and w.dim() == 2
                   and w.is_floating_point() and not layout.is_int8_weight(w))


def describe(report: formats.FormatReport, profile, converted: int, kept: Counter, options: LoadOptions,
             n_int8: int, held: Counter | None = None) -> str:
    """What a load did, in words: the source, its INT8 layers as stored, converted and kept (for the log and
    the loader node). ``kept``: the source's dtypes of the layers kept in high precision; ``held``: the dtypes the
    built model holds them in (``held_dtypes``), said when ComfyUI cast them (float32 on the CPU, float16 for Wan
    on NVIDIA GPUs), so the text does not read as if they ran in the file's dtype."""
    kept_text = _dtype_counts(kept) or "none"
    if held and kept and set(held) != set(kept):
        only = next(iter(held)) if len(held) == 1 else None
        kept_text += (f", held in {only}" if only else f", held as {_dtype_counts(held)}") + (
            " (ComfyUI's weight dtype for this model on this device)")
    if profile is None:
        text = (f"{report.source}: {report.quantized} layers INT8 as stored ({'; '.join(sorted(report.int8))}); "
                f"layers kept in high precision as the file has them: {kept_text}")
    else:
        opts = options.convert
        how = ("per-row" if opts.per_row else "per-tensor") + " scales, " + (
            f"ConvRot-{opts.rotate_group}" if opts.rotate_group else "no ConvRot")
        origin = ", ".join([f"{n} {dtype}" for dtype, n in sorted(report.floating.items())]
                           + [f"{n} FP8-scaled ({fmt})" for fmt, n in sorted(report.fp8.items())])
        text = (f"{report.source} ({origin} weights): {converted} layers converted to INT8 ({how}); kept in high "
                f"precision (the {profile.name} profile keeps embedders, modulation and output layers unquantized): "
                f"{kept_text}")
        extra = ", ".join(profiles.BY_NAME[profile.name].optional)
        if extra and options.quantize_extra_blocks:
            text += f"; {extra} converted too (quantize_extra_blocks)"
        elif extra:
            text += f"; {extra} kept in high precision (quantize_extra_blocks converts them)"
    if n_int8 != report.quantized + converted:
        text += f"; {n_int8} INT8 layers in the model"
    if report.prefix:
        text += f"; key prefix '{report.prefix}' removed"
    if report.dropped:
        text += "; ignored " + ", ".join(f"{n} {k}" for k, n in sorted(report.dropped.items()))
    return text


def build(nsd: dict, report: formats.FormatReport, options: LoadOptions, source: str,
          model_options: dict | None = None, disable_dynamic: bool = False):
    """Build a ModelPatcher from a normalized state dict (formats.normalize) with Int8Linear layers."""
    profile, todo, kept = _plan(nsd, report, options, source)
    prepare = options.prepare(nsd) if options.prepare is not None else None  # fails before anything is built
    pbar = comfy.utils.ProgressBar(todo) if todo else None
    config = LoadConfig(
        profile=profile, convert=options.convert, source=source, compute_device=default_compute_device(),
        progress=(lambda layer: pbar.update(1)) if pbar is not None else None, prepare=prepare,
        quant_in_graph=options.quant_in_graph, traced_weights=options.traced_weights,
    )
    dtypes = saving.source_dtypes(nsd)  # before ComfyUI's loader consumes nsd
    opts = dict(model_options or {})
    opts["custom_operations"] = make_operations(config)
    patcher = comfy.sd.load_diffusion_model_state_dict(nsd, model_options=opts, disable_dynamic=disable_dynamic)
    if patcher is None:
        raise formats.Int8FormatError(
            f"{source}: ComfyUI does not recognize this diffusion model's architecture; check that the file is a "
            "diffusion model (not a checkpoint of another kind, a LoRA or a text encoder)"
        )
    saving.remember_source_dtypes(patcher.model, dtypes)
    if prepare is not None:
        prepare.attach(patcher)
    fused = blocks.install(patcher, options.attention) if options.fused_blocks else 0
    n_int8 = sum(layout.is_int8_weight(getattr(m, "weight", None)) for m in patcher.model.diffusion_model.modules())
    text = describe(report, profile, todo, kept, options, n_int8, held_dtypes(patcher.model.diffusion_model))
    if fused:  # the choice only reaches fused blocks
        from .blocks import attention_choice  # imports ComfyUI's attention, as the blocks do

        model = patcher.model
        said = attention_choice.describe_choice(options.attention, torch.device(patcher.load_device),
                                                model.manual_cast_dtype or model.get_dtype())
        text += f"; {said}" if said else ""
    logger.info("int8_w8a8: loaded %s", text)
    if options.notify is not None:
        options.notify(text)
    return patcher


def load_file(path: str, options: LoadOptions | None = None, disable_dynamic: bool = False):
    """Load ``path`` (any supported format) as a ModelPatcher whose Linear layers run on the pack's kernels."""
    options = options or LoadOptions()
    source = os.path.basename(path)
    sd, metadata = read_file(path)
    nsd, report = formats.normalize(sd, metadata, source)
    patcher = build(nsd, report, options, source, disable_dynamic=disable_dynamic)
    # TorchCompileModel (and multi-GPU clones) rebuild the model through this
    patcher.cached_patcher_init = (load_file, (path, options))
    return patcher


def quantize_model(model, options: LoadOptions | None = None, disable_dynamic: bool = False):
    """A clone of ``model`` (a ModelPatcher) whose Linear weights are INT8.

    The clone keeps the model's patches (LoRAs), object patches and options; its weights are built
    from the model's current (unpatched) weights, converted layer by layer.
    """
    options = options or LoadOptions()
    source = f"the {type(model.model).__name__} input model"
    sd = model.model.diffusion_model.state_dict()
    nsd, report = formats.normalize(sd, None, source)
    if report.quantized and not report.floating:
        logger.info("int8_w8a8: %s is already INT8; returning it unchanged", source)
        return model.clone()
    # a partly quantized input: build from its float layers (the INT8 ones pass through)
    built = build(nsd, report, options, source, model_options={"dtype": model.model.get_dtype()},
                  disable_dynamic=disable_dynamic or not model.is_dynamic())
    clone = model.clone(model_override=built.get_clone_model_override())
    clone.size = 0  # recomputed from the INT8 weights
    if options.fused_blocks:
        blocks.install(clone, options.attention)
    clone.cached_patcher_init = (_quantize_again, (model, options))
    return clone


def _quantize_again(model, options: LoadOptions, disable_dynamic: bool = False):
    return quantize_model(model, options, disable_dynamic=disable_dynamic)


# Saving lives in saving.py; the names stay importable from here for the benchmarks.
native_state_dict = saving.native_state_dict
save_model = saving.save_model
