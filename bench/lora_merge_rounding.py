"""How to requantize a LoRA-merged INT8 weight: a fidelity study on a tiny FLUX.2 (CPU, inside ComfyUI).

    COMFYUI_PATH=... python -m int8_w8a8.bench.lora_merge_rounding [--seeds 3] [--out results.json]

Rank-8 LoRAs on every quantized layer, with weight changes of 2-20% of each weight's norm. For each,
the SQNR lost against ComfyUI's BF16+LoRA (relative to the INT8 model without LoRA against BF16) by:
  merge, nearest/stochastic  the pack's merge: recalculated per-row scales, the two rounding options;
  comfyui                    ComfyUI's own merge on comfy-kitchen's INT8 layout (stochastic rounding);
  before-quant               the loader's LoRA input: the LoRA added to the BF16 weights, quantized once.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile

import torch

from . import common, flux2_model

RELS = (0.02, 0.05, 0.1, 0.2)


def _lora_file(sd: dict, layers: list[str], rel: float, seed: int, path: str) -> str:
    import safetensors.torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        w = sd[f"{layer}.weight"].float()
        up = torch.randn(w.shape[0], 8, generator=gen)
        down = torch.randn(8, w.shape[1], generator=gen)
        up *= rel * w.norm() / (up @ down).norm()
        out[f"diffusion_model.{layer}.lora_up.weight"] = up.bfloat16()
        out[f"diffusion_model.{layer}.lora_down.weight"] = down.bfloat16()
    safetensors.torch.save_file(out, path)
    return path


def study(seeds: int, folder: str) -> dict:
    import comfy.lora
    import comfy.model_management
    import comfy.sd
    import comfy.utils

    from ..lora import loading, merge, preload
    from ..ops import layout, loader

    def run(patcher):
        y = flux2_model.forward(patcher, x).float()
        comfy.model_management.unload_all_models()
        return y

    cfg = flux2_model.CONFIGS["tiny"]
    sd = flux2_model.random_state_dict(cfg, "cpu")
    x = flux2_model.inputs(cfg, "cpu", image=64, text=8)
    bf16 = flux2_model.load_bf16(sd, "cpu")
    y_bf16 = run(bf16)
    int8 = flux2_model.load_int8(sd, "cpu")
    s0 = common.sqnr_db(y_bf16, run(int8))
    native = loader.save_model(int8, os.path.join(folder, "native.safetensors"))
    comfy.model_management.unload_all_models()
    layers = [n for n, m in int8.model.diffusion_model.named_modules()
              if layout.is_int8_weight(getattr(m, "weight", None))]
    losses: dict[str, dict[float, list[float]]] = {}

    def record(name, rel, y_ref, y, base=s0):
        losses.setdefault(name, {}).setdefault(rel, []).append(base - common.sqnr_db(y_ref, y))

    for rel in RELS:
        for seed in range(seeds):
            path = _lora_file(sd, layers, rel, 10 + seed, os.path.join(folder, f"lora-{rel}-{seed}.safetensors"))
            spec = [loading.LoraSpec(path)]
            ref = bf16.clone()
            ref.add_patches(comfy.lora.load_lora(comfy.utils.load_torch_file(path),
                                                 comfy.lora.model_lora_keys_unet(ref.model, {})), 1.0)
            y_ref = run(ref)
            for rounding in merge.ROUNDINGS:
                record(f"merge, {rounding}", rel, y_ref, run(merge.merge(int8, spec, rounding)[0]))
            kitchen = comfy.sd.load_diffusion_model(native, disable_dynamic=True)
            s0_kitchen = common.sqnr_db(y_bf16, run(kitchen))
            kitchen.add_patches(comfy.lora.load_lora(comfy.utils.load_torch_file(path),
                                                     comfy.lora.model_lora_keys_unet(kitchen.model, {})), 1.0)
            record("comfyui", rel, y_ref, run(kitchen), s0_kitchen)
            pre = flux2_model.load_int8(sd, "cpu", loader.LoadOptions(prepare=preload.factory(spec)))
            record("before-quant", rel, y_ref, run(pre))
    return {"int8_vs_bf16_sqnr": s0, "losses_db": {k: {str(r): v for r, v in d.items()} for k, d in losses.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    flux2_model.setup_comfyui(cpu=True)
    with tempfile.TemporaryDirectory() as folder:
        result = study(args.seeds, folder)
    print(f"INT8 without LoRA vs BF16: {result['int8_vs_bf16_sqnr']:.1f} dB. SQNR lost vs BF16+LoRA (mean of "
          f"{args.seeds} LoRAs), by the LoRA's size relative to the weight:")
    print(f"{'method':<22}" + "".join(f"{r:>8}" for r in RELS))
    for name, by_rel in result["losses_db"].items():
        print(f"{name:<22}" + "".join(f"{statistics.mean(by_rel[str(r)]):8.2f}" for r in RELS))
    if args.out:
        common.write_json(args.out, {"env": common.environment(), **result})


if __name__ == "__main__":
    main()
