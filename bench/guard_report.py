"""What Dynamo guards on a compiled step, and what checking them costs (CPU or GPU).

    python -m int8_w8a8.bench.guard_report [--models zimage] [--variants bf16 fp8-fast pack-convert]
        [--tiny] [--layers N] [--backend eager] [--out guards.json] [--interleave ROUNDS]

A compiled model pays, before each call of its graph, for the checks that the graph is still valid
(Dynamo's guards; "TorchDynamo Cache Lookup" in a profile). C++ guards (tensor, id, type matches) cost
well under a microsecond each; guards Dynamo can only express in Python (lambdas over a tensor subclass's
``__tensor_flatten__``, weakrefs, closures) cost microseconds each and add up per INT8 weight. This compiles
each variant through ComfyUI's ``set_torch_compile_wrapper`` with the TorchCompileModel node's guard filter
(transformer_options not guarded), records every guard entry the filter sees, and reports per variant:
the frames compiled, guards kept by type, the most frequent guard names (digits folded), and the cache-lookup
time of a step from torch.profiler (median and minimum of ``--reps`` profiled steps after two warm-up steps).

The backend only changes what runs inside the graph, not the guards: ``eager`` (default) skips Inductor's
compile time. ``--tiny`` builds the table's tiny configs (``--layers`` sets the block count, so per-layer
guards add up as at the real depth). ``--interleave ROUNDS`` times the guard check itself instead
(``interleaved_checks``): all variants built in one process and timed in turn, for hosts whose speed drifts.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import re
import statistics

import torch

from . import arch_models, bench_arch, bench_model, common, flux2_model

# the unet-config key of each architecture's block count (for --layers at tiny widths)
DEPTH_KEY = {"zimage": "n_layers", "chroma": "depth", "qwen-image": "num_layers", "wan14b": "num_layers",
             "klein9b": "depth", "klein4b": "depth"}


def _arch(key: str, tiny: bool, layers: int | None) -> arch_models.Arch:
    arch = arch_models.ARCHS[key]
    if not (tiny and layers):
        return arch
    return dataclasses.replace(arch, tiny={**arch.tiny, DEPTH_KEY[key]: layers})


def pattern(name: str) -> str:
    """A guard's source name with numbers folded (``layers.7.attention`` -> ``layers.N.attention``)."""
    return re.sub(r"\d+", "N", name)


def lookup_ms(model, inputs, reps: int) -> tuple[list[float], int]:
    """Cache-lookup (guard evaluation) time of each of ``reps`` profiled steps, ms, and the lookups per step."""
    from torch.profiler import ProfilerActivity, profile

    times, count = [], 0
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            bench_model.step(model, inputs)
        events = [e for e in prof.events() if "Cache Lookup" in e.name]
        times.append(sum(e.cpu_time_total for e in events) / 1e3)
        count = len(events)
    return times, count


def report(key: str, variant: str, tiny: bool, layers: int | None, backend: str, reps: int, top: int) -> dict:
    arch = _arch(key, tiny, layers)
    patcher, _ = bench_arch.build(variant, arch, tiny)
    inputs = arch_models.step_inputs(patcher, arch.step_shape(tiny), bench_arch._device())
    node_filter, seen, kept = bench_model.node_guard_filter(), [], []

    def keep(entries):  # the TorchCompileModel node's filter, recording what it is shown and what it keeps
        verdicts = node_filter(entries)
        seen.extend(entries)
        kept.extend(e for e, k in zip(entries, verdicts, strict=True) if k)
        return verdicts

    model = bench_model.compiled(patcher, backend, guard_filter=keep)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for _ in range(2):
        bench_model.step(model, inputs)
    common.sync()
    graphs, breaks = counters["stats"]["unique_graphs"], dict(counters["graph_break"])
    times, lookups = lookup_ms(model, inputs, reps)
    by_type = collections.Counter(e.guard_type for e in kept)
    names = collections.Counter((e.guard_type, pattern(e.name)) for e in kept)
    row = {"arch": key, "variant": variant, "tiny": tiny, "layers": layers, "backend": backend,
           "guards_seen": len(seen), "guards_kept": len(kept), "graphs": graphs, "graph_breaks": breaks,
           "lookups_per_step": lookups,
           "lookup_ms": statistics.median(times), "lookup_min_ms": min(times), "lookup_ms_runs": times,
           "by_type": dict(by_type.most_common()),
           "top_names": [[n, t, k] for (t, k), n in names.most_common(top)]}
    print(f"{arch.title} {variant:<12} guards kept {len(kept):5d} (seen {len(seen)}), {lookups} lookups a step, "
          f"lookup {row['lookup_ms']:.2f} ms a step (min {min(times):.2f}), {graphs} graphs, "
          f"{sum(breaks.values())} graph breaks", flush=True)
    for reason, n in sorted(breaks.items(), key=lambda kv: -kv[1])[:5]:
        print(f"    break x{n}: {reason[:200]}", flush=True)
    print("    by type: " + ", ".join(f"{t} {n}" for t, n in by_type.most_common(12)), flush=True)
    for n, t, k in row["top_names"]:
        print(f"    {n:5d} {t:<28} {k[:150]}", flush=True)
    del model, patcher, inputs
    torch._dynamo.reset()
    bench_arch._free()
    return row


def _captured_check(patcher, model, inputs):
    """(the root guard manager of the newest compiled entry of the diffusion model's forward, that forward's frame
    locals at entry): ``manager.check(locals)`` is the guard evaluation a compiled call pays before its graph runs.
    The locals come from one uncompiled step (``set_stance("force_eager")``) under a trace hook."""
    import sys

    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    code = type(patcher.model.diffusion_model).forward.__code__
    manager = _debug_get_cache_entry_list(code)[0].guard_manager
    captured = {}

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code is code and not captured:
            captured.update(frame.f_locals)

    sys.settrace(tracer)
    try:
        with torch.compiler.set_stance("force_eager"):
            bench_model.step(model, inputs)
    finally:
        sys.settrace(None)
    return manager, captured


def interleaved_checks(key: str, variants: list[str], tiny: bool, layers: int | None, backend: str,
                       rounds: int) -> dict[str, dict]:
    """The guard check of each variant's compiled step timed directly and interleaved: every variant is built and
    compiled in this process first (their graphs kept side by side), then each round times 10 checks of each in
    turn, so a host whose speed drifts (a shared VM) slows all alike. Per variant: ms per check (min, p10, median
    over ``rounds``) and the guard tree's size in lines. Compare variants within one call, not across calls."""
    import time

    torch._dynamo.reset()
    built = {}
    arch = _arch(key, tiny, layers)
    for variant in variants:
        patcher, _ = bench_arch.build(variant, arch, tiny)
        inputs = arch_models.step_inputs(patcher, arch.step_shape(tiny), bench_arch._device())
        model = bench_model.compiled(patcher, backend)
        for _ in range(2):
            bench_model.step(model, inputs)
        manager, frame = _captured_check(patcher, model, inputs)
        with torch.inference_mode():
            if not manager.check(frame):
                raise RuntimeError(f"{key} {variant}: the compiled entry's guards fail on its own step")
        built[variant] = (manager, frame, (patcher, model, inputs))
    times = {v: [] for v in variants}
    with torch.inference_mode():
        for _ in range(rounds):
            for variant, (manager, frame, _) in built.items():
                t0 = time.perf_counter()
                for _ in range(10):
                    manager.check(frame)
                times[variant].append((time.perf_counter() - t0) * 100)  # ms per check
    out = {}
    for variant, ts in times.items():
        ts = sorted(ts)
        row = {"check_ms_min": ts[0], "check_ms_p10": ts[len(ts) // 10], "check_ms_median": statistics.median(ts),
               "tree_lines": len(str(built[variant][0]).splitlines())}
        out[variant] = row
        print(f"{key} {variant:<16} guard check {row['check_ms_p10']:.3f} ms (p10; min {ts[0]:.3f}, median "
              f"{row['check_ms_median']:.3f}) over {rounds} interleaved rounds, guard tree {row['tree_lines']} lines",
              flush=True)
    del built
    torch._dynamo.reset()
    bench_arch._free()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["zimage"], choices=sorted(arch_models.ARCHS))
    parser.add_argument("--variants", nargs="+", default=["bf16", "fp8-fast", "pack-convert"])
    parser.add_argument("--tiny", action="store_true", help="the table's tiny configs (CPU)")
    parser.add_argument("--layers", type=int, default=None, help="block count at tiny widths")
    parser.add_argument("--backend", default="eager")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", default=None)
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="instead: time each variant's guard check directly, all built in one process and timed "
                             "in turn for ROUNDS rounds (robust to a host whose speed drifts)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cpu = not torch.cuda.is_available()
    # on the CPU, ComfyUI's SDPA attention as on the GPU: its CPU default (sub-quadratic) asks psutil for free
    # memory inside the graph, which breaks it into frames per block and multiplies the lookups
    flux2_model.setup_comfyui(cpu=cpu)
    from ..ops import native

    native.install()  # as in ComfyUI with the pack installed
    if args.interleave:
        rows = [{"arch": m, "variant": v, "tiny": args.tiny, "layers": args.layers, "backend": args.backend, **r}
                for m in args.models
                for v, r in interleaved_checks(m, args.variants, args.tiny, args.layers, args.backend,
                                               args.interleave).items()]
    else:
        rows = [report(m, v, args.tiny, args.layers, args.backend, args.reps, args.top)
                for m in args.models for v in args.variants]
    if args.out:
        common.write_json(args.out, {"env": common.environment(), "rows": rows})


if __name__ == "__main__":
    main()
