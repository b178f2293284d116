"""One FLUX.2 klein diffusion step inside ComfyUI: BF16, FP8, ComfyUI's native INT8 and the pack (GPU).

    python -m int8_w8a8.bench.bench_model [--models klein9b klein4b] [--res 512 1024 2048]
        [--variants bf16 fp8-fast comfy-int8 pack-row pack-tensor] [--compile] [--out results.json]

Each model is ComfyUI's own Flux class at the real widths with random weights (bench/flux2_model.py;
weights do not change timing). A step is ``BaseModel.apply_model`` on x [1, 128, res/16, res/16] and
512 text tokens, with the patcher's wrappers, as ComfyUI's samplers call it, so the stock
TorchCompileModel node (``--compile``) works as in a workflow. Variants, all from the same weights:

  bf16         ComfyUI's stock loader
  fp8-fast     stock loader, weight_dtype fp8_e4m3fn_fast (FP8 weights, torch._scaled_mm)
  comfy-int8   a native int8_tensorwise file (per-row) on ComfyUI's own layout and comfy-kitchen kernels
  pack-row     the pack's loader, per-row weight scales
  pack-tensor  the pack's loader, per-tensor weight scales
  pack-row-unfused per-row on ComfyUI's own blocks (LoadOptions.fused_blocks=False): the INT8 linears
               alone, without the fused norm/SwiGLU/RoPE/residual kernels the pack runs by default
  pack-row-graphq  per-row, activations quantized with torch ops inside the compiled graph
               (LoadOptions.quant_in_graph: Inductor fuses them into the producing op; same as
               pack-row in eager mode). Not in the default list until measured.
  pack-convrot per-row with ConvRot group 256 (rotated activations: the fused blocks fall back to
               ComfyUI's, whose linears rotate inside the activation quantization)
  pack-row-attn16 / pack-row-attn8  per-row, the fused blocks' attention chosen explicitly: ComfyUI's
               ("bf16", SDPA here) or the pack's 8-bit attention ("8-bit": Triton on Hopper); pack-row is
               "auto" (LoadOptions.attention). Which attention ran is logged once per choice.
  <variant>-lora64  the variant with a random rank-64 LoRA on every linear of the model (bench_lora.write_lora,
               a safetensors file written here, same seed for every variant): pack variants apply it with the
               pack's dynamic LoRA (lora/dynamic.py, as "Load LoRA (INT8 dynamic)" does), bf16 with ComfyUI's
               own LoRA patching (merged into the BF16 weights on load: the reference for the LoRA rows' SQNR).
               Rows report ``lora_overhead``, the step's time over the same variant without the LoRA.

One variant is resident at a time. Reported: median step ms (7 runs after 2 warm-ups), speed-up over
BF16, weight GB, peak GB allocated during a step (weights + activations), SQNR of the output vs BF16 (for
``-lora64`` variants: vs ``bf16-lora64``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

from ..kernels import direct
from . import common, flux2_model

BASE_VARIANTS = ("bf16", "fp8-fast", "comfy-int8", "pack-row", "pack-tensor", "pack-row-graphq", "pack-row-unfused",
                 "pack-convrot", "pack-row-attn16", "pack-row-attn8")
ATTENTION = {"pack-row-attn16": "bf16", "pack-row-attn8": "8-bit"}  # variant -> LoadOptions.attention (else auto)
LORA_SUFFIX, LORA_RANK = "-lora64", 64
VARIANTS = BASE_VARIANTS + tuple(f"{v}{LORA_SUFFIX}" for v in ("bf16", "pack-row", "pack-row-unfused"))


def split_lora(variant: str) -> tuple[str, int]:
    """(base variant, LoRA rank; 0 without a LoRA)."""
    if variant.endswith(LORA_SUFFIX):
        return variant[: -len(LORA_SUFFIX)], LORA_RANK
    return variant, 0


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build(variant: str, cfg: flux2_model.Flux2Config):
    """The variant's ModelPatcher, built from the seeded random BF16 weights (made afresh and freed)."""
    base, rank = split_lora(variant)
    device = _device()
    sd = flux2_model.random_state_dict(cfg, device)
    patcher = _build(base, sd, device)
    if rank:
        patcher = with_lora(patcher, sd, rank, pack=base.startswith("pack-"))
    return patcher


def with_lora(patcher, sd: dict, rank: int, pack: bool, device=None):
    """``patcher`` with a random rank-``rank`` LoRA on every linear of ``sd`` (``bench_lora.write_lora``, seeded by
    the rank), written as a safetensors file: the pack's dynamic LoRA (``lora/dynamic.apply``) for pack variants,
    ComfyUI's LoRA patches for the others."""
    import comfy.lora
    import comfy.utils

    from ..lora import dynamic, loading
    from .bench_lora import write_lora

    with tempfile.TemporaryDirectory() as folder:
        path = write_lora(sd, rank, folder, seed=rank, device=device)
        if pack:
            clone, reports = dynamic.apply(patcher, [loading.LoraSpec(path)])
            print(f"dynamic LoRA: {reports[0].summary()}")
            return clone
        clone = patcher.clone()
        key_map = comfy.lora.model_lora_keys_unet(clone.model, {})
        clone.add_patches(comfy.lora.load_lora(comfy.utils.load_torch_file(path), key_map), 1.0)
        return clone


def _build(variant: str, sd: dict, device: str):
    from ..ops import loader
    from ..ops.config import ConvertOptions

    if variant == "bf16":
        return flux2_model.load_bf16(sd, device)
    if variant == "fp8-fast":
        return flux2_model.load_fp8_fast(sd, device)
    if variant.startswith("pack-"):
        convert = ConvertOptions(per_row=variant != "pack-tensor", rotate_group=256 if variant == "pack-convrot" else 0)
        options = loader.LoadOptions(convert=convert, quant_in_graph=variant == "pack-row-graphq",
                                     fused_blocks=variant != "pack-row-unfused",
                                     attention=ATTENTION.get(variant, "auto"))
        return flux2_model.load_int8(sd, device, options)
    if variant == "comfy-int8":
        pack = flux2_model.load_int8(sd, device)
        del sd
        nsd, header = loader.native_state_dict(pack)  # ComfyUI's loader copies these into its own layers
        del pack
        return flux2_model.load_comfy_int8(nsd, header, device)
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def step_inputs(cfg: flux2_model.Flux2Config, res: int, text: int = 512):
    """(x, sigma, conditioning kwargs of ``apply_model``) for one step at ``res`` x ``res``."""
    x, t, ctx = flux2_model.inputs(cfg, _device(), image=res, text=text)
    return x.float(), t.float(), {"c_crossattn": ctx}


def step(patcher, inputs) -> torch.Tensor:
    """One denoising step the way ComfyUI's samplers call the model (wrappers included).

    ``inputs``: (x, sigma, conds), conds the keyword arguments of ``BaseModel.apply_model`` (c_crossattn and
    whatever the model's ``extra_conds`` adds). The model is loaded (``load_models_gpu``) only when it is not loaded
    already, as a sampler does once per run (``comfy.sampler_helpers.prepare_sampling``), not per step: reloading a
    loaded model unpatches and re-applies its object patches (the fused blocks' and every dynamic LoRA term's),
    host time a real step does not pay (bench/NOTES.md item 35)."""
    import comfy.model_management
    import comfy.patcher_extension

    if not any(m is patcher for m in comfy.model_management.loaded_models()):
        comfy.model_management.load_models_gpu([patcher])
    x, sigma, conds = inputs
    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
    with torch.inference_mode():
        return patcher.model.apply_model(x, sigma, transformer_options=options, **conds)


def measure(patcher, inputs, reps: int = 7, warmup: int = 2, baseline: int = 0, power_s: float = 2.5,
            before_timing: Callable[[], object] | None = None, settle: common.HostSettle | None = None) -> dict:
    """Median step ms, first-call s, peak GB, and the median SM clock and board power while steps run back to
    back for ``power_s`` seconds after the timed ones (``bench/NOTES.md`` item 13: 8-bit GEMMs alone hold an
    H200 at its power cap); ``baseline``: bytes allocated before the variant was built (graphs compiled for
    earlier variants can keep their models alive; they are not this variant's peak). ``before_timing`` runs after
    the first call and the warm-up steps, before the timed ones (``bench_arch --overlap`` waits there for its turn).
    ``runs_cpu`` / ``runs_numa`` / ``runs_mhz``: the CPU each timed step ended on, its NUMA node and clock;
    ``runs_host_us``: ``common.host_us`` right after each timed step (bench/NOTES.md item 87); ``runs_sys``: each
    timed step's ``common.cpu_moved`` (the thread's CPU share and preemptions, the host's busy CPUs and steal time:
    item 88); ``settle``: wait for the host's speed first (``common.settle_host``; what it did in ``host_settle``,
    None without), and time the steps again, up to ``settle.retimes`` times, when the host's slow mode stretched
    some of them anyway (``common.slow_host_runs``); ``retimed``: the attempts set aside (``runs_ms``,
    ``runs_host_us``, ``slow_runs``, ``host_settle``), the row's runs being the last. Dynamo's counters
    (``dynamo_counts``): ``dynamo`` what moved from the first call through the timed steps (frames
    compiled, graphs, graph breaks, recompile limits hit), ``runs_dynamo`` what moved in each timed step (empty
    where the step ran the graphs already compiled: a compiled row whose steps spread shows a recompile there)."""
    dynamo_start = dynamo_counts()
    t0 = time.perf_counter()
    y = step(patcher, inputs).float()
    common.sync()
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step(patcher, inputs)
    common.sync()
    if before_timing is not None:
        before_timing()
    # after the turn is granted: nothing else of the benchmark runs on the host while it settles
    host_settle = common.settle_host(settle) if settle is not None else None
    runs, retimed = _timed_steps(patcher, inputs, reps), []
    while settle is not None and len(retimed) < settle.retimes:
        slow = common.slow_host_runs(runs["runs_ms"], runs["runs_host_us"], settle)
        if not slow:
            break
        # the slow mode started after the settle: keep these steps for the record, wait until the host is out of it
        # (against the fastest probe seen, in case the reference was taken in the slow mode; within the bound that
        # marked the slow steps, as normal-mode probes spread more than the settle's tolerance) and time them again
        retimed.append({"runs_ms": runs["runs_ms"], "runs_host_us": runs["runs_host_us"], "slow_runs": slow,
                        "host_settle": host_settle})
        settle = dataclasses.replace(settle, reference_us=min([settle.reference_us, *runs["runs_host_us"]]),
                                     tolerance=max(settle.tolerance, settle.slow))
        host_settle = common.settle_host(settle)
        runs = _timed_steps(patcher, inputs, reps)
    power = {}
    if torch.cuda.is_available() and power_s > 0:
        sampler, n = common.PowerSampler(), 0
        end = time.perf_counter() + power_s
        while time.perf_counter() < end:
            step(patcher, inputs)
            n += 1
            if n % 2 == 0:
                common.sync()  # the host stays within two steps of the GPU
        common.sync()
        power = sampler.stop() or {}
    peak = None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        step(patcher, inputs)
        common.sync()
        peak = (torch.cuda.max_memory_allocated() - baseline) / 1e9
    return {"ms": common.median(runs["runs_ms"]), **runs, "host_settle": host_settle, "retimed": retimed,
            "dynamo": counts_moved(dynamo_start, dynamo_counts()),
            "first_call_s": first_s, "peak_gb": peak,
            "sm_mhz": power.get("sm_mhz"), "watts": power.get("watts"),
            "clock_event_reasons": power.get("clock_event_reasons"), "y": y}


def _timed_steps(patcher, inputs, reps: int) -> dict[str, list]:
    """``reps`` timed steps back to back, and beside each (outside its time) what explains a spread: the ``runs_*``
    lists of ``measure``."""
    times, launch_path, gc_ms, runs_dynamo, runs_cpu, runs_host_us, runs_mhz, runs_sys = [], [], [], [], [], [], [], []
    for _ in range(reps):
        common.sync()
        before, dynamo_before = direct.counts(), dynamo_counts()
        with _gc_time() as gc_s:
            cpu_before = common.cpu_counters()
            t0 = time.perf_counter()
            step(patcher, inputs)
            common.sync()
            times.append((time.perf_counter() - t0) * 1e3)
            runs_sys.append(common.cpu_moved(cpu_before, common.cpu_counters()))
        runs_cpu.append(common.current_cpu())  # the host's slow mode against where the thread ran (item 87)
        # and against the host's speed at a tiny CPU op right after the step (outside its time): a slow step with a
        # slow probe is the CPU; with a normal probe, something CUDA-side
        runs_host_us.append(common.host_us(calls=300, rounds=3))
        runs_mhz.append(common.cpu_mhz(runs_cpu[-1]))
        gc_ms.append(round(gc_s[0] * 1e3, 2))
        launch_path.append({k: v - before[k] for k, v in direct.counts().items() if v != before[k]})
        runs_dynamo.append(counts_moved(dynamo_before, dynamo_counts()))
    return {"runs_ms": times, "runs_gc_ms": gc_ms, "runs_launch_path": launch_path, "runs_cpu": runs_cpu,
            "runs_numa": [common.numa_node(c) for c in runs_cpu], "runs_host_us": runs_host_us, "runs_mhz": runs_mhz,
            "runs_sys": runs_sys, "runs_dynamo": runs_dynamo}


def dynamo_counts() -> dict[str, int]:
    """Dynamo's counters (``torch._dynamo.utils.counters``) as ``{"group/first line of the key": count}``: a frame
    compiled adds ``frames/total``, a graph ``stats/unique_graphs``, a recompile limit hit an ``unimplemented`` line."""
    from torch._dynamo.utils import counters

    return {f"{group}/{key.splitlines()[0] if isinstance(key, str) else key}": n
            for group, c in counters.items() for key, n in c.items()}


def counts_moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counts of ``after`` that differ from ``before``'s, as differences."""
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


@contextlib.contextmanager
def _gc_time():
    """Seconds the garbage collector ran within the block (``gc.callbacks``), as a one-element list filled in."""
    total, started = [0.0], []

    def track(phase, info):
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            total[0] += time.perf_counter() - started.pop()

    gc.callbacks.append(track)
    try:
        yield total
    finally:
        gc.callbacks.remove(track)


def _free() -> None:
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def node_guard_filter():
    """The TorchCompileModel node's ``guard_filter_fn`` (no guards on transformer_options, which change per step),
    or the same rule where importing the node module fails: it pulls in ComfyUI's whole node API (PyAV and more),
    which the GPU machine lacks."""
    try:
        from comfy_extras.nodes_torch_compile import skip_torch_compile_dict
    except ImportError:
        def skip_torch_compile_dict(guard_entries):
            return [("transformer_options" not in entry.name) for entry in guard_entries]
    return skip_torch_compile_dict


def compiled(patcher, backend: str = "inductor", guard_filter=None):
    """What the stock TorchCompileModel node returns (``backend``: the node's choice, inductor by default);
    ``guard_filter``: another ``guard_filter_fn`` than the node's (``guard_report`` records what it is shown)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    clone = patcher.clone(disable_dynamic=True)
    set_torch_compile_wrapper(model=clone, backend=backend,
                              options={"guard_filter_fn": guard_filter or node_guard_filter()})
    return clone


def _ref_path(ref_dir: str, model: str, res: int, rank: int = 0) -> str:
    return os.path.join(ref_dir, f"ref-{model}-{res}{f'-lora{rank}' if rank else ''}.pt")


def run(models: list[str], resolutions: list[int], variants: list[str], compile_: bool,
        ref_dir: str | None = None, settle: common.HostSettle | None = None) -> list[dict]:
    """Rows of measurements (speed-ups added by ``add_ratios``). ``ref_dir``: where BF16 eager outputs are
    saved, and read back by runs of other variants (``--isolate`` runs each variant in its own process).
    ``settle``: each row waits for the host's normal speed before its timed steps (``common.settle_host``)."""
    from ..ops import native

    rows = []
    for name in models:
        cfg = flux2_model.CONFIGS[name]
        reference: dict[tuple[int, int], torch.Tensor] = {}  # (res, LoRA rank) -> the BF16 eager output
        if ref_dir:
            for res in resolutions:
                for rank in (0, LORA_RANK):
                    if os.path.exists(_ref_path(ref_dir, name, res, rank)):
                        reference[res, rank] = torch.load(_ref_path(ref_dir, name, res, rank)).to(_device())
        for variant in variants:
            baseline = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
            if baseline > 1 << 28:
                print(f"note: {baseline / 1e9:.2f} GB still allocated from earlier variants (not counted in peak)")
            patcher = build(variant, cfg)
            weights = flux2_model.weight_bytes(patcher) / 1e9
            modes = [("eager", patcher)]
            if compile_:
                modes.append(("compile", compiled(patcher)))
            for mode, model in modes:
                for res in resolutions:
                    if mode == "compile":
                        torch._dynamo.reset()
                    out = measure(model, step_inputs(cfg, res), baseline=baseline, settle=settle)
                    y = out.pop("y")
                    base, rank = split_lora(variant)
                    if base == "bf16" and mode == "eager":
                        reference[res, rank] = y
                        if ref_dir:
                            torch.save(y.cpu(), _ref_path(ref_dir, name, res, rank))
                    ref = reference.get((res, rank))
                    sqnr = None if ref is None else common.sqnr_db(ref, y)
                    row = {"model": cfg.name, "res": res, "variant": variant, "mode": mode, "weights_gb": weights,
                           "sqnr_vs_bf16": sqnr, **out}
                    rows.append(row)
                    print(f"{cfg.name} {res}x{res} {variant:<12} {mode:<8} {row['ms']:8.1f} ms "
                          f"({' '.join(f'{t:.1f}' for t in row['runs_ms'])})  weights "
                          f"{weights:5.2f} GB  peak {row['peak_gb'] or 0:5.2f} GB  first call "
                          f"{row['first_call_s']:.1f} s  SQNR {sqnr if sqnr is not None else float('nan'):5.1f} dB  "
                          f"SM {row['sm_mhz'] or 0:.0f} MHz {row['watts'] or 0:.0f} W"
                          + (f"  {common.settle_note(row['host_settle'])}" if row["host_settle"] else "")
                          + (f"  {common.retimed_note(row['retimed'])}" if row["retimed"] else ""),
                          flush=True)
            del patcher, modes, model
            torch._dynamo.reset()  # compiled graphs hold the module: drop them before the next variant
            native.install()  # undo comfy-int8's switch (a no-op when the pack's hook is already in place)
            _free()
    return rows


def add_ratios(rows: list[dict]) -> list[dict]:
    """Speed-ups over BF16 and over ComfyUI's INT8 of the same model, resolution and mode."""
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["res"] == row["res"]
                     and r["variant"] == "bf16" and r["mode"] == row["mode"]), None)
        row["x_bf16"] = base["ms"] / row["ms"] if base else None
        native_row = next((r for r in rows if r["model"] == row["model"] and r["res"] == row["res"]
                           and r["variant"] == "comfy-int8" and r["mode"] == row["mode"]), None)
        row["x_comfy_int8"] = native_row["ms"] / row["ms"] if native_row else None
        base, rank = split_lora(row["variant"])
        without = next((r for r in rows if r["model"] == row["model"] and r["res"] == row["res"]
                        and r["variant"] == base and r["mode"] == row["mode"]), None) if rank else None
        row["lora_overhead"] = row["ms"] / without["ms"] - 1 if without else None
    return rows


def run_isolated(args) -> list[dict]:
    """Each variant in a fresh process: graphs compiled for one variant can keep its model and guards alive
    in the process (peak memory and guard time of the next variant would include them)."""
    rows = []
    # the host's speed before any variant built: what each child waits for (item 88)
    settle = common.settle_child_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:  # bf16 first when listed: the others read its outputs for SQNR
            out = os.path.join(tmp, f"{variant}.json")
            cmd = [sys.executable, "-m", __spec__.name, "--models", *args.models, "--res", *map(str, args.res),
                   "--variants", variant, "--ref-dir", tmp, "--rows-out", out, *settle] \
                + (["--compile"] if args.compile else [])
            subprocess.run(cmd, check=True)
            with open(out) as f:
                rows += json.load(f)
    order = {v: i for i, v in enumerate(args.variants)}
    rows.sort(key=lambda r: (r["model"], r["res"], order[r["variant"]], r["mode"] != "eager"))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | res | variant | mode | step ms | x BF16 | x ComfyUI INT8 | LoRA +% | weights GB | peak GB | "
             "SQNR dB |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        lines.append(f"| {r['model']} | {r['res']} | {r['variant']} | {r['mode']} | {r['ms']:.1f} | "
                     f"{fmt(r['x_bf16'], '.2f')} | {fmt(r['x_comfy_int8'], '.2f')} | "
                     f"{fmt(None if r.get('lora_overhead') is None else 100 * r['lora_overhead'], '+.1f')} | "
                     f"{r['weights_gb']:.2f} | "
                     f"{fmt(r['peak_gb'], '.2f')} | {fmt(r['sqnr_vs_bf16'], '.1f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["klein9b", "klein4b"], choices=sorted(flux2_model.CONFIGS))
    parser.add_argument("--res", type=int, nargs="+", default=[1024])
    parser.add_argument("--variants", nargs="+", default=list(BASE_VARIANTS[:5]), choices=VARIANTS)
    parser.add_argument("--compile", action="store_true", help="also run under the stock TorchCompileModel node")
    parser.add_argument("--out", default=None)
    parser.add_argument("--isolate", action="store_true", help="run each variant in its own process")
    parser.add_argument("--ref-dir", default=None, help=argparse.SUPPRESS)  # used by --isolate's children
    parser.add_argument("--rows-out", default=None, help=argparse.SUPPRESS)
    common.add_settle_args(parser)
    args = parser.parse_args(argv)
    if args.isolate:
        rows = add_ratios(run_isolated(args))
        print(table(rows))
        if args.out:
            common.write_json(args.out, {"env": common.environment(), "rows": rows})
        return
    logging.basicConfig(level=logging.WARNING)
    for name in ("int8_w8a8.ops.blocks.attention_choice", "int8_w8a8.kernels.attention"):
        logging.getLogger(name).setLevel(logging.INFO)  # which attention the fused blocks ran, once per choice
    settle = common.settle_from_args(args)
    flux2_model.setup_comfyui(cpu=not torch.cuda.is_available())
    from ..ops import native

    native.install()  # as in ComfyUI with the pack installed; comfy-int8 switches it off for its own load
    rows = run(args.models, args.res, args.variants, args.compile, args.ref_dir, settle)
    if args.rows_out:
        with open(args.rows_out, "w") as f:
            json.dump(rows, f)
        return
    rows = add_ratios(rows)
    print(table(rows))
    if args.out:
        common.write_json(args.out, {"env": common.environment(), "rows": rows})


if __name__ == "__main__":
    main()
