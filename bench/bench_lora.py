"""LoRA on INT8 FLUX.2 klein: dynamic-LoRA overhead, merge time and fidelity (GPU, inside ComfyUI).

    python -m int8_w8a8.bench.bench_lora [--model klein9b] [--ranks 16 64 128] [--out results.json]

Part 1, layers: the pack's int8_linear at klein-9B shapes without and with a LoRA term of each rank
(fused into the GEMM epilogue), next to BF16 F.linear and BF16 + a separate LoRA (x @ A^T @ B^T).
Part 2, model: a FLUX.2 klein transformer with random weights (bench/flux2_model.py) at 1024x1024,
  - BF16 and the pack's INT8 forward;
  - INT8 + a dynamic LoRA on every Linear (rank 16/64/128): step time and overhead over INT8;
  - INT8 + the rank-64 LoRA merged: time for ComfyUI to patch the loaded model (dequantize, add the
    LoRA in float, requantize every layer), step time after, time to unpatch and a bit-exact check;
  - fidelity at rank 64: SQNR vs the BF16 model with the same LoRA applied by ComfyUI.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import tempfile
import time

import torch
import torch.nn.functional as F

from .. import kernels
from . import common, flux2_model


def _lora_pair(n: int, k: int, rank: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [N, r], down [r, K]) in BF16: up @ down has entries ~ N(0, 0.01/K), 10% of a N(0, 1/K) weight."""
    up = torch.randn(n, rank, device=gen.device, generator=gen) / math.sqrt(rank)
    down = torch.randn(rank, k, device=gen.device, generator=gen) / math.sqrt(k)
    return (up * 0.1).bfloat16(), down.bfloat16()


def bench_layer(name: str, m: int, k: int, n: int, ranks: list[int]) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) / math.sqrt(k)
    q, s = kernels.quantize_weight(w)
    row = {"layer": name, "M": m, "K": k, "N": n,
           "bf16": common.bench_ms(lambda: F.linear(x, w)),
           "int8": common.bench_ms(lambda: kernels.int8_linear(x, q, s, validate=False))}
    for r in ranks:
        up, down = _lora_pair(n, k, r, gen)
        a, b = down.contiguous(), up.contiguous()
        row[f"int8+lora{r}"] = common.bench_ms(
            lambda: kernels.int8_linear(x, q, s, validate=False, lora_a=a, lora_b=b))  # noqa: B023 (run at once)
        row[f"bf16+lora{r}"] = common.bench_ms(lambda: F.linear(x, w) + (x @ a.T) @ b.T)  # noqa: B023
        y_ref = x.double() @ (w.double() + b.double() @ a.double()).T
        row[f"rel_err_lora{r}"] = common.rel_err(kernels.int8_linear(x, q, s, lora_a=a, lora_b=b), y_ref)
    print(f"{name:22s} {m}x{k}x{n}: bf16 {row['bf16']:.3f} int8 {row['int8']:.3f} ms; " + ", ".join(
        f"r{r} {row[f'int8+lora{r}']:.3f} ms (+{100 * (row[f'int8+lora{r}'] / row['int8'] - 1):.0f}%, "
        f"err {row[f'rel_err_lora{r}']:.4f})" for r in ranks), flush=True)
    return row


def write_lora(sd: dict, rank: int, folder: str, seed: int, device=None) -> str:
    """A rank-``rank`` LoRA on every 2-D ``*.weight`` of ``sd`` (ComfyUI keys; only names and shapes are read, so
    meta tensors do, with ``device`` for the random factors), as a safetensors file."""
    import safetensors.torch

    gen = torch.Generator(device=device or next(iter(sd.values())).device).manual_seed(seed)
    out = {}
    for key, w in sd.items():
        if w.dim() == 2 and key.endswith(".weight"):  # not 2-D parameters such as a pad token
            up, down = _lora_pair(w.shape[0], w.shape[1], rank, gen)
            base = f"diffusion_model.{key[:-len('.weight')]}"
            out[f"{base}.lora_up.weight"], out[f"{base}.lora_down.weight"] = up.cpu(), down.cpu()
    path = os.path.join(folder, f"lora-r{rank}.safetensors")
    safetensors.torch.save_file(out, path)
    return path


def _time_forward(patcher, x, reps: int = 7, warmup: int = 2) -> float:
    """Median ms of one forward (patches already applied by a first call)."""
    return _time_interleaved([patcher], x, reps, warmup)[0]


def _time_interleaved(patchers: list, x, reps: int = 7, warmup: int = 2) -> list[float]:
    """Median ms of one transformer forward of each patcher, run in turns so clock drift hits all alike.

    ComfyUI applies each one's patches (untimed) before its timed forward.
    """
    import comfy.model_management

    times: list[list[float]] = [[] for _ in patchers]
    for i in range(warmup + reps):
        for j, patcher in enumerate(patchers):
            comfy.model_management.load_models_gpu([patcher])
            common.sync()
            t0 = time.perf_counter()
            flux2_model.forward(patcher, x)
            common.sync()
            if i >= warmup:
                times[j].append((time.perf_counter() - t0) * 1e3)
    return [common.median(t) for t in times]


def _checksum(patcher) -> float:
    from ..ops import layout

    total = 0.0
    for m in patcher.model.diffusion_model.modules():
        w = getattr(m, "weight", None)
        if layout.is_int8_weight(w):
            total += float(w._qdata.float().sum()) + float(w._params.scale.double().sum())
    return total


def bench_model(cfg: flux2_model.Flux2Config, ranks: list[int], folder: str, device: str = "cuda") -> dict:
    import comfy.lora
    import comfy.model_management
    import comfy.utils

    from ..lora import dynamic, loading, merge

    out = {"model": cfg.name}
    sd = flux2_model.random_state_dict(cfg, device)
    x = flux2_model.inputs(cfg, device, image=1024 if device == "cuda" else 128, text=512 if device == "cuda" else 16)
    bf16 = flux2_model.load_bf16(sd, device)
    y_bf16 = flux2_model.forward(bf16, x).float()
    t0 = time.perf_counter()
    int8 = flux2_model.load_int8(sd, device)
    out["int8_load_s"] = time.perf_counter() - t0
    y_int8 = flux2_model.forward(int8, x).float()
    out["bf16_ms"], out["int8_ms"] = _time_interleaved([bf16, int8], x)  # both models stay resident
    out["int8_sqnr"] = common.sqnr_db(y_bf16, y_int8)
    out["bf16_gb"], out["int8_gb"] = flux2_model.weight_bytes(bf16) / 1e9, flux2_model.weight_bytes(int8) / 1e9
    print(f"{cfg.name}: BF16 {out['bf16_ms']:.1f} ms, INT8 {out['int8_ms']:.1f} ms ({out['int8_sqnr']:.1f} dB), "
          f"weights {out['bf16_gb']:.2f} / {out['int8_gb']:.2f} GB, INT8 load {out['int8_load_s']:.1f} s", flush=True)
    for r in ranks:
        path = write_lora(sd, r, folder, seed=r)
        dyn, reports = dynamic.apply(int8, [loading.LoraSpec(path)])
        y_dyn = flux2_model.forward(dyn, x).float()
        base_ms, ms = _time_interleaved([int8, dyn], x)
        out[f"dynamic_r{r}_ms"], out[f"dynamic_r{r}_int8_ms"] = ms, base_ms
        out[f"dynamic_r{r}_overhead"] = ms / base_ms - 1
        print(f"  dynamic LoRA rank {r}: {ms:.1f} ms vs INT8 {base_ms:.1f} ms, timed in turns "
              f"(+{100 * (ms / base_ms - 1):.1f}%); {reports[0].summary()}", flush=True)
        if r != 64:
            del dyn
            continue
        # the BF16 reference with the same LoRA, merged in float by ComfyUI
        ref = bf16.clone()
        key_map = comfy.lora.model_lora_keys_unet(ref.model, {})
        ref.add_patches(comfy.lora.load_lora(comfy.utils.load_torch_file(path), key_map), 1.0)
        y_ref = flux2_model.forward(ref, x).float()
        comfy.model_management.unload_all_models()  # drop the BF16 copies before the INT8 merge
        del ref
        out["dynamic_r64_sqnr"] = common.sqnr_db(y_ref, y_dyn)
        flux2_model.forward(int8, x)  # the base model loaded, as before a LoRA is added in a workflow
        before = _checksum(int8)
        merged, _ = merge.merge(int8, [loading.LoraSpec(path)])
        common.sync()
        t0 = time.perf_counter()
        comfy.model_management.load_models_gpu([merged])
        common.sync()
        out["merge_r64_s"] = time.perf_counter() - t0
        y_merged = flux2_model.forward(merged, x).float()
        out["merged_r64_ms"] = _time_forward(merged, x)
        out["merged_r64_sqnr"] = common.sqnr_db(y_ref, y_merged)
        t0 = time.perf_counter()
        comfy.model_management.load_models_gpu([int8])
        common.sync()
        out["unpatch_s"] = time.perf_counter() - t0
        out["unpatched_bit_exact"] = _checksum(int8) == before and torch.equal(flux2_model.forward(int8, x).float(),
                                                                                y_int8)
        out["bf16_lora_vs_bf16_sqnr"] = common.sqnr_db(y_ref, y_bf16)
        print(f"  rank 64 vs BF16+LoRA: dynamic {out['dynamic_r64_sqnr']:.1f} dB, merged {out['merged_r64_sqnr']:.1f} "
              f"dB (INT8 without LoRA vs BF16: {out['int8_sqnr']:.1f} dB; the LoRA moves BF16 by "
              f"{out['bf16_lora_vs_bf16_sqnr']:.1f} dB)", flush=True)
        print(f"  merge rank 64 into every layer: {out['merge_r64_s']:.2f} s; merged step {out['merged_r64_ms']:.1f} "
              f"ms; unpatch {out['unpatch_s']:.2f} s, bit-exact {out['unpatched_bit_exact']}", flush=True)
        del dyn, merged
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="klein9b", choices=sorted(flux2_model.CONFIGS))
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the model part (use --model tiny)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    flux2_model.setup_comfyui(cpu=args.device == "cpu")
    result = {"env": common.environment(), "ranks": args.ranks}
    if not args.skip_layers and args.device == "cuda":
        result["layers"] = [bench_layer(*shape, args.ranks) for shape in common.KLEIN_SHAPES
                            if shape[0].startswith("9B")]
    with tempfile.TemporaryDirectory() as folder:
        result["model"] = bench_model(flux2_model.CONFIGS[args.model], args.ranks, folder, args.device)
    if args.out:
        common.write_json(args.out, result)


if __name__ == "__main__":
    main()
