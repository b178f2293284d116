"""Every architecture the pack supports, with random weights inside ComfyUI, for step benchmarks (GPU).

One table, ``ARCHS``: per architecture the unet config ComfyUI's model detection returns for the real
checkpoint (so the model is built by ComfyUI's own supported-model class and ``comfy.ldm`` module, at
the real widths and depths), the step's inputs (latent of one sample, text-encoder context) and, for
CPU smoke runs (``tiny=True``), config overrides at small widths. Nothing here is per-model code: a new
architecture is a new row.

Weights: a meta-device instance of the model gives names and shapes; ``flux2_model.random_weights``
fills them on the target device (N(0, 1/fan_in), norms 1, biases small). A file made from them goes
through ComfyUI's detection like a user's file; at real widths ``check_detection`` asserts that
detection builds exactly these shapes, so the table cannot drift from ComfyUI. At tiny widths detection
cannot express the config (it fixes Chroma's approximator at 3072/5120 wide, Z-Image's heads at
dim 3840 and Qwen-Image's widths), so ``detection(arch, tiny=True)`` hands ComfyUI the table's tiny
config after checking that detection recognised the same architecture. Needs COMFYUI_PATH.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from . import flux2_model


@dataclass(frozen=True)
class StepShape:
    """The inputs of one step at batch 1.

    latent: one sample's latent without the batch dim, ``[C, H, W]`` or ``[C, T, H, W]`` (video, and
        Qwen-Image, whose latent format is Wan 2.1's).
    text: (tokens, width) of the text encoder's output (``c_crossattn``).
    res: what the latent decodes to, for tables (``"1024x1024"``, ``"832x480x33"``).
    """

    latent: tuple[int, ...]
    text: tuple[int, int]
    res: str

    def scaled(self, factor: int) -> StepShape:
        """This shape with the latent's height and width ``factor`` times larger (2: 1024x1024 -> 2048x2048, Wan's
        832x480x33 -> 1664x960x33); the text stays."""
        if factor < 1:
            raise ValueError(f"StepShape.scaled: factor >= 1, got {factor}")
        if factor == 1:
            return self
        *lead, h, w = self.latent
        parts = self.res.split("x")  # width x height [x frames]; the tiny shapes' "tiny" has no sizes
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            res = "x".join([str(int(parts[0]) * factor), str(int(parts[1]) * factor), *parts[2:]])
        else:
            res = f"{self.res}*{factor}"
        return StepShape((*lead, h * factor, w * factor), self.text, res)


@dataclass(frozen=True)
class Arch:
    """One architecture: ComfyUI's unet config of the real model, its step inputs, and tiny overrides."""

    key: str
    title: str
    config: dict
    shape: StepShape
    tiny: dict = field(default_factory=dict)
    tiny_shape: StepShape = StepShape((16, 16, 16), (16, 64), "tiny")

    def unet_config(self, tiny: bool = False) -> dict:
        return {**self.config, **self.tiny} if tiny else dict(self.config)

    def step_shape(self, tiny: bool = False, scale: int = 1) -> StepShape:
        """The step's inputs (``tiny``: the small config's), the image ``scale`` times wider and taller."""
        return (self.tiny_shape if tiny else self.shape).scaled(scale)


_IMAGE = "1024x1024"
_CHROMA = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 4096,
           "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
           "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 3072,
           "hidden_dim": 5120, "n_layers": 5, "txt_ids_dims": [], "vec_in_dim": None}
_ZIMAGE = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
           "n_layers": 30, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48],
           "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
           "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}
_WAN14B = {"image_model": "wan2.1", "model_type": "t2v", "dim": 5120, "out_dim": 16, "num_heads": 40,
           "ffn_dim": 13824, "num_layers": 40, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
           "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16}
_FLUX2_TINY = flux2_model.unet_config(flux2_model.CONFIGS["tiny"])
_FLUX2_TINY_SHAPE = StepShape((128, 8, 8), (16, 64), "tiny")

ARCHS: dict[str, Arch] = {a.key: a for a in (
    Arch("klein9b", "FLUX.2 klein 9B", flux2_model.unet_config(flux2_model.CONFIGS["klein9b"]),
         StepShape((128, 64, 64), (512, 12288), _IMAGE),
         tiny=_FLUX2_TINY, tiny_shape=_FLUX2_TINY_SHAPE),
    Arch("klein4b", "FLUX.2 klein 4B", flux2_model.unet_config(flux2_model.CONFIGS["klein4b"]),
         StepShape((128, 64, 64), (512, 7680), _IMAGE),
         tiny=_FLUX2_TINY, tiny_shape=_FLUX2_TINY_SHAPE),
    # Z-Image Turbo: a Lumina 2 NextDiT, Qwen3-4B text features (2560 wide), 16-channel latent at /8
    Arch("zimage", "Z-Image Turbo", _ZIMAGE, StepShape((16, 128, 128), (512, 2560), _IMAGE),
         tiny={"dim": 256, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "cap_feat_dim": 64}),
    # Chroma1-HD: 19 double + 38 single Flux blocks, T5-XXL context, modulation from the approximator
    Arch("chroma", "Chroma1-HD", _CHROMA, StepShape((16, 128, 128), (512, 4096), _IMAGE),
         tiny={"hidden_size": 256, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "context_in_dim": 64,
               "out_dim": 256, "hidden_dim": 128, "n_layers": 2}),
    # Qwen-Image 20B: 60 MMDiT blocks 3072 wide (24 heads x 128), Qwen2.5-VL context (3584 wide); defaults of
    # the class are the real widths, detection reads only in_channels and the depth
    Arch("qwen-image", "Qwen-Image 20B", {"image_model": "qwen_image", "in_channels": 64, "num_layers": 60},
         StepShape((16, 1, 128, 128), (512, 3584), _IMAGE),
         tiny={"num_layers": 1, "num_attention_heads": 2, "joint_attention_dim": 64},
         tiny_shape=StepShape((16, 1, 16, 16), (16, 64), "tiny")),
    # Wan 2.1 / 2.2 14B text-to-video (2.2's two experts each have this shape) at 832x480, 33 frames:
    # latent 16 x 9 x 60 x 104, umT5-XXL context padded to 512 tokens
    Arch("wan14b", "Wan 2.1/2.2 14B T2V", _WAN14B, StepShape((16, 9, 60, 104), (512, 4096), "832x480x33"),
         tiny={"dim": 256, "num_heads": 2, "ffn_dim": 512, "num_layers": 1, "text_dim": 64},
         tiny_shape=StepShape((16, 3, 8, 8), (16, 64), "tiny")),
)}


def model_config(config: dict):
    """ComfyUI's supported-model config object for a unet config (what detection's answer selects)."""
    import comfy.model_detection

    found = comfy.model_detection.model_config_from_unet_config(dict(config))
    if found is None:
        raise ValueError(f"ComfyUI has no supported model for unet config {config}")
    return found


def meta_model(config: dict) -> torch.nn.Module:
    """The diffusion model ComfyUI builds for ``config``, on the meta device (names and shapes only)."""
    import comfy.ops

    mc = model_config(config)
    mc.set_inference_dtype(torch.bfloat16, None)
    mc.custom_operations = comfy.ops.disable_weight_init
    return mc.get_model({}, device="meta").diffusion_model


def random_state_dict(arch: Arch, tiny: bool = False, device: str = "cuda", seed: int = 0,
                      overrides: dict | None = None) -> dict[str, torch.Tensor]:
    """The architecture's BF16 weights, random and seeded (the same in every process), made on ``device``;
    ``overrides`` change the unet config first (e.g. fewer blocks at the real widths: ComfyUI's detection
    counts the blocks from the keys)."""
    config = {**arch.unet_config(tiny), **(overrides or {})}
    return flux2_model.random_weights(meta_model(config).state_dict(), device, seed)


def check_detection(arch: Arch, sd: dict) -> None:
    """ComfyUI's detection, run on ``sd`` as on a user's file, must build the model the table describes."""
    import comfy.model_detection

    found = comfy.model_detection.detect_unet_config(sd, "")
    if found is None or found.get("image_model") != arch.config["image_model"]:
        raise AssertionError(f"{arch.title}: ComfyUI detects {found and found.get('image_model')!r}, "
                             f"expected {arch.config['image_model']!r}")
    built = {k: tuple(v.shape) for k, v in meta_model(found).state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in sd.items()}
    if built != ours:
        diff = sorted(set(built.items()) ^ set(ours.items()))[:6]
        raise AssertionError(f"{arch.title}: ComfyUI's detection builds other shapes than the table: {diff}")


@contextlib.contextmanager
def detection(arch: Arch, tiny: bool):
    """While loading: at real widths ComfyUI's own detection; at tiny widths detection's answer replaced by
    the table's tiny config once detection has recognised the architecture (see the module docstring)."""
    if not tiny:
        yield
        return
    import comfy.model_detection

    original = comfy.model_detection.detect_unet_config
    config = arch.unet_config(tiny=True)

    def detect(state_dict, key_prefix, metadata=None):
        found = original(state_dict, key_prefix, metadata=metadata)
        if found is None or found.get("image_model") != config["image_model"]:
            raise AssertionError(f"tiny {arch.title}: ComfyUI detects {found and found.get('image_model')!r}")
        return dict(config)

    comfy.model_detection.detect_unet_config = detect
    try:
        yield
    finally:
        comfy.model_detection.detect_unet_config = original


def step_inputs(patcher, shape: StepShape, device: str, seed: int = 1):
    """(x float32 [1, *latent], sigma [1], conds): conds are what the model's own ``extra_conds`` makes of the
    text context, as ComfyUI's samplers pass them to ``apply_model`` (e.g. Chroma's guidance, Z-Image's
    num_tokens)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((1, *shape.latent), device=device, generator=gen)
    ctx = torch.randn((1, *shape.text), device=device, generator=gen)
    sigma = torch.tensor([0.7], device=device)
    found = patcher.model.extra_conds(cross_attn=ctx, noise=x, device=torch.device(device), prompt_type="positive",
                                      width=shape.latent[-1] * 8, height=shape.latent[-2] * 8)
    conds = {}
    for key, cond in found.items():
        value = cond.process_cond(batch_size=1, area=None, device=device).cond
        conds[key] = value.to(device) if isinstance(value, torch.Tensor) else value
    return x, sigma, conds
