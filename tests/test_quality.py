"""Integration tier: the quality harness (bench/quality.py) on a tiny FLUX.2 and a random FLUX.2 VAE (CPU)."""

from __future__ import annotations

import math

import pytest

from . import lora_util as lu
from .test_lora import QUANTIZED_LAYERS
from .tiny_flux2 import vae_state_dict, write

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def files(flux2, tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    return {"model": write(root, "tiny-bf16.safetensors", flux2["sd"]),
            "vae": write(root, "tiny-vae.safetensors", vae_state_dict()),
            "lora": write(root, "tiny-lora.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS, seed=3))}


def _check(report: dict, names: list[str]) -> None:
    rows = report["variants"]
    assert rows[0].get("reference") and [r["name"] for r in rows[1:]] == names
    for row in rows[1:]:
        assert 20 < row["latent_sqnr"] < math.inf and row["latent_psnr"] > row["latent_sqnr"]
        assert 20 < row["image_psnr"] < math.inf and 0.9 < row["image_ssim"] <= 1.0
        layers = {r["layer"]: r for r in row["layers"]}
        assert {f"{name}" for name in QUANTIZED_LAYERS} <= set(layers)
        for name in QUANTIZED_LAYERS:
            assert layers[name]["isolated_sqnr"] > 25, (row["name"], layers[name])
            assert layers[name]["in_model_sqnr"] > 20, (row["name"], layers[name])
        assert layers["img_in"]["isolated_sqnr"] > 40  # kept in BF16


def test_quality_harness_compares_int8_variants(comfyui, files):
    from int8_w8a8.bench import quality

    report = quality.run(files["model"], quality.Sampling(steps=2, res=64), vae_path=files["vae"])
    _check(report, ["int8 per-row", "int8 per-tensor", "int8 ConvRot 256"])
    text = quality.summary(report)
    assert text.count("\n") == 4 and "int8 ConvRot 256" in text


def test_quality_harness_with_a_lora(comfyui, files):
    from int8_w8a8.bench import quality

    report = quality.run(files["model"], quality.Sampling(steps=2, res=64), vae_path=files["vae"], lora=files["lora"])
    assert report["variants"][0]["name"] == "bf16 + LoRA"
    _check(report, ["int8 per-row, LoRA merged", "int8 per-row, LoRA dynamic",
                    "int8 per-row, LoRA before quantization"])


def test_metrics():
    import torch

    from int8_w8a8.bench import quality

    gen = torch.Generator().manual_seed(0)
    img = torch.rand(1, 32, 32, 3, generator=gen)
    assert quality.ssim(img, img) == pytest.approx(1.0) and quality.psnr_db(img, img, 1.0) == math.inf
    noisy = (img + 0.01 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    assert 0.9 < quality.ssim(img, noisy) < 1.0
    assert quality.psnr_db(img, noisy, 1.0) == pytest.approx(40, abs=1.0)
    assert quality.sqnr_db(img, noisy) == pytest.approx(
        10 * math.log10(float((img.double() ** 2).sum() / ((img.double() - noisy.double()) ** 2).sum())))
