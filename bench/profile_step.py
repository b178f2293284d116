"""Where one FLUX.2 klein step spends its GPU time, by kernel family (GPU).

    python -m int8_w8a8.bench.profile_step [--model klein9b] [--res 1024] [--variants bf16 pack-row]
        [--compile] [--out profile.json]

Builds each variant as bench_model does, runs two warm-up steps, then one step under
torch.profiler (CUDA activity only) and sums kernel time per family: INT8 GEMM and activation
quantization (the pack), cuBLAS/cuDNN GEMMs, attention, norms, element-wise work, copies/concats.
Also reports the step's wall time next to the summed kernel time, so host-bound steps show up
(kernel sum well below wall time), and the 15 most expensive kernels by name.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import time
from collections import defaultdict

import torch

from . import bench_model, common, flux2_model

# (family, substrings of the kernel name, any of which puts a kernel in it), first match wins. The fused
# block kernels fall into the families of the work they absorb: _norm_mod_quant_kernel -> norm,
# _qk_norm_rope_kernel -> rope, _glu_quant_kernel -> element-wise/other (the top-kernel list names them).
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pack int8 gemm", ("_gemm_tma_kernel", "_gemm_kernel")),
    ("pack act quant", ("_quantize_rows_kernel", "_quantize_row_block")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated")),
    ("gemm (cuBLAS/kitchen)", ("gemm", "xmma", "cutlass", "nvjet", "_scaled_mm", "int8_", "wgmma")),
    ("rope", ("rope",)),
    ("norm", ("layer_norm", "layernorm", "rms", "norm")),
    ("copy/cat", ("cat", "copy", "Copy", "transpose")),
    ("triton (inductor)", ("triton_",)),
)


def family(name: str) -> str:
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "element-wise/other"


def is_sync(name: str) -> bool:
    """A host call that waits for the GPU (a step making one idles the GPU while the host refills its queue): the
    CUDA runtime/driver synchronizations and the synchronous copies (``.item()``, ``.cpu()``, ``.tolist()``)."""
    return "Synchronize" in name or name in ("cudaMemcpy", "cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2", "cuMemcpy")


def idle_report(events, cuda_type, gap_us: float = 20.0, top: int = 8) -> dict:
    """Where the GPU idles in one profiled step (``events``: torch.profiler FunctionEvents with host and GPU activity).

    GPU busy time is the union of the kernel/memcpy/memset intervals; ``idle_ms`` the gaps inside [first, last],
    ``lead_ms`` the time from the first host event to the first GPU work. ``gaps``: the ``top`` longest gaps over
    ``gap_us``, each with the innermost host op running when the GPU became busy again (what the GPU waited for);
    ``syncs``: host calls that wait for the GPU (name -> [count, ms])."""
    gpu = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == cuda_type)
    host = [e for e in events if e.device_type != cuda_type]
    if not gpu:
        return {"idle_ms": None, "lead_ms": None, "gaps": [], "syncs": {}}
    busy = [list(gpu[0])]
    for start, end in gpu[1:]:
        if start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    gaps = [(b[0] - a[1], a[1], b[0]) for a, b in itertools.pairwise(busy) if b[0] - a[1] > gap_us]

    def op_at(t: float) -> str:
        inside = [e for e in host if e.time_range.start <= t <= e.time_range.end and not e.name.startswith("cuda")]
        return min(inside, key=lambda e: e.time_range.end - e.time_range.start).name if inside else "-"

    syncs: dict[str, list] = {}
    for e in host:
        if is_sync(e.name):
            c = syncs.setdefault(e.name, [0, 0.0])
            c[0] += 1
            c[1] += (e.time_range.end - e.time_range.start) / 1e3
    first_host = min((e.time_range.start for e in host), default=busy[0][0])
    return {"idle_ms": sum(g[0] for g in gaps) / 1e3, "lead_ms": max(0.0, busy[0][0] - first_host) / 1e3,
            "gaps": [{"ms": round(g[0] / 1e3, 3), "at_ms": round((g[2] - busy[0][0]) / 1e3, 2), "op": op_at(g[2])}
                     for g in sorted(gaps, reverse=True)[:top]],
            "syncs": syncs}


def profile(model, inputs, trace: str | None = None, warmup: int = 2, gaps: bool = False,
            gaps_trace: str | None = None) -> dict:
    """One profiled step after ``warmup`` steps: per-family ms and count, kernel sum, wall ms, top kernels.

    ``trace``: also record host activity and write a Chrome trace (gzipped JSON) to this path, to see
    where the GPU waits for the host. ``gaps``: record host activity too and add ``idle``: ``idle_report`` of the
    step (a second profiled step, so the kernel sums above stay free of host-recording overhead); ``gaps_trace``: write
    that step's Chrome trace (host ops with Python frames, and GPU activity; ``.json.gz`` is gzipped) to this path."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(warmup):
        bench_model.step(model, inputs)
    common.sync()
    t0 = time.perf_counter()
    bench_model.step(model, inputs)
    common.sync()
    wall_ms = (time.perf_counter() - t0) * 1e3
    cuda = torch.cuda.is_available()  # on the CPU (smoke runs) the families hold CPU op times instead
    device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    activities = [ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]
    if trace:
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else activities
    with torch_profile(activities=activities) as prof:
        bench_model.step(model, inputs)
        common.sync()
    if trace:
        prof.export_chrome_trace(trace)
    per_family: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type != device_type:
            continue
        ms = (evt.device_time if cuda else evt.self_cpu_time_total) / 1e3
        fam = family(evt.name)
        per_family[fam][0] += ms
        per_family[fam][1] += 1
        per_kernel[evt.name][0] += ms
        per_kernel[evt.name][1] += 1
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    families = sorted(per_family.items(), key=lambda kv: -kv[1][0])
    result = {"wall_ms": wall_ms, "kernel_ms": sum(v[0] for v in per_family.values()),
              "families": {k: {"ms": v[0], "count": v[1]} for k, v in families},
              "top": [{"name": k[:120], "ms": v[0], "count": v[1]} for k, v in top]}
    if gaps and cuda:
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                           with_stack=gaps_trace is not None) as prof:
            bench_model.step(model, inputs)
            common.sync()
        result["idle"] = idle_report(prof.events(), device_type)
        if gaps_trace:
            os.makedirs(os.path.dirname(os.path.abspath(gaps_trace)), exist_ok=True)
            prof.export_chrome_trace(gaps_trace)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="klein9b", choices=sorted(flux2_model.CONFIGS))
    parser.add_argument("--res", type=int, default=1024)
    parser.add_argument("--variants", nargs="+", default=["bf16", "pack-row"], choices=bench_model.VARIANTS)
    parser.add_argument("--compile", action="store_true", help="profile the TorchCompileModel-wrapped model too")
    parser.add_argument("--out", default=None)
    parser.add_argument("--trace-dir", default=None, help="write a Chrome trace (host and GPU) per variant and mode")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    flux2_model.setup_comfyui(cpu=not torch.cuda.is_available())
    from ..ops import native

    native.install()
    cfg = flux2_model.CONFIGS[args.model]
    inputs = bench_model.step_inputs(cfg, args.res)
    results = []
    for variant in args.variants:
        patcher = bench_model.build(variant, cfg)
        modes = [("eager", patcher)] + ([("compile", bench_model.compiled(patcher))] if args.compile else [])
        for mode, model in modes:
            trace = f"{args.trace_dir}/{args.model}-{args.res}-{variant}-{mode}.json.gz" if args.trace_dir else None
            res = profile(model, inputs, trace)
            res.update(variant=variant, mode=mode, model=cfg.name, res=args.res)
            results.append(res)
            print(f"\n## {cfg.name} {args.res}x{args.res} {variant} {mode}: wall {res['wall_ms']:.1f} ms, "
                  f"kernels {res['kernel_ms']:.1f} ms")
            print("| family | ms | kernels |\n|---|---|---|")
            for fam, v in res["families"].items():
                print(f"| {fam} | {v['ms']:.2f} | {v['count']} |")
            print("| top kernel | ms | count |\n|---|---|---|")
            for t in res["top"]:
                print(f"| {t['name'][:90]} | {t['ms']:.2f} | {t['count']} |")
        del patcher, modes, model
        torch._dynamo.reset()
        native.install()
        bench_model._free()
    if args.out:
        common.write_json(args.out, {"env": common.environment(), "rows": results})


if __name__ == "__main__":
    main()
