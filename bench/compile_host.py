"""Host time per INT8 linear call: direct, through ``torch.ops``, inside a compiled graph; before and after compiling.

    python -m int8_w8a8.bench.compile_host [--layers 200] [--m 64] [--width 256] [--out compile_host.json]

Why (bench/NOTES.md items 86-87): a compiled Qwen-Image step with the pack is host-bound at 152-163 ms against
96-104 ms eager, with the same ~1,550 kernels; a traced compiled step showed every host call slower than in the
traced eager step, the CUDA driver's launch included. This separates the candidates on one small chain of layers
(``--layers`` INT8 linears of ``--width`` x ``--width`` at ``--m`` rows, small enough that the GPU waits for the
host, so wall time / layers is host time per layer):

* ``direct``: ``fused.int8_linear_eager`` (what the eager fused blocks call: the recorded launches replayed);
* ``torch_ops``: the same through ``torch.ops.int8_w8a8.int8_linear`` (the dispatcher and the op's Python kernel);
* ``compiled``: the chain under ``torch.compile`` (Inductor's wrapper calling the op);
* ``host_us``: ``common.host_us`` (a tiny CPU op, no CUDA).

The compile also compiles one pointwise graph, whose Triton kernel starts Inductor's compile workers as a model's
kernels do.

Each is measured before anything is compiled, after compiling (Inductor's compile workers alive) and after
``shutdown_compile_workers``. A process-wide slowdown after compiling shows in ``direct`` and ``host_us``; the
graph's own overhead in ``compiled`` against ``torch_ops``. Runs on the CPU too (the torch twin: a smoke run).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch

from . import common


def _chain(layers: int, width: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from ..kernels import quantize_weight

    g = torch.Generator(device="cpu").manual_seed(0)
    return [quantize_weight(torch.randn(width, width, generator=g).to(device, torch.bfloat16) / width ** 0.5)
            for _ in range(layers)]


def _direct(x: torch.Tensor, weights) -> torch.Tensor:
    from ..kernels import fused

    for q, s in weights:
        x = fused.int8_linear_eager(x, q, s, None, x.dtype, 0, None, None)
    return x


def _torch_ops(x: torch.Tensor, weights) -> torch.Tensor:
    from ..kernels import library  # noqa: F401  (registers the ops)

    for q, s in weights:
        x = torch.ops.int8_w8a8.int8_linear(x, q, s, None, x.dtype, None, 0, False, None, None)
    return x


def _per_layer_us(fn, x, weights, reps: int) -> float:
    """Median over ``reps`` of one chain's wall time (synchronized) / its layers, in us."""
    with torch.inference_mode():
        fn(x, weights)
        common.sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x, weights)
            common.sync()
            times.append((time.perf_counter() - t0) * 1e6 / len(weights))
    return round(common.median(times), 2)


def _children() -> int:
    """Child processes of this one (Inductor's compile workers), from /proc; -1 where /proc is missing."""
    me = str(os.getpid())
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return -1
    return sum((common.proc_stat(f"/proc/{p}/stat") or ["", ""])[1] == me for p in pids)


def run(layers: int = 200, m: int = 64, width: int = 256, reps: int = 20, backend: str = "inductor") -> dict:
    """The three paths' host us per layer in the three phases, with the probe, threads and child processes;
    ``backend``: torch.compile's (the CPU smoke test takes "eager": no C++ compiler needed)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights = _chain(layers, width, device)
    x = torch.randn(m, width, device=device, dtype=torch.bfloat16)
    compiled = torch.compile(_torch_ops, dynamic=False, backend=backend)

    def phase(with_compiled: bool) -> dict:
        out = {"host_us": common.host_us(calls=1000, rounds=5),
               "direct": _per_layer_us(_direct, x, weights, reps),
               "torch_ops": _per_layer_us(_torch_ops, x, weights, reps)}
        if with_compiled:
            out["compiled"] = _per_layer_us(compiled, x, weights, reps)
        out["threads"] = sorted(t.name for t in threading.enumerate())
        out["children"] = _children()
        out["cpu"] = common.current_cpu()
        out["numa"] = common.numa_node(out["cpu"])
        return out

    def show(name: str, p: dict) -> None:  # as each phase ends: a run cut short keeps what it measured
        paths = "  ".join(f"{k} {p[k]:7.2f} us" for k in ("direct", "torch_ops", "compiled") if k in p)
        print(f"{name:<18} host_us {p['host_us']:.3f}  {paths}  threads {len(p['threads'])}  children "
              f"{p['children']}  CPU {p['cpu']} (node {p['numa']})", flush=True)

    rows = {"before": phase(False)}
    show("before", rows["before"])
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(x, weights)
        # a graph with a kernel of Inductor's own: its Triton compile starts the compile workers, as a model's does
        torch.compile(lambda t: t * torch.sigmoid(t) + 1, dynamic=False, backend=backend)(x)
    common.sync()
    compile_s = round(time.perf_counter() - t0, 1)
    print(f"compiled {layers} layers in {compile_s} s", flush=True)
    rows["after_compile"] = phase(True)
    show("after_compile", rows["after_compile"])
    from torch._inductor import async_compile

    async_compile.shutdown_compile_workers()
    rows["workers_shut_down"] = phase(True)
    show("workers_shut_down", rows["workers_shut_down"])
    return {"layers": layers, "m": m, "width": width, "backend": backend, "compile_s": compile_s, "phases": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--pin-gpu-cpus", action="store_true", help="run on the GPU's local CPUs only")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.pin_gpu_cpus:
        print(f"pinned to {common.pin_to_gpu_cpus()}", flush=True)
    print(f"placement {common.cpu_placement()}", flush=True)
    r = run(args.layers, args.m, args.width, args.reps, args.backend)
    if args.out:
        common.write_json(args.out, {"env": common.environment(), **r})
    return r


if __name__ == "__main__":
    main()
