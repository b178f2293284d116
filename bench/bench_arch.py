"""One diffusion step of every supported architecture inside ComfyUI: BF16, FP8, ComfyUI's INT8 and the pack (GPU).

    python -m int8_w8a8.bench.bench_arch [--models zimage chroma ...] [--variants ...] [--modes eager compile]
        [--out results.json] [--native-file auto|file|memory] [--tiny] [--no-isolate]
    python -m int8_w8a8.bench.bench_arch --modes eager-dvram ...   (ComfyUI's DynamicVRAM, on its own; GPU +
        comfy-aimdo: weights in host memory, staged in VRAM as layers run; BF16, FP8 fast and pack-convert[-qt])
    python -m int8_w8a8.bench.bench_arch --merge a.json b.json --out all.json

Models come from ``bench/arch_models.py`` (one table: FLUX.2 klein 9B/4B, Z-Image Turbo, Chroma1-HD,
Qwen-Image 20B, Wan 2.1/2.2 14B T2V at 832x480x33), built by ComfyUI's detection and loader from random
BF16 weights made on the GPU. A step is ``BaseModel.apply_model`` with the conditioning the model's
``extra_conds`` makes, the patcher's wrappers included (``bench_model.step``), so the stock
TorchCompileModel path (``--modes compile``) works as in a workflow. Variants, all from the same weights:

  bf16          ComfyUI's stock loader (its compute dtype: Wan runs in float16 on NVIDIA GPUs, as ComfyUI picks)
  fp8-fast      stock loader, weight_dtype fp8_e4m3fn_fast (FP8 weights, torch._scaled_mm)
  comfy-int8    a native int8_tensorwise state dict on ComfyUI's own layout and comfy-kitchen's kernels
  pack-native   the pack's loader reading a native int8_tensorwise file written by the pack's writer
                (``loader.save_model`` / ``loader.load_file``); when the file would not fit comfortably
                (``--native-file auto``: over NATIVE_FILE_MAX_GB or a quarter of free disk or RAM) the same
                state dict and header go through the same reader (formats.normalize + loader.build) from
                host memory instead; the row's ``native_source`` says which
  pack-convert  the pack's loader converting the BF16 weights on load (on the GPU, layer by layer)
  stock-native  (not in the defaults) ComfyUI's stock loader on the native state dict with the pack installed:
                ComfyUI's mixed-precision layers on the pack's layout (what "Load Diffusion Model" gives)
  pack-native-cpu-offload  (not in the defaults) pack-native with ComfyUI's default offload device (the CPU)
                instead of the GPU every other variant is given, as the native rows ran until 2026-12-02
  pack-convert-qt  (not in the defaults) pack-convert with ``LoadOptions(traced_weights=False)``: compiled graphs
                read the QuantizedTensor weights, as before bench/NOTES.md item 51 (eager runs are the same)
  pack-convert-opt  (not in the defaults) pack-convert with ``LoadOptions(quantize_extra_blocks=True)``: the layers
                the profile keeps only by convention are converted too (Z-Image's refiners; other models: as
                pack-convert)
  pack-convert-attn8  (not in the defaults) pack-convert with ``LoadOptions(attention="8-bit")``: the fused blocks'
                attention is the pack's 8-bit one (``kernels.attention_8bit``: its quantization pass, then the
                Triton kernel on Hopper)
  pack-convert-glugemm  (not in the defaults) pack-convert with the SwiGLU GEMM on (``INT8_W8A8_GLU_GEMM=1`` for
                the variant's build and steps): a SwiGLU MLP's gate and up as one GEMM writing silu(g) * u on
                Hopper's large-M row (bench/NOTES.md items 89-90), for an A/B in one call
  pack-convert-nogluon  (not in the defaults) pack-convert with ``INT8_W8A8_DISABLE_GLUON=1``: Hopper's large-M
                GEMMs on ``HOPPER_TABLE``'s warp-specialized row instead of the Gluon one (bench/NOTES.md item 92)
  pack-convert-gluon128  (not in the defaults) pack-convert with ``INT8_W8A8_DISABLE_GLUON_XL=1``: past 8192 rows
                the 128-wide Gluon row instead of the 256-wide one (``configs.HOPPER_GLUON_XL``), for an A/B in one call
  bf16-lora64, pack-convert-lora64  (not in the defaults) with a random rank-64 LoRA on every linear
                (``bench_model.with_lora``): ComfyUI's LoRA patches (merged on load) for bf16, the pack's dynamic
                LoRA for the pack (as "Load LoRA (INT8 dynamic)" applies it); their SQNR is against bf16-lora64
                eager, their x BF16 / x FP8 against the -lora64 rows of those, and ``lora_overhead`` is the step
                over the same variant without the LoRA (issue 13: at most 15 % on every architecture)

Each (architecture, variant) runs in its own process (``--no-isolate``: one process, for smoke runs);
the BF16 process saves its eager output for the others' SQNR. ``--overlap`` starts one architecture's processes
together (``bench/turns.py``): builds one at a time, compiles and warm-ups concurrently, each row's timed steps and
profile while every other process waits, so a compiled pair of a large model takes about its longest compile
instead of the sum (the rows' ``first_call_s`` then includes the others' load on the CPU: ``overlapped_setup``).
Reported per row: median step ms (after warm-up), the speed-up over BF16, FP8 fast and ComfyUI's INT8 of the same
mode, SQNR vs BF16 eager, weight GB, peak GB, and ``device_ms``: the summed kernel time of one step under
torch.profiler (``profile_step.profile``), so a step whose device time is well below its wall time is host-bound.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import torch

from ..kernels.dispatch import DISABLE_GLUON_ENV, DISABLE_GLUON_XL_ENV, GLU_GEMM_ENV
from . import arch_models, bench_model, common, flux2_model, profile_step, turns

VARIANTS = ("bf16", "fp8-fast", "comfy-int8", "pack-native", "pack-convert", "stock-native", "pack-native-cpu-offload",
            "pack-convert-qt", "pack-convert-opt", "pack-convert-attn8", "pack-convert-glugemm",
            "pack-convert-nogluon", "pack-convert-gluon128")
DEFAULT_VARIANTS = VARIANTS[:5]
LORA_VARIANTS = tuple(f"{v}{bench_model.LORA_SUFFIX}" for v in ("bf16", "pack-convert"))
MODES = ("eager", "compile", "eager-dvram")
# the ones eager-dvram builds
DVRAM_VARIANTS = ("bf16", "fp8-fast", "pack-convert", "pack-convert-qt", "pack-convert-opt", "pack-convert-glugemm")
# the pack-convert variants: their LoadOptions
_CONVERT_OPTIONS = {"pack-convert": {}, "pack-convert-qt": {"traced_weights": False},
                    "pack-convert-opt": {"quantize_extra_blocks": True}, "pack-convert-attn8": {"attention": "8-bit"},
                    "pack-convert-glugemm": {}, "pack-convert-nogluon": {}, "pack-convert-gluon128": {}}
# the variants run with these environment variables set (the kernels' A/B switches, read when a block runs or traces)
_VARIANT_ENV = {"pack-convert-glugemm": {GLU_GEMM_ENV: "1"}, "pack-convert-nogluon": {DISABLE_GLUON_ENV: "1"},
                "pack-convert-gluon128": {DISABLE_GLUON_XL_ENV: "1"}}
# an isolated eager-dvram child loads comfy-aimdo's library before torch initializes CUDA, as ComfyUI's main.py does
_AIMDO_BOOT = ("import runpy, sys\nimport comfy_aimdo.control\ncomfy_aimdo.control.init()\n"
               "sys.argv[0] = 'bench_arch'\nrunpy.run_module('int8_w8a8.bench.bench_arch', run_name='__main__')\n")
# A native file larger than this is not written to disk by --native-file auto: writing and reading back
# 14-20 GB (Wan, Qwen-Image) costs a minute of the GPU machine's time per variant.
NATIVE_FILE_MAX_GB = 10.0


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _available_ram() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def native_route(nbytes: int, choice: str, folder: str) -> str:
    """Where the pack-native variant's state dict goes between writer and reader: "file" or "memory"."""
    if choice != "auto":
        return choice
    room = min(NATIVE_FILE_MAX_GB * 1e9, shutil.disk_usage(folder).free / 4, _available_ram() / 4)
    return "file" if nbytes <= room else "memory"


def _state_dict_bytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values() if isinstance(t, torch.Tensor))


def build(variant: str, arch: arch_models.Arch, tiny: bool, native_file: str = "auto", folder: str | None = None,
          dynamic: bool = False):
    """(ModelPatcher, info) for one variant, from the seeded random BF16 weights (made afresh and freed).

    ``info``: ``native_source`` ("file"/"memory") for the variants that read a native state dict. ``dynamic``: loaded
    for DynamicVRAM (``flux2_model.enable_dynamic_vram`` first; ``DVRAM_VARIANTS`` only)."""
    import comfy.sd

    from ..ops import formats, loader

    device = _device()
    sd = arch_models.random_state_dict(arch, tiny, device)
    if not tiny:
        arch_models.check_detection(arch, sd)
    info = {"native_source": None}
    if dynamic and variant not in DVRAM_VARIANTS:
        raise ValueError(f"variant {variant!r} has no DynamicVRAM build; eager-dvram runs {DVRAM_VARIANTS}")
    with arch_models.detection(arch, tiny):
        if variant == "bf16":
            return flux2_model.load_bf16(sd, device, dynamic), info
        if variant == "fp8-fast":
            return flux2_model.load_fp8_fast(sd, device, dynamic), info
        if variant in _CONVERT_OPTIONS:
            options = loader.LoadOptions(**_CONVERT_OPTIONS[variant])
            return flux2_model.load_int8(sd, device, options, source=f"random {arch.title}", dynamic=dynamic), info
        if variant not in ("comfy-int8", "pack-native", "stock-native", "pack-native-cpu-offload"):
            raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
        pack = flux2_model.load_int8(sd, device, source=f"random {arch.title}")
        del sd
        if variant == "comfy-int8":
            nsd, header = loader.native_state_dict(pack)  # ComfyUI's loader copies these into its own layers
            del pack
            return flux2_model.load_comfy_int8(nsd, header, device), info
        source = f"random {arch.title} (native INT8)"
        # load and offload device as every other variant (the GPU), except pack-native-cpu-offload: ComfyUI's
        # default offload device (the CPU), as a user's load has it
        opts = flux2_model._options(device)
        if variant == "pack-native-cpu-offload":
            variant, opts = "pack-native", {"load_device": torch.device(device)}
        folder = folder or tempfile.gettempdir()
        nsd, header = loader.native_state_dict(pack)
        route = native_route(_state_dict_bytes(nsd), native_file, folder)
        info["native_source"] = route
        if route == "file":  # the pack's writer and reader, as a user saves and loads the file
            path = os.path.join(folder, f"int8_w8a8-bench-{arch.key}-{os.getpid()}.safetensors")
            del nsd
            loader.save_model(pack, path)
            del pack
            _free()
            try:
                sd, header = loader.read_file(path)
                if variant == "pack-native":
                    nsd, report = formats.normalize(sd, header, source)
                    patcher = loader.build(nsd, report, loader.LoadOptions(), source, model_options=opts,
                                           disable_dynamic=True)
                else:
                    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=opts, metadata=header,
                                                                       disable_dynamic=True)
            finally:
                os.remove(path)
            return patcher, info
        # the same state dict in host memory, as the reader gets it from a file (CPU tensors)
        nsd = {k: v.to("cpu") if isinstance(v, torch.Tensor) else v for k, v in nsd.items()}
        del pack
        _free()
        if variant == "pack-native":
            nsd, report = formats.normalize(nsd, header, source)
            return loader.build(nsd, report, loader.LoadOptions(), source, model_options=opts,
                                disable_dynamic=True), info
        return comfy.sd.load_diffusion_model_state_dict(nsd, model_options=opts, metadata=header,
                                                        disable_dynamic=True), info


@contextlib.contextmanager
def variant_env(variant: str):
    """``variant``'s environment (``_VARIANT_ENV``) set for its build and rows, the previous values restored after."""
    env = _VARIANT_ENV.get(bench_model.split_lora(variant)[0], {})
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free() -> None:
    bench_model._free()


def _dtype_of(patcher) -> str:
    model = patcher.model
    return str(model.manual_cast_dtype or model.get_dtype()).replace("torch.", "")


def layer_states(patcher) -> dict:
    """The model's Linear layers after a step: how many, how many hold INT8 weights, and how many of the pack's
    ``Int8Linear`` layers take ComfyUI's cast path on every call instead of the resident plan (partially
    loaded or offloaded, or with weight functions; None for models without the pack's layers): a pack
    variant slower than its kernels explain shows here."""
    from ..ops import layout
    from ..ops.comfy_ops import Int8Linear

    linears = [m for m in patcher.model.diffusion_model.modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2
               and hasattr(m, "comfy_cast_weights")]
    pack = [m for m in linears if isinstance(m, Int8Linear)]
    return {"linear_layers": len(linears), "int8_layers": sum(layout.is_int8_weight(m.weight) for m in linears),
            "pack_cast_layers": sum(bool(m.comfy_cast_weights or m.weight_function or m.bias_function)
                                    for m in pack) if pack else None}


def _ref_path(ref_dir: str, arch: str, res: str, rank: int = 0) -> str:
    return os.path.join(ref_dir, f"ref-{arch}-{res}{f'-lora{rank}' if rank else ''}.pt")


def _load_ref(refs: dict, ref_dir: str | None, arch: str, res: str, rank: int, device: str) -> torch.Tensor | None:
    """``refs[rank]``, the BF16 eager output, loaded from ``ref_dir`` where the BF16 process saved it (None while
    there is none)."""
    if rank not in refs and ref_dir and os.path.exists(_ref_path(ref_dir, arch, res, rank)):
        refs[rank] = torch.load(_ref_path(ref_dir, arch, res, rank)).to(device)
    return refs.get(rank)


def _with_lora(patcher, arch: arch_models.Arch, tiny: bool, rank: int, pack: bool):
    """``patcher`` with the seeded random rank-``rank`` LoRA on every linear (names and shapes from the meta model)."""
    shapes = arch_models.meta_model(arch.unet_config(tiny)).state_dict()
    return bench_model.with_lora(patcher, shapes, rank, pack, device=_device())


def run(archs: list[str], variants: list[str], modes: list[str], tiny: bool = False, ref_dir: str | None = None,
        native_file: str = "auto", reps: int = 7, warmup: int = 2, power_s: float = 0.0,
        backend: str = "inductor", trace_dir: str | None = None, sections: turns.Turns | None = None,
        settle: common.HostSettle | None = None, scale: int = 1) -> list[dict]:
    """Rows of measurements in this process (ratios added by ``add_ratios``), each architecture's image ``scale``
    times wider and taller than its default (``StepShape.scaled``); ``trace_dir``: a gzipped Chrome trace
    of each row's gap-profiled step (host ops with Python frames, GPU activity) goes there. ``sections``: this
    process's end of ``turns.run`` (``--overlap``): each variant's build and each row's timed part (the timed steps,
    the peak-memory step, the profile) wait for their grants; None: no parent, nothing waits. ``settle``: each row
    waits for the host's normal speed before its timed steps (``common.settle_host``)."""
    from ..ops import native

    if "eager-dvram" in modes and len(modes) > 1:
        raise ValueError("eager-dvram builds the model for DynamicVRAM: run it alone (--modes eager-dvram)")
    dynamic = modes == ["eager-dvram"]
    sections = sections or turns.Turns()
    rows = []
    device = _device()
    for key in archs:
        arch = arch_models.ARCHS[key]
        shape = arch.step_shape(tiny, scale)
        refs: dict[int, torch.Tensor] = {}  # LoRA rank (0: none) -> BF16 eager output
        for variant in variants:
            with variant_env(variant):  # e.g. an A/B switch, read when the blocks run and trace
                base, rank = bench_model.split_lora(variant)
                _load_ref(refs, ref_dir, key, shape.res, rank, device)
                baseline = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
                with sections.section("build"):
                    patcher, info = build(base, arch, tiny, native_file, dynamic=dynamic)
                native.install()  # comfy-int8 switched the pack's layout hook off for its own load
                if rank:
                    patcher = _with_lora(patcher, arch, tiny, rank, pack=base.startswith("pack-"))
                inputs = arch_models.step_inputs(patcher, shape, device)
                weights = flux2_model.weight_bytes(patcher) / 1e9
                if base == "bf16" and not any(m.startswith("eager") for m in modes) and rank not in refs:
                    refs[rank] = bench_model.step(patcher, inputs).float()  # SQNR is always against BF16 eager
                    if ref_dir:
                        torch.save(refs[rank].cpu(), _ref_path(ref_dir, key, shape.res, rank))
                for mode in modes:
                    model = bench_model.compiled(patcher, backend) if mode == "compile" else patcher
                    torch._dynamo.reset()
                    held = contextlib.ExitStack()  # the timed section: from the first timed step to the row's print
                    with held:
                        timed = functools.partial(held.enter_context, sections.section("timed"))
                        out = bench_model.measure(model, inputs, reps=reps, warmup=warmup, baseline=baseline,
                                                  power_s=power_s, before_timing=timed, settle=settle)
                        y = out.pop("y")
                        if base == "bf16" and mode != "compile":
                            refs[rank] = y
                            if ref_dir:
                                torch.save(y.cpu(), _ref_path(ref_dir, key, shape.res, rank))
                        # again: with --overlap the BF16 process saves it in its timed section, which comes first
                        ref = _load_ref(refs, ref_dir, key, shape.res, rank, device)
                        trace = os.path.join(trace_dir, f"trace-{key}-{variant}-{mode}.json.gz") if trace_dir else None
                        prof = profile_step.profile(model, inputs, warmup=0, gaps=True, gaps_trace=trace)
                        row = {"model": arch.title, "arch": key, "res": shape.res, "variant": variant, "mode": mode,
                               "dtype": _dtype_of(patcher), "weights_gb": weights,
                               "sqnr_vs_bf16": None if ref is None else common.sqnr_db(ref, y),
                               "device_ms": prof["kernel_ms"], "profiled_wall_ms": prof["wall_ms"],
                               "families": {k: round(v["ms"], 3) for k, v in prof["families"].items()},
                               "top_kernels": prof["top"][:12], "idle": prof.get("idle"), **layer_states(patcher),
                               **info,
                               "overlapped_setup": sections.active, **out}
                        rows.append(row)
                        _print_row(row)
                    del model
                del patcher, inputs
                torch._dynamo.reset()  # compiled graphs hold the module: drop them before the next variant
                _free()
    return rows


def _print_row(row: dict) -> None:
    """A row as it is measured: step ms, its runs, device ms, memory, first call, SQNR; then what explains a spread
    (garbage collection, launch-path calls, Dynamo compiling in a timed step), Dynamo's totals for a compiled row,
    and where the GPU waited for the host."""
    print(f"{row['model']} {row['res']} {row['variant']:<12} {row['mode']:<7} {row['ms']:8.1f} ms "
          f"({' '.join(f'{t:.1f}' for t in row['runs_ms'])})  device {row['device_ms']:7.1f} ms  "
          f"weights {row['weights_gb']:5.2f} GB  peak {row['peak_gb'] or 0:5.2f} GB  first call "
          f"{row['first_call_s']:.1f} s{' (overlapped)' if row['overlapped_setup'] else ''}  "
          f"SQNR {_fmt(row['sqnr_vs_bf16'], '5.1f')} dB  {row['dtype']}"
          + (f"  native from {row['native_source']}" if row["native_source"] else ""), flush=True)
    if any(row.get("runs_gc_ms") or ()) or any(row.get("runs_launch_path") or ()) or any(row.get("runs_dynamo") or ()):
        # a timed step that collected garbage, took the launch path or compiled (bench_model.measure)
        print(f"    per run: gc ms {row['runs_gc_ms']}; launch-path calls {row['runs_launch_path']}; "
              f"dynamo {row['runs_dynamo']}", flush=True)
    if row["mode"] == "compile":  # what compiled from the first call on: graphs, breaks, recompile limits
        print(f"    dynamo: {row['dynamo']}", flush=True)
    if row.get("host_settle"):  # how long the row waited for the host's normal speed before its timed steps (item 88)
        print(f"    {common.settle_note(row['host_settle'])}", flush=True)
    if row.get("retimed"):  # earlier attempts at the timed steps that the host's slow mode stretched
        print(f"    {common.retimed_note(row['retimed'])}", flush=True)
    if row.get("runs_host_us"):  # the host's speed after each timed step, and where it ran (item 87)
        print(f"    per run host_us {row['runs_host_us']}; CPU {row['runs_cpu']}, NUMA node {row['runs_numa']}, MHz "
              f"{row.get('runs_mhz')}", flush=True)
    if row.get("runs_sys"):  # preempted, stolen or sharing the host in each timed step (item 88)
        print("    per run thread CPU % / busy CPUs / steal % / preempted: " + "  ".join(
            f"{s['thread_cpu_pct']}/{s['busy_cpus']}/{s['steal_pct']}/{s['nivcsw']}" for s in row["runs_sys"]),
            flush=True)
    idle = row.get("idle")
    if idle and idle["idle_ms"] is not None:  # where the GPU waited for the host (profile_step.idle_report)
        print(f"    GPU idle {idle['idle_ms']:.1f} ms after its first kernel ({idle['lead_ms']:.1f} ms before it); "
              f"syncs {idle['syncs'] or 'none'}; longest gaps "
              + ", ".join(f"{g['ms']:.2f} ms at {g['at_ms']:.1f} ms before {g['op']}" for g in idle["gaps"][:4]),
              flush=True)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def add_ratios(rows: list[dict]) -> list[dict]:
    """x_bf16, x_fp8, x_native: the speed-up over BF16, FP8 fast and ComfyUI's INT8 of the same architecture,
    resolution, mode and LoRA; busy: device ms / step ms (well below 1: the host, not the GPU, sets the pace);
    lora_overhead: a LoRA row's step over its variant's without the LoRA (``lora_base_ms``), minus 1 (None for other
    rows)."""
    by_key = {(r["arch"], r["res"], r["mode"], r["variant"]): r for r in rows}
    for row in rows:
        base_variant, rank = bench_model.split_lora(row["variant"])
        suffix = row["variant"][len(base_variant):]
        for name, variant in (("x_bf16", "bf16"), ("x_fp8", "fp8-fast"), ("x_native", "comfy-int8")):
            base = by_key.get((row["arch"], row["res"], row["mode"], variant + suffix))
            row[name] = base["ms"] / row["ms"] if base else None
        without = by_key.get((row["arch"], row["res"], row["mode"], base_variant)) if rank else None
        row["lora_overhead"] = row["ms"] / without["ms"] - 1 if without else None
        row["lora_base_ms"] = without["ms"] if without else None
        row["busy"] = row["device_ms"] / row["ms"] if row.get("device_ms") is not None else None
    return rows


# the exit code of a variant's process that ran out of GPU memory (EX_TEMPFAIL): under --overlap the parent runs it
# again alone once the others have exited (session 31: BF16 + Wan's native build + the converted pack exceed 80 GB)
OUT_OF_MEMORY_EXIT = 75


def rerun_out_of_memory(cmds: list[list[str]], codes: list[int], labels: list[str]) -> list[int]:
    """``codes`` of processes that ran together, with each one that exited with ``OUT_OF_MEMORY_EXIT`` run again
    alone (in order, one after the other) and its new code in its place; each rerun said on stdout."""
    codes = list(codes)
    for i, code in enumerate(codes):
        if code == OUT_OF_MEMORY_EXIT:
            print(f"{labels[i]}: out of GPU memory beside the other variants' processes; running it again alone",
                  flush=True)
            codes[i] = subprocess.run(cmds[i]).returncode
    return codes


def run_isolated(args) -> list[dict]:
    """Each (architecture, variant) in a fresh process: a process keeps compiled graphs, the caching
    allocator's blocks and Triton's state of earlier variants (see bench/NOTES.md item 12). With ``args.overlap``
    one architecture's processes start together and take turns (``turns.run``): builds one at a time, compiles
    and warm-ups concurrently, each timed section alone; a variant that runs out of GPU memory beside the others
    runs again alone after them (``rerun_out_of_memory``)."""
    if args.overlap and "eager-dvram" in args.modes:
        raise ValueError("--overlap does not apply to eager-dvram: DynamicVRAM sizes its staging from the free VRAM "
                         "the other processes would hold; run it without --overlap")
    rows = []
    ref_dir = args.ref_dir or tempfile.mkdtemp(prefix="int8_w8a8-arch-")
    # the host's speed before any variant built or compiled: what each child waits for (item 88)
    settle = common.settle_child_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            outs, cmds = [], []
            for variant in args.variants:  # bf16 first when listed: the others read its output for SQNR
                outs.append(os.path.join(tmp, f"{key}-{variant}.json"))
                head = [sys.executable, "-c", _AIMDO_BOOT] if "eager-dvram" in args.modes else \
                    [sys.executable, "-m", __spec__.name]
                cmds.append(head + ["--models", key, "--variants", variant,
                            "--modes", *args.modes, "--ref-dir", ref_dir, "--rows-out", outs[-1], "--no-isolate",
                            "--native-file", args.native_file, "--reps", str(args.reps), "--warmup", str(args.warmup),
                            "--power-s", str(args.power_s), "--backend", args.backend, "--scale", str(args.scale),
                            *settle]
                            + (["--tiny"] if args.tiny else [])
                            + (["--pin-gpu-cpus"] if args.pin_gpu_cpus else [])
                            + (["--trace-dir", args.trace_dir] if args.trace_dir else []))
            if args.overlap:
                codes = rerun_out_of_memory(cmds, turns.run(cmds), [f"{key} {v}" for v in args.variants])
            else:
                codes = [subprocess.run(cmd).returncode for cmd in cmds]
            for variant, out, code in zip(args.variants, outs, codes, strict=True):
                if code != 0:  # one failing variant (e.g. out of memory) does not lose the others
                    print(f"{key} {variant}: process failed with exit code {code}", flush=True)
                    continue
                with open(out) as f:
                    rows += json.load(f)
    if not args.ref_dir:
        shutil.rmtree(ref_dir, ignore_errors=True)
    return rows


def sort_rows(rows: list[dict]) -> list[dict]:
    arch_order = {k: i for i, k in enumerate(arch_models.ARCHS)}
    variant_order = {v: i for i, v in enumerate(VARIANTS + LORA_VARIANTS)}
    return sorted(rows, key=lambda r: (arch_order.get(r["arch"], 99), r["res"], MODES.index(r["mode"]),
                                       variant_order.get(r["variant"], 99)))


def table(rows: list[dict]) -> str:
    lines = ["| model | res | variant | mode | step ms | x BF16 | x FP8 | x native | SQNR dB | device ms | busy | "
             "weights GB | peak GB | dtype | native from | LoRA +% |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['res']} | {r['variant']} | {r['mode']} | {r['ms']:.1f} | "
                     f"{_fmt(r['x_bf16'], '.2f')} | {_fmt(r['x_fp8'], '.2f')} | {_fmt(r['x_native'], '.2f')} | "
                     f"{_fmt(r['sqnr_vs_bf16'], '.1f')} | {_fmt(r['device_ms'], '.1f')} | "
                     f"{_fmt(r['busy'] and 100 * r['busy'], '.0f')}% | {r['weights_gb']:.2f} | "
                     f"{_fmt(r['peak_gb'], '.2f')} | {r['dtype']} | {r.get('native_source') or '-'} | "
                     f"{_fmt(None if r.get('lora_overhead') is None else 100 * r['lora_overhead'], '+.1f')} |")
    return "\n".join(lines)


def merge(paths: list[str]) -> list[dict]:
    """Rows of several result files; a (arch, res, variant, mode) in several files is taken from the last. The
    speed-ups compare the latest row of each variant; a LoRA row's overhead stays the one measured against the
    row without the LoRA of its own run (steps of two runs differ by a few percent, as much as the overhead)."""
    by_key = {}
    for path in paths:
        with open(path) as f:
            rows = json.load(f)["rows"]
        kept = {id(row): row.get("lora_base_ms") for row in rows}  # set by an earlier merge: already its own run's
        for row in add_ratios(rows):
            base = kept[id(row)] or row.get("lora_base_ms")
            row["lora_base_ms"] = base
            by_key[(row["arch"], row["res"], row["variant"], row["mode"])] = row
    own = {key: row["lora_base_ms"] for key, row in by_key.items()}
    for row in add_ratios(list(by_key.values())):
        row["lora_base_ms"] = own[(row["arch"], row["res"], row["variant"], row["mode"])]
        row["lora_overhead"] = row["ms"] / row["lora_base_ms"] - 1 if row["lora_base_ms"] else None
    return sort_rows(list(by_key.values()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(arch_models.ARCHS), choices=list(arch_models.ARCHS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS + LORA_VARIANTS)
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=MODES)
    parser.add_argument("--native-file", default="auto", choices=("auto", "file", "memory"))
    parser.add_argument("--tiny", action="store_true", help="small widths (CPU smoke runs of the harness)")
    parser.add_argument("--no-isolate", action="store_true", help="all variants in this process")
    parser.add_argument("--overlap", action="store_true",
                        help="start one architecture's variant processes together: builds one at a time, compiles and "
                             "warm-ups concurrently, each row's timed steps while the others wait (bench/turns.py); "
                             "their models must fit in GPU memory together")
    parser.add_argument("--scale", type=int, default=1,
                        help="images this many times wider and taller (2: 2048x2048; Wan 1664x960x33)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--power-s", type=float, default=0.0, help="seconds of back-to-back steps with power sampled")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compile mode")
    parser.add_argument("--ref-dir", default=None, help="where BF16 eager outputs are kept (reused across runs)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--trace-dir", default=None, help="a gzipped Chrome trace of each row's step goes here")
    parser.add_argument("--pin-gpu-cpus", action="store_true",
                        help="each variant's process runs on the GPU's local CPUs only (its NUMA node; item 87)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge result files, print the table")
    parser.add_argument("--rows-out", default=None, help=argparse.SUPPRESS)  # used by the isolated children
    parser.add_argument("--turns", default=None, help=argparse.SUPPRESS)  # an --overlap child's pipes (turns.Turns)
    common.add_settle_args(parser)
    args = parser.parse_args(argv)
    if args.merge:
        rows = merge(args.merge)
        print(table(rows))
        if args.out:
            common.write_json(args.out, {"env": common.environment(), "rows": rows})
        return
    if args.ref_dir:
        os.makedirs(args.ref_dir, exist_ok=True)
    if not args.no_isolate:
        rows = sort_rows(add_ratios(run_isolated(args)))
    else:
        logging.basicConfig(level=logging.WARNING)
        pinned = common.pin_to_gpu_cpus() if args.pin_gpu_cpus else None
        if args.pin_gpu_cpus:
            print(f"pinned to the GPU's local CPUs {pinned}" if pinned else "--pin-gpu-cpus: the GPU's local CPUs "
                  "are unknown here (no CUDA device or no sysfs entry); not pinned", flush=True)
        settle = common.settle_from_args(args)
        flux2_model.setup_comfyui(cpu=not torch.cuda.is_available())
        if "eager-dvram" in args.modes:
            flux2_model.enable_dynamic_vram()
        from ..ops import native

        native.install()  # as in ComfyUI with the pack installed; comfy-int8 switches it off for its own load
        try:
            rows = run(args.models, args.variants, args.modes, args.tiny, args.ref_dir, args.native_file, args.reps,
                       args.warmup, args.power_s, args.backend, args.trace_dir, turns.Turns.from_arg(args.turns),
                       settle, args.scale)
        except torch.OutOfMemoryError as exc:
            if not args.rows_out:  # not a parent's child: nothing runs it again
                raise
            print(f"{' '.join(args.variants)}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            sys.exit(OUT_OF_MEMORY_EXIT)
        for row in rows:
            row["pinned_cpus"] = common.format_cpulist(pinned) if pinned else None
        if args.rows_out:
            with open(args.rows_out, "w") as f:
                json.dump(rows, f)
            return
        rows = sort_rows(add_ratios(rows))
    print(table(rows))
    if args.out:
        common.write_json(args.out, {"env": common.environment(), "rows": rows})


if __name__ == "__main__":
    main()
