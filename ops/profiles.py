"""Model profiles: which architecture a state dict is, and which of its Linear layers stay in
high precision when a float model is converted to INT8.

One table, data only. A profile is detected by the presence of all its ``detect`` keys (after the
file's prefix is stripped). ``keep`` lists module-path patterns matched on whole dotted components:
``"final_layer"`` matches ``final_layer.linear`` and ``final_layer.adaLN_modulation.1`` but not
``final_layer_norm``; a pattern with dots (``"time_text_embed.timestep_embedder"``) must match a
contiguous run of components. Layers kept in high precision are embedders (tiny M x K products,
sensitive inputs), modulation/normalization projections that feed every block, and output heads.
``optional`` names the patterns of ``keep`` that a load may convert on request (``with_optional``; the
loaders' ``quantize_extra_blocks``): whole transformer blocks that community INT8 files keep in high
precision but that run at the main blocks' widths, so converting them is a speed/accuracy choice, not a rule.

Sources for the lists: ComfyUI-INT8-Fast's per-model exclusions and convert_to_quant's presets
(../shared/research/anchors.md sections 1.4 and 3.5), checked against ComfyUI's model classes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from .formats import Int8FormatError


@dataclass(frozen=True)
class ModelProfile:
    """An architecture: how to recognize its state dict and which layers stay in high precision."""

    name: str
    title: str
    detect: tuple[str, ...]
    keep: tuple[str, ...]
    optional: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        extra = [p for p in self.optional if p not in self.keep]
        if extra:
            raise ValueError(f"profile {self.name}: optional patterns {extra} are not in keep")

    def with_optional(self) -> ModelProfile:
        """This profile with its ``optional`` layers converted too (same name: the architecture is the same)."""
        return replace(self, keep=tuple(p for p in self.keep if p not in self.optional), optional=())

    def matches(self, keys: Iterable[str]) -> bool:
        keyset = keys if isinstance(keys, (set, frozenset, dict)) else set(keys)
        return all(k in keyset for k in self.detect)

    def keeps(self, module_path: str) -> bool:
        """True when the layer at ``module_path`` (``a.b.c``, no ``.weight``) stays in high precision."""
        parts = module_path.split(".")
        for pattern in self.keep:
            pat = pattern.split(".")
            n = len(pat)
            if any(parts[i:i + n] == pat for i in range(len(parts) - n + 1)):
                return True
        return False


# Order matters where key sets overlap: Chroma is Flux-shaped, so it is tested before FLUX.2 etc.
PROFILES: tuple[ModelProfile, ...] = (
    ModelProfile(
        "chroma", "Chroma (and Chroma Radiance)",
        detect=("distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight"),
        keep=("distilled_guidance_layer", "final_layer", "img_in", "txt_in", "nerf_image_embedder",
              "nerf_blocks", "nerf_final_layer_conv", "__x0__"),
    ),
    ModelProfile(
        "flux2", "FLUX.2 (klein 4B/9B, base and distilled; dev)",
        detect=("double_stream_modulation_img.lin.weight", "double_blocks.0.img_attn.qkv.weight"),
        keep=("img_in", "time_in", "guidance_in", "txt_in", "final_layer", "double_stream_modulation_img",
              "double_stream_modulation_txt", "single_stream_modulation"),
    ),
    ModelProfile(
        "z-image", "Z-Image (Lumina 2 architecture)",
        detect=("cap_embedder.1.weight", "noise_refiner.0.attention.qkv.weight", "layers.0.attention.qkv.weight"),
        keep=("cap_embedder", "t_embedder", "x_embedder", "final_layer", "noise_refiner", "context_refiner",
              "adaLN_modulation"),
        # the two noise refiners run at the main layers' widths on the image tokens (fused like them once INT8),
        # the context refiners on the caption tokens; ComfyUI's FP8 fast quantizes both
        optional=("noise_refiner", "context_refiner"),
    ),
    ModelProfile(
        "qwen-image", "Qwen-Image (and Edit)",
        detect=("txt_norm.weight", "img_in.weight", "transformer_blocks.0.attn.to_q.weight"),
        keep=("time_text_embed", "img_in", "txt_in", "norm_out", "proj_out"),
    ),
    ModelProfile(
        "wan", "Wan 2.1 / 2.2",
        detect=("head.modulation", "blocks.0.self_attn.q.weight"),
        keep=("patch_embedding", "text_embedding", "time_embedding", "time_projection", "head", "img_emb"),
    ),
)

BY_NAME = {p.name: p for p in PROFILES}
AUTO = "auto"
CHOICES = (AUTO, *BY_NAME)


def detect(keys: Iterable[str]) -> ModelProfile | None:
    """The first profile whose detection keys are all present, or None."""
    keyset = set(keys)
    for profile in PROFILES:
        if profile.matches(keyset):
            return profile
    return None


def resolve(choice: str, keys: Iterable[str], source: str = "the model") -> ModelProfile:
    """The profile for ``choice`` ("auto" or a name), checked against the keys of ``source``.

    Raises ``Int8FormatError`` (a ValueError: the file, what is wrong, what to do) when auto-detection fails or
    when the keys show another architecture than the one chosen, and ValueError when the name is unknown.
    """
    keyset = set(keys)
    found = detect(keyset)
    if choice == AUTO:
        if found is None:
            raise Int8FormatError(
                f"{source}: could not detect the model architecture from its keys; supported: "
                f"{', '.join(p.name for p in PROFILES)}. If it is one of them under other key names, "
                "load it with the matching profile selected; otherwise it is not supported yet."
            )
        return found
    if choice not in BY_NAME:
        raise ValueError(f"model profile: unknown {choice!r}; choose one of {', '.join(CHOICES)}")
    chosen = BY_NAME[choice]
    if found is not None and found is not chosen:
        raise Int8FormatError(
            f"{source}: is a {found.title} model, but the profile {chosen.name!r} was selected; "
            f"select {found.name!r} or 'auto'"
        )
    if found is None:
        missing = [k for k in chosen.detect if k not in keyset]
        raise Int8FormatError(
            f"{source}: does not look like {chosen.title} (missing {', '.join(missing[:3])}); "
            "check that the file is a diffusion model of that architecture"
        )
    return chosen
