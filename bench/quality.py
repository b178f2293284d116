"""Quality harness: the same seeded sampling through a BF16 model and its INT8 versions (inside ComfyUI).

    COMFYUI_PATH=... python -m int8_w8a8.bench.quality --model flux-2-klein-4b.safetensors \
        [--text-encoder qwen_3_4b.safetensors --vae flux2-vae.safetensors] [--lora style.safetensors] \
        [--steps 4 --cfg 1 --res 1024 --seed 42 --prompt "..."] [--int8 other-int8-file.safetensors] \
        [--out quality.json]

``--model`` is a BF16/FP16/FP32 diffusion-model file (the reference); the INT8 versions are made from it
by the pack's loader: per-row, per-tensor and ConvRot (group 256) weight scales, plus any pre-quantized
``--int8`` files. With ``--lora``, the reference is BF16 + the LoRA (ComfyUI's own merge) and the LoRA
is applied to the per-row model three ways: merged into INT8, dynamic, and before quantization.
Sampling is what the example workflows do (Flux2Scheduler, euler, CFGGuider, SamplerCustomAdvanced)
with ComfyUI's own nodes. Without ``--text-encoder`` the conditioning is seeded random text embeddings
of the model's width; without ``--vae`` only latents are compared.

Reported per variant: SQNR and PSNR of the final latents, PSNR and SSIM of the decoded images, and per
Linear layer the SQNR of its output in the first step, both in the model (errors of earlier layers
included) and isolated (the layer fed the BF16 model's input for it).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .common import sqnr_db

logger = logging.getLogger(__name__)

LAYER_ROWS = 64  # output rows kept per layer for the per-layer SQNR (an unbiased sample of the tokens)


@dataclass(frozen=True)
class Sampling:
    """One seeded sampling run."""

    steps: int = 4
    cfg: float = 1.0
    res: int = 1024
    seed: int = 42
    prompt: str = "a red fox reading a newspaper in a sunlit cafe, 35mm photo"
    sampler: str = "euler"


# ------------------------------------------------------------------------------------------ metrics


def psnr_db(ref: torch.Tensor, y: torch.Tensor, peak: float | None = None) -> float:
    """10 log10(peak^2 / MSE); peak defaults to max |ref| (latents), 1.0 is right for images in [0, 1]."""
    ref, y = ref.double(), y.double()
    mse = float(((ref - y) ** 2).mean())
    peak = float(ref.abs().max()) if peak is None else peak
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def ssim(ref: torch.Tensor, y: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1)
    of images [B, H, W, C] in [0, 1], per channel, averaged."""
    a, b = (t.double().permute(0, 3, 1, 2) for t in (ref, y))
    c = a.shape[1]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = (g / g.sum()).to(a.device)
    window = (g[:, None] * g[None, :]).expand(c, 1, 11, 11).contiguous()

    def blur(t):
        return F.conv2d(t, window, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


# ------------------------------------------------------------------------------------------ sampling


def conditioning(patcher, clip, prompt: str, seed: int, tokens: int = 64):
    """(positive, negative) ComfyUI conditioning: the prompt through ``clip``, or seeded random embeddings."""
    if clip is not None:
        def encode(text):
            return clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return encode(prompt), encode("")
    width = patcher.model.model_config.unet_config["context_in_dim"]
    gen = torch.Generator().manual_seed(seed + 1)
    positive = torch.randn(1, tokens, width, generator=gen)
    return [[positive, {}]], [[torch.zeros_like(positive), {}]]


def sample(patcher, positive, negative, spec: Sampling) -> torch.Tensor:
    """Final latent [1, 128, res/16, res/16] of the seeded run, through ComfyUI's own sampling nodes."""
    from comfy_extras.nodes_custom_sampler import CFGGuider, KSamplerSelect, RandomNoise, SamplerCustomAdvanced
    from comfy_extras.nodes_flux import EmptyFlux2LatentImage, Flux2Scheduler

    latent = EmptyFlux2LatentImage.execute(spec.res, spec.res, 1).args[0]
    sigmas = Flux2Scheduler.execute(spec.steps, spec.res, spec.res).args[0]
    noise = RandomNoise.execute(spec.seed).args[0]
    guider = CFGGuider.execute(patcher, positive, negative, spec.cfg).args[0]
    sampler = KSamplerSelect.execute(spec.sampler).args[0]
    out = SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).args[0]
    return out["samples"].float().cpu()


# ------------------------------------------------------------------------------------------ per-layer capture


def _linears(patcher) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in patcher.model.diffusion_model.named_modules()
            if hasattr(m, "in_features") and hasattr(m, "out_features") and getattr(m, "weight", None) is not None}


def _first_step_inputs(patcher, positive, spec: Sampling):
    gen = torch.Generator().manual_seed(spec.seed)
    x = torch.randn(1, 128, spec.res // 16, spec.res // 16, generator=gen)
    return x, torch.tensor([1.0]), positive[0][0]


def capture(patcher, inputs, reference: dict | None = None) -> dict:
    """Rows of every Linear's input and output in one model call at the first step's noise level.

    With ``reference`` (a capture of the BF16 model), also each layer's output on the reference's input.
    """
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    device = patcher.load_device
    records, hooks = {}, []

    def hook(name):
        def fn(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1])
            y = output.reshape(-1, output.shape[-1])
            rows = torch.linspace(0, x.shape[0] - 1, min(LAYER_ROWS, x.shape[0])).round().long().to(x.device)
            rec = {"x": x[rows].float().cpu(), "y": y[rows].float().cpu()}
            if reference is not None and name in reference:
                ref_x = reference[name]["x"].to(x.device, x.dtype)
                rec["y_isolated"] = module.forward(ref_x).float().cpu()
            records[name] = rec
        return fn

    for name, module in _linears(patcher).items():
        hooks.append(module.register_forward_hook(hook(name)))
    try:
        x, sigma, ctx = inputs
        with torch.inference_mode():
            patcher.model.apply_model(x.to(device), sigma.to(device), c_crossattn=ctx.to(device))
    finally:
        for h in hooks:
            h.remove()
    return records


def layer_report(reference: dict, records: dict) -> list[dict]:
    out = []
    for name, ref in reference.items():
        rec = records.get(name)
        if rec is None:
            continue
        row = {"layer": name, "in_model_sqnr": sqnr_db(ref["y"], rec["y"])}
        if "y_isolated" in rec:
            row["isolated_sqnr"] = sqnr_db(ref["y"], rec["y_isolated"])
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------ variants


def variants(model_path: str, int8_files: list[str], lora: str | None, lora_strength: float):
    """(name, build) pairs; ``build()`` returns a ModelPatcher. The first is the reference."""
    import comfy.lora
    import comfy.sd
    import comfy.utils

    from ..lora import dynamic, loading, merge, preload
    from ..ops import loader
    from ..ops.config import ConvertOptions

    def bf16():
        patcher = comfy.sd.load_diffusion_model(model_path)
        if lora is not None:
            key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
            patcher.add_patches(comfy.lora.load_lora(comfy.utils.load_torch_file(lora), key_map), lora_strength)
        return patcher

    def converted(**convert) -> Callable:
        return lambda: loader.load_file(model_path, loader.LoadOptions(convert=ConvertOptions(**convert)))

    out = [("bf16" + (" + LoRA" if lora else ""), bf16)]
    if lora is None:
        out += [("int8 per-row", converted(per_row=True)), ("int8 per-tensor", converted(per_row=False)),
                ("int8 ConvRot 256", converted(rotate_group=256))]
        out += [(f"int8 file {os.path.basename(p)}", lambda p=p: loader.load_file(p)) for p in int8_files]
        return out
    spec = [loading.LoraSpec(lora, lora_strength)]
    out += [
        ("int8 per-row, LoRA merged", lambda: merge.merge(loader.load_file(model_path), spec)[0]),
        ("int8 per-row, LoRA dynamic", lambda: dynamic.apply(loader.load_file(model_path), spec)[0]),
        ("int8 per-row, LoRA before quantization",
         lambda: loader.load_file(model_path, loader.LoadOptions(prepare=preload.factory(spec)))),
    ]
    return out


def _free() -> None:
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    gc.collect()


def run(model_path: str, spec: Sampling, *, text_encoder: str | None = None, vae_path: str | None = None,
        lora: str | None = None, lora_strength: float = 1.0, int8_files: tuple[str, ...] = ()) -> dict:
    """Sample every variant and compare it with the reference. Returns a JSON-ready report."""
    import comfy.sd
    import comfy.utils

    clip = None
    if text_encoder is not None:
        clip = comfy.sd.load_clip([text_encoder], clip_type=comfy.sd.CLIPType.FLUX2)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae_path)) if vae_path is not None else None
    report = {"sampling": asdict(spec), "model": os.path.basename(model_path), "lora": lora and os.path.basename(lora),
              "text_encoder": text_encoder and os.path.basename(text_encoder), "variants": []}
    ref = None
    for name, build in variants(model_path, list(int8_files), lora, lora_strength):
        patcher = build()
        positive, negative = conditioning(patcher, clip, spec.prompt, spec.seed)
        inputs = _first_step_inputs(patcher, positive, spec)
        layers = capture(patcher, inputs, None if ref is None else ref["layers"])
        latent = sample(patcher, positive, negative, spec)
        with torch.inference_mode():
            image = vae.decode(latent).float().cpu() if vae is not None else None
        del patcher
        _free()
        if ref is None:
            ref = {"latent": latent, "image": image, "layers": layers}
            report["variants"].append({"name": name, "reference": True})
            logger.info("quality: %s sampled (reference)", name)
            continue
        row = {"name": name, "latent_sqnr": sqnr_db(ref["latent"], latent),
               "latent_psnr": psnr_db(ref["latent"], latent)}
        if image is not None:
            row.update(image_psnr=psnr_db(ref["image"], image, peak=1.0), image_ssim=ssim(ref["image"], image))
        row["layers"] = layer_report(ref["layers"], layers)
        report["variants"].append(row)
        logger.info("quality: %s: latent SQNR %.1f dB", name, row["latent_sqnr"])
    return report


def summary(report: dict) -> str:
    lines = ["| variant | latent SQNR dB | latent PSNR dB | image PSNR dB | image SSIM | layer SQNR isolated "
             "min / median | in model min / median |", "|---|---|---|---|---|---|---|"]

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    def med(xs):
        return xs[len(xs) // 2] if xs else None

    for row in report["variants"]:
        if row.get("reference"):
            continue
        iso = sorted(r["isolated_sqnr"] for r in row["layers"] if "isolated_sqnr" in r)
        inm = sorted(r["in_model_sqnr"] for r in row["layers"])
        lines.append(f"| {row['name']} | {fmt(row['latent_sqnr'])} | {fmt(row['latent_psnr'])} | "
                     f"{fmt(row.get('image_psnr'))} | {fmt(row.get('image_ssim'), '.4f')} | "
                     f"{fmt(iso[0] if iso else None)} / {fmt(med(iso))} | {fmt(inm[0] if inm else None)} / "
                     f"{fmt(med(inm))} |")
    return "\n".join(lines)


def main() -> None:
    from . import flux2_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="BF16/FP16/FP32 diffusion model file (the reference)")
    parser.add_argument("--text-encoder", default=None, help="text encoder file (e.g. qwen_3_4b.safetensors)")
    parser.add_argument("--vae", default=None, help="VAE file (e.g. flux2-vae.safetensors)")
    parser.add_argument("--lora", default=None)
    parser.add_argument("--lora-strength", type=float, default=1.0)
    parser.add_argument("--int8", nargs="*", default=[], help="pre-quantized INT8 files of the same model")
    parser.add_argument("--steps", type=int, default=Sampling.steps)
    parser.add_argument("--cfg", type=float, default=Sampling.cfg)
    parser.add_argument("--res", type=int, default=Sampling.res)
    parser.add_argument("--seed", type=int, default=Sampling.seed)
    parser.add_argument("--prompt", default=Sampling.prompt)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    flux2_model.setup_comfyui(cpu=not torch.cuda.is_available())
    spec = Sampling(steps=args.steps, cfg=args.cfg, res=args.res, seed=args.seed, prompt=args.prompt)
    report = run(args.model, spec, text_encoder=args.text_encoder, vae_path=args.vae, lora=args.lora,
                 lora_strength=args.lora_strength, int8_files=tuple(args.int8))
    print(summary(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
