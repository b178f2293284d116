"""Summarize a Chrome trace of one profiled step (``bench_arch --trace-dir``, ``profile_step --trace-dir``).

    python -m int8_w8a8.bench.trace_report trace-qwen-image-pack-convert-lora64-eager.json.gz [--match int8_w8a8 ...]

Prints: the GPU's kernel time and the span it covers, the kernels by total time; when the first kernel was launched
after the step began and the Python functions that ran before it; and the Python functions (or host ops) whose names
contain one of ``--match`` by total time; then every host name by self time (its time less that of the events
nested in it on its thread: where a host-bound step's time goes, whoever called it). Traces recorded with Python
frames (``bench_arch --trace-dir``) inflate host time 2-3x: compare shares and counts, not totals, with an untraced
step.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
NESTING_CATS = ("python_function", "cpu_op", "cuda_runtime", "cuda_driver", "user_annotation")
STEP_FRAME = "bench_model.py"  # the frame of bench_model.step, the start of a step


def load(path: str) -> list[dict]:
    """The complete ('X') events of a trace file (gzipped when the name ends in .gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def by_name(events: list[dict]) -> list[tuple[str, float, int]]:
    """(name, total ms, count), largest total first."""
    acc: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for e in events:
        acc[e["name"]][0] += e["dur"] / 1e3
        acc[e["name"]][1] += 1
    return sorted(((k, v[0], v[1]) for k, v in acc.items()), key=lambda r: -r[1])


def self_times(events: list[dict]) -> list[tuple[str, float, int]]:
    """(name, total self ms, count) of the host events, largest first: each event's duration less the time of the
    events nested in it on the same thread (Python frames, ATen ops, CUDA runtime/driver calls). An event that starts
    inside another and ends after it (the profiler's Python tracer and its ATen-op records do not always nest: an
    op's record around a C++ call into a Python kernel) counts against the other for their overlap only."""
    host = sorted((e for e in events if e.get("cat") in NESTING_CATS),
                  key=lambda e: (e.get("pid"), e.get("tid"), e["ts"], -e["dur"]))
    acc: dict[str, list] = defaultdict(lambda: [0.0, 0])
    stack: list[tuple[tuple, float, str]] = []  # (thread, end, name)
    for e in host:
        thread, start, end = (e.get("pid"), e.get("tid")), e["ts"], e["ts"] + e["dur"]
        while stack and (stack[-1][0] != thread or stack[-1][1] <= start):
            stack.pop()
        if stack:
            acc[stack[-1][2]][0] -= (min(end, stack[-1][1]) - start) / 1e3
        acc[e["name"]][0] += e["dur"] / 1e3
        acc[e["name"]][1] += 1
        stack.append((thread, end, e["name"]))
    return sorted(((k, v[0], v[1]) for k, v in acc.items()), key=lambda r: -r[1])


def report(events: list[dict], match: tuple[str, ...] = ("int8_w8a8",), top: int = 20) -> dict:
    """The summary ``main`` prints, as a dict (times in ms)."""
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    host = [e for e in events if e.get("cat") not in GPU_CATS]
    out: dict = {"device_ms": sum(e["dur"] for e in gpu) / 1e3,
                 "span_ms": (gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]) / 1e3 if gpu else 0.0,
                 "kernels": by_name(gpu)[:top]}
    steps = [e for e in host if e.get("cat") == "python_function" and STEP_FRAME in e["name"]
             and e["name"].endswith(": step")]
    if gpu and steps:
        t0 = steps[0]["ts"]
        corr = gpu[0].get("args", {}).get("correlation")
        launches = [e for e in host if e.get("args", {}).get("correlation") == corr and e.get("cat") != "ac2g"]
        first = launches[0]["ts"] if launches else gpu[0]["ts"]
        out["first_launch_ms"] = (first - t0) / 1e3
        before = sorted((e for e in host if e.get("cat") == "python_function" and e["ts"] >= t0
                         and e["ts"] + e["dur"] <= first), key=lambda e: -e["dur"])
        out["before_first_launch"] = [(e["name"], e["dur"] / 1e3) for e in before[:top]]
    out["host"] = [r for r in by_name(host) if any(m in r[0] for m in match)][:top]
    out["self"] = self_times(events)[:top]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--match", nargs="+", default=["int8_w8a8"], help="host names to list (substrings)")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    r = report(load(args.trace), tuple(args.match), args.top)
    print(f"GPU: {r['device_ms']:.2f} ms of kernels over a {r['span_ms']:.2f} ms span")
    for name, ms, n in r["kernels"]:
        print(f"  {ms:8.2f} ms {n:6d}  {name[:100]}")
    if "first_launch_ms" in r:
        print(f"first kernel launched {r['first_launch_ms']:.2f} ms after the step began; before it:")
        for name, ms in r["before_first_launch"]:
            print(f"  {ms:8.2f} ms  {name[:100]}")
    print(f"host names containing {' / '.join(args.match)}:")
    for name, ms, n in r["host"]:
        print(f"  {ms:8.2f} ms {n:6d}  {name[:100]}")
    print("host names by self time (less what ran nested in them):")
    for name, ms, n in r["self"]:
        print(f"  {ms:8.2f} ms {n:6d}  {name[:100]}")


if __name__ == "__main__":
    main()
