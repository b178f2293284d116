"""Format readers and model profiles (unit tier: no ComfyUI)."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from int8_w8a8.kernels import reference as ref
from int8_w8a8.ops import formats, profiles

from . import formats_util as fu

pytestmark = pytest.mark.unit

# A FLUX.2-shaped key set (hidden 256): what ComfyUI's Flux class holds, as in a BFL file.
H = 256
FLUX2_SHAPES = {
    "img_in.weight": (H, 128), "time_in.in_layer.weight": (H, 256), "time_in.out_layer.weight": (H, H),
    "txt_in.weight": (H, 64),
    "double_blocks.0.img_attn.qkv.weight": (3 * H, H), "double_blocks.0.img_attn.proj.weight": (H, H),
    "double_blocks.0.img_attn.norm.query_norm.scale": (128,), "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
    "double_blocks.0.img_mlp.0.weight": (6 * H, H), "double_blocks.0.img_mlp.2.weight": (H, 3 * H),
    "double_blocks.0.txt_attn.qkv.weight": (3 * H, H), "double_blocks.0.txt_attn.proj.weight": (H, H),
    "double_blocks.0.txt_mlp.0.weight": (6 * H, H), "double_blocks.0.txt_mlp.2.weight": (H, 3 * H),
    "single_blocks.0.linear1.weight": (9 * H, H), "single_blocks.0.linear2.weight": (H, 4 * H),
    "single_blocks.0.norm.query_norm.scale": (128,),
    "double_stream_modulation_img.lin.weight": (6 * H, H), "double_stream_modulation_txt.lin.weight": (6 * H, H),
    "single_stream_modulation.lin.weight": (3 * H, H),
    "final_layer.adaLN_modulation.1.weight": (2 * H, H), "final_layer.linear.weight": (128, H),
}
QUANTIZED = {"double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.0",
             "double_blocks.0.img_mlp.2", "double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_attn.proj",
             "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2", "single_blocks.0.linear1",
             "single_blocks.0.linear2"}


def flux2_sd(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=gen) / (s[-1] ** 0.5)).to(torch.bfloat16) for k, s in FLUX2_SHAPES.items()}


def _is_quantized(layer: str) -> bool:
    return layer in QUANTIZED


def _conf(nsd, layer):
    return json.loads(bytes(nsd[f"{layer}.comfy_quant"].numpy().tobytes()))


# ------------------------------------------------------------------ profiles
def test_flux2_profile_detects_and_keeps_the_right_layers():
    sd = flux2_sd()
    profile = profiles.detect(sd)
    assert profile.name == "flux2"
    layers = [k[:-7] for k in sd if k.endswith(".weight") and sd[k].dim() == 2]
    assert {k for k in layers if not profile.keeps(k)} == QUANTIZED


PROFILE_KEYS = {
    "chroma": (["distilled_guidance_layer.in_proj.weight", "distilled_guidance_layer.layers.0.in_layer.weight",
                "double_blocks.0.img_attn.qkv.weight", "single_blocks.3.linear2.weight", "img_in.weight",
                "final_layer.linear.weight", "nerf_blocks.0.param_generator.weight"],
               {"double_blocks.0.img_attn.qkv", "single_blocks.3.linear2"}),
    "z-image": (["cap_embedder.1.weight", "x_embedder.weight", "t_embedder.mlp.0.weight",
                 "noise_refiner.0.attention.qkv.weight", "context_refiner.0.feed_forward.w1.weight",
                 "layers.0.attention.qkv.weight", "layers.0.attention.out.weight", "layers.0.feed_forward.w2.weight",
                 "layers.0.adaLN_modulation.0.weight", "final_layer.linear.weight"],
                {"layers.0.attention.qkv", "layers.0.attention.out", "layers.0.feed_forward.w2"}),
    "qwen-image": (["txt_norm.weight", "img_in.weight", "txt_in.weight",
                    "time_text_embed.timestep_embedder.linear_1.weight",
                    "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.add_k_proj.weight",
                    "transformer_blocks.0.img_mod.1.weight", "transformer_blocks.0.img_mlp.net.2.weight",
                    "norm_out.linear.weight", "proj_out.weight"],
                   {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                    "transformer_blocks.0.img_mod.1", "transformer_blocks.0.img_mlp.net.2"}),
    "wan": (["head.modulation", "head.head.weight", "blocks.0.self_attn.q.weight", "blocks.0.cross_attn.o.weight",
             "blocks.0.ffn.0.weight", "text_embedding.0.weight", "time_embedding.0.weight", "time_projection.1.weight",
             "img_emb.proj.1.weight", "patch_embedding.weight"],
            {"blocks.0.self_attn.q", "blocks.0.cross_attn.o", "blocks.0.ffn.0"}),
}


@pytest.mark.parametrize("name", list(PROFILE_KEYS))
def test_profiles_detect_and_select(name):
    keys, quantized = PROFILE_KEYS[name]
    profile = profiles.detect(keys)
    assert profile is not None and profile.name == name
    not_linear = {"patch_embedding.weight", "txt_norm.weight"}  # a Conv3d and an RMSNorm
    layers = {k[:-7] for k in keys if k.endswith(".weight") and k not in not_linear}
    assert {k for k in layers if not profile.keeps(k)} == quantized


def test_keep_patterns_match_whole_components():
    p = profiles.ModelProfile("t", "t", detect=(), keep=("final_layer", "time_text_embed.timestep_embedder"))
    assert p.keeps("final_layer.linear") and p.keeps("a.final_layer")
    assert not p.keeps("final_layer_norm.linear") and not p.keeps("my_final_layer")
    assert p.keeps("time_text_embed.timestep_embedder.linear_1") and not p.keeps("time_text_embed.other")


def test_optional_keep_patterns():
    """``with_optional`` converts the optional patterns and nothing else; optional patterns must be kept ones."""
    p = profiles.ModelProfile("t", "t", detect=(), keep=("final_layer", "refiner"), optional=("refiner",))
    q = p.with_optional()
    assert p.keeps("refiner.0.qkv") and not q.keeps("refiner.0.qkv") and q.keeps("final_layer.linear")
    assert (q.name, q.optional) == ("t", ())
    with pytest.raises(ValueError, match="not in keep"):
        profiles.ModelProfile("t", "t", detect=(), keep=("final_layer",), optional=("refiner",))
    assert profiles.BY_NAME["z-image"].optional == ("noise_refiner", "context_refiner")


def test_profile_resolution_errors():
    sd = flux2_sd()
    assert profiles.resolve("auto", sd, "f.safetensors").name == "flux2"
    with pytest.raises(formats.Int8FormatError, match=r"is a FLUX\.2 .* but the profile 'wan' was selected"):
        profiles.resolve("wan", sd, "f.safetensors")
    with pytest.raises(formats.Int8FormatError, match="could not detect the model architecture"):
        profiles.resolve("auto", {"foo.weight": 1}, "f.safetensors")
    with pytest.raises(ValueError, match="unknown 'sdxl'"):
        profiles.resolve("sdxl", sd, "f.safetensors")


# ------------------------------------------------------------------ readers
FORMATS = {name: functools.partial(writer, quantize=_is_quantized) for name, writer in fu.INT8_WRITERS.items()}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_int8_format_normalizes_to_native(fmt):
    sd = flux2_sd()
    file_sd, meta = FORMATS[fmt](sd)
    nsd, report = formats.normalize(file_sd, meta, "f.safetensors")
    assert report.quantized == len(QUANTIZED) and report.prefix == ("model." if fmt.startswith("int8-fast") else "")
    assert set(nsd) >= set(sd)  # every weight and norm under its plain name
    for layer in QUANTIZED:
        q, s, conf = nsd[f"{layer}.weight"], nsd[f"{layer}.weight_scale"], _conf(nsd, layer)
        assert q.dtype == torch.int8 and s.dtype == torch.float32 and conf["format"] == "int8_tensorwise"
        assert s.shape == (() if fmt in ("native-per-tensor", "legacy-scale-names") else (q.shape[0], 1))
        rotated = fmt in ("native-convrot", "int8-fast-quarot", "int8-fast-convrot")
        assert conf.get("convrot", False) == rotated and conf.get("convrot_groupsize", 256) == 256
        w = ref.dequantize(q, s, torch.float32, rotate_group=256 if rotated else 0)
        if fmt == "modelopt-smoothquant":  # stored as W * smooth per input channel
            smooth = nsd[f"{layer}.smooth"]
            assert smooth.dtype == torch.float32 and smooth.shape == (q.shape[1],)
            w = w / smooth
        assert float((w - sd[f"{layer}.weight"].float()).norm() / sd[f"{layer}.weight"].float().norm()) < 0.02
    assert any(k.endswith(".smooth") for k in nsd) == (fmt == "modelopt-smoothquant")
    assert not any(k.endswith(("input_scale", "scale_weight", "pre_quant_scale")) for k in nsd)
    assert all(nsd[k].dtype == torch.bfloat16 for k in sd if k[:-7] not in QUANTIZED)


def test_fp8_scaled_is_marked_for_conversion():
    nsd, report = formats.normalize(*fu.fp8_scaled(flux2_sd(), _is_quantized), "f.safetensors")
    assert report.fp8 == {"float8_e4m3fn": len(QUANTIZED)} and "scaled_fp8" not in nsd
    conf = _conf(nsd, "single_blocks.0.linear1")
    assert conf == {"format": "float8_e4m3fn"} and nsd["single_blocks.0.linear1.weight_scale"].shape == ()


def test_checkpoint_prefix_keeps_only_the_diffusion_model():
    sd = {f"model.diffusion_model.{k}": v for k, v in flux2_sd().items()}
    sd["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    nsd, report = formats.normalize(sd, None, "ckpt.safetensors")
    assert report.prefix == "model.diffusion_model." and set(nsd) == set(FLUX2_SHAPES)


def _mutated(fmt_fn, mutate):
    sd, meta = fmt_fn(flux2_sd())
    mutate(sd)
    return sd, meta


L = "double_blocks.0.img_attn.proj"
BAD = {
    "no-scale": (lambda sd: sd.pop(f"{L}.weight_scale"), r"int8 weight without a scale"),
    "scale-shape": (lambda sd: sd.__setitem__(f"{L}.weight_scale", torch.ones(7)), r"weight scale has shape \[7\]"),
    "scale-nan": (lambda sd: sd[f"{L}.weight_scale"].__setitem__((3, 0), float("nan")), r"non-finite or non-positive"),
    "scale-negative": (lambda sd: sd[f"{L}.weight_scale"].mul_(-1), r"non-finite or non-positive"),
    "unknown-format": (lambda sd: sd.__setitem__(f"{L}.comfy_quant", fu._conf({"format": "int4_magic"})),
                       r"unknown quantization format 'int4_magic'"),
    "nvfp4": (lambda sd: sd.__setitem__(f"{L}.comfy_quant", fu._conf({"format": "nvfp4"})), r"NVFP4"),
    "quip": (lambda sd: sd.__setitem__(f"{L}.hadamard_quip", torch.ones(1)), r"QuIP"),
    "bad-group": (lambda sd: sd.__setitem__(f"{L}.comfy_quant", fu._conf(
        {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 96})), r"ConvRot group 96"),
    "bad-json": (lambda sd: sd.__setitem__(f"{L}.comfy_quant", torch.tensor([1, 2, 3], dtype=torch.uint8)),
                 r"comfy_quant metadata is unreadable"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_layers_are_named(case):
    mutate, message = BAD[case]
    sd, meta = _mutated(lambda s: fu.native(s, _is_quantized, per_layer_only=True), mutate)
    with pytest.raises(formats.Int8FormatError, match=message) as info:
        formats.normalize(sd, meta, "f.safetensors")
    assert "f.safetensors" in str(info.value) and L in str(info.value)


def test_blockwise_is_rejected_with_its_format():
    with pytest.raises(formats.Int8FormatError, match=r"blockwise INT8 \(int8_blockwise\)"):
        formats.normalize(*fu.blockwise(flux2_sd(), _is_quantized), "b.safetensors")
    sd, _ = fu.one_d_scales(flux2_sd(), _is_quantized)
    sd[f"{L}.weight_scale"] = torch.ones(4, 4)  # blockwise-shaped scale without any metadata
    with pytest.raises(formats.Int8FormatError, match="is a blockwise scale"):
        formats.normalize(sd, None, "b.safetensors")


# ------------------------------------------------------------------ SmoothQuant and keys no reader consumes
def test_smoothquant_vector_is_the_reciprocal_of_pre_quant_scale():
    """ModelOpt multiplies activations by pre_quant_scale; the layout divides them by smooth: smooth = 1 / it,
    so that x / smooth @ (W * smooth)^T == x @ W^T."""
    sd, meta = fu.modelopt_smoothquant(flux2_sd(), _is_quantized, dtype=torch.float32)
    nsd, report = formats.normalize(sd, meta, "sq.safetensors")
    layer = "single_blocks.0.linear2"
    assert torch.allclose(nsd[f"{layer}.smooth"] * sd[f"{layer}.pre_quant_scale"], torch.ones(4 * H))
    assert report.int8 == {"no format metadata (ModelOpt and others), per-row scales, SmoothQuant": len(QUANTIZED)}
    x = torch.randn(5, 4 * H, dtype=torch.float64)
    w = ref.dequantize(nsd[f"{layer}.weight"], nsd[f"{layer}.weight_scale"], torch.float32).double()
    y = (x / nsd[f"{layer}.smooth"].double()) @ w.T
    y_ref = x @ flux2_sd()[f"{layer}.weight"].double().T
    assert float((y - y_ref).norm() / y_ref.norm()) < 0.02


SQ = {
    "pre-quant-shape": (lambda sd: sd.__setitem__(f"{L}.pre_quant_scale", torch.ones(7)),
                        r"SmoothQuant pre_quant_scale of shape \[7\]"),
    "pre-quant-zero": (lambda sd: sd[f"{L}.pre_quant_scale"].__setitem__(3, 0.0),
                       r"pre_quant_scale has 1 non-finite or non-positive"),
    "unknown-sidecar": (lambda sd: sd.__setitem__(f"{L}.weight_zero_point", torch.zeros(H)),
                        rf"comes with '{L}.weight_zero_point', which this pack does not know"),
    "awq-group-scale": (lambda sd: sd.__setitem__(f"{L}.weight_scale_2", torch.ones(())),
                        rf"'{L}.weight_scale_2'.*wrong weights"),
    "quantizer-state": (lambda sd: sd.__setitem__(f"{L}.weight_quantizer._amax", torch.ones(H, 1)),
                        rf"'{L}.weight_quantizer._amax'"),
}


@pytest.mark.parametrize("case", list(SQ))
def test_smoothquant_and_unknown_keys_are_named(case):
    """A key beside a quantized weight that no reader consumes is an error naming the layer and the key (ComfyUI
    would drop it and the layer would compute something else), as is a broken smoothing vector."""
    mutate, message = SQ[case]
    sd, meta = _mutated(lambda s: fu.modelopt_smoothquant(s, _is_quantized), mutate)
    with pytest.raises(formats.Int8FormatError, match=message) as info:
        formats.normalize(sd, meta, "f.safetensors")
    assert "f.safetensors" in str(info.value) and f"layer '{L}'" in str(info.value)


def test_unknown_keys_beside_fp8_weights_and_smoothed_fp8_are_refused():
    sd, meta = fu.fp8_scaled(flux2_sd(), _is_quantized)
    sd[f"{L}.weight_zero_point"] = torch.zeros(H)
    with pytest.raises(formats.Int8FormatError, match=rf"'{L}.weight_zero_point'"):
        formats.normalize(sd, meta, "f.safetensors")
    sd, meta = fu.fp8_scaled(flux2_sd(), _is_quantized)
    sd[f"{L}.pre_quant_scale"] = torch.ones(H)
    with pytest.raises(formats.Int8FormatError, match=r"FP8 weight with a SmoothQuant/AWQ .*use the BF16 model"):
        formats.normalize(sd, meta, "f.safetensors")


def test_smoothed_float_weights_are_folded_and_float_keys_pass():
    """A smoothing vector beside a float weight is folded into it (W = stored / smooth); keys beside float layers
    that are not quantization sidecars pass through as before (ComfyUI's own checks apply)."""
    sd = flux2_sd()
    w = sd[f"{L}.weight"].float()
    s = fu.smoothing(H)
    sd[f"{L}.weight"] = (w * s).to(torch.bfloat16)
    sd[f"{L}.pre_quant_scale"] = 1.0 / s
    nsd, report = formats.normalize(sd, None, "f.safetensors")
    assert f"{L}.pre_quant_scale" not in nsd and nsd[f"{L}.weight"].dtype == torch.bfloat16
    assert float((nsd[f"{L}.weight"].float() - w).norm() / w.norm()) < 0.01
    assert report.floating == {"BF16": len(FLUX2_SHAPES) - 3} and not report.int8  # three 1-D norm scales


def test_report_says_what_the_file_holds_in_words():
    _, report = formats.normalize(*fu.modelopt(flux2_sd(), _is_quantized), "klein.safetensors")
    assert report.summary() == (
        "klein.safetensors: 10 INT8 layers (no format metadata (ModelOpt and others), per-row scales), 9 BF16 "
        "weights; ignored 10 static input scales (activations are quantized per token)")
    _, report = formats.normalize(*fu.native(flux2_sd(), _is_quantized, convrot=256), "n.safetensors")
    assert report.summary().startswith(
        "n.safetensors: 10 INT8 layers (ComfyUI native int8_tensorwise, per-row scales, ConvRot-256), 9 BF16")


def test_exception_types_have_a_clean_module_name():
    """ComfyUI shows an error's type as module + class name; without this it is the pack's install path."""
    assert formats.Int8FormatError.__module__ == "int8_w8a8"
    assert f"{formats.Int8FormatError.__module__}.{formats.Int8FormatError.__qualname__}" == "int8_w8a8.Int8FormatError"
