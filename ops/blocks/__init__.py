"""Fused transformer blocks, one module per architecture, chosen by the ComfyUI model class (ComfyUI glue).

``install(patcher)`` registers the fused blocks of the patcher's diffusion model when its class is in
``ARCHITECTURES`` (exact class, matched by module path and name so that no architecture's ComfyUI module is
imported before a model of it is loaded) and returns how many blocks it registered; other models get none.
Every module builds its blocks from the same ``kernels.fused`` kernels and shares the fallback rules and
helpers of ``common``:

- ``flux``: the double/single stream blocks of ComfyUI's Flux (FLUX.1, FLUX.2), Chroma and Chroma Radiance;
- ``qwen_image``: Qwen-Image's joint transformer blocks;
- ``zimage``: the main layers of Z-Image (and Lumina 2), through per-clone object patches (no block hook);
- ``wan``: Wan 2.1 / 2.2 attention blocks (self-attention and feed-forward fused, ComfyUI's cross-attention).

Their attention is ComfyUI's or the pack's 8-bit attention, by the load's choice (``attention_choice``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """An architecture with fused blocks: the ComfyUI diffusion-model classes it covers (``module.Class``) and
    the module of this package whose ``install(patcher) -> int`` registers them."""

    name: str
    models: tuple[str, ...]
    module: str


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("flux", ("comfy.ldm.flux.model.Flux", "comfy.ldm.chroma.model.Chroma",
                          "comfy.ldm.chroma_radiance.model.ChromaRadiance"), "flux"),
    Architecture("qwen-image", ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",), "qwen_image"),
    Architecture("z-image", ("comfy.ldm.lumina.model.NextDiT",), "zimage"),
    Architecture("wan", ("comfy.ldm.wan.model.WanModel",), "wan"),
)


def architecture_of(model) -> Architecture | None:
    """The entry of ``ARCHITECTURES`` covering ``model`` (a ComfyUI diffusion model), or None."""
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    return next((a for a in ARCHITECTURES if name in a.models), None)


def install(patcher, attention: str = "auto") -> int:
    """Register the fused blocks of ``patcher``'s diffusion model (a ComfyUI ModelPatcher); returns how many.

    Blocks already replaced by another node are left alone; models of other classes get none. ``attention``
    (``ops.config.ATTENTION_CHOICES``) is the fused blocks' attention, recorded in the patcher's transformer
    options (``attention_choice``: per clone, read by every block call)."""
    arch = architecture_of(patcher.model.diffusion_model)
    if arch is None:
        return 0
    from . import attention_choice  # imports ComfyUI, as the architecture modules do

    attention_choice.set_choice(patcher, attention)
    return importlib.import_module(f"{__name__}.{arch.module}").install(patcher)
