"""Shared pieces of the GPU benchmarks: environment record, timing, error metrics, shapes."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# One linear layer of FLUX.2 klein at 1024x1024 (4096 image + 512 text tokens): (name, M, K, N).
# M = 4608 for single blocks (image + text), 4096 / 512 for the image / text halves of double blocks.
KLEIN_SHAPES: tuple[tuple[str, int, int, int], ...] = (
    ("9B single.linear1", 4608, 4096, 36864),
    ("9B single.linear2", 4608, 16384, 4096),
    ("9B img.qkv", 4096, 4096, 12288),
    ("9B img.proj", 4096, 4096, 4096),
    ("9B img.mlp0", 4096, 4096, 24576),
    ("9B img.mlp2", 4096, 12288, 4096),
    ("9B txt.mlp0", 512, 4096, 24576),
    ("4B single.linear1", 4608, 3072, 27648),
    ("4B single.linear2", 4608, 12288, 3072),
)
# The same weights at M = 512 (short prompts, 512x512 images) and M = 1 (modulation, batch-1 text).
EXTRA_M = (512, 1)


def all_shapes() -> list[tuple[str, int, int, int]]:
    """KLEIN_SHAPES plus each distinct (K, N) at M = 512 and M = 1."""
    shapes = list(KLEIN_SHAPES)
    seen = {(m, k, n) for _, m, k, n in shapes}
    for name, _, k, n in KLEIN_SHAPES:
        for m in EXTRA_M:
            if (m, k, n) not in seen:
                seen.add((m, k, n))
                shapes.append((f"{name} M={m}", m, k, n))
    return shapes


def environment() -> dict:
    """GPU, driver-visible versions and the date, recorded with every result file."""
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
    }
    try:
        import comfy_kitchen

        env["comfy_kitchen"] = getattr(comfy_kitchen, "__version__", "installed")
    except ImportError:
        env["comfy_kitchen"] = None
    env.update(host_probe())
    env.update(cpu_placement())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gb=round(props.total_memory / 2**30, 1))
    return env


# ---------------------------------------------------------------- where the host thread runs
# Why (bench/NOTES.md item 87): host-bound steps switch between a fast and a slow mode in the middle of a row
# (Qwen-Image eager 130 -> 96 ms, compiled 118 -> 148 ms), and in the slow mode every host call is 2-5x slower,
# the CUDA driver's launch included: what a thread moved to the CPUs of another NUMA node than the GPU's (remote
# memory, remote MMIO) would show. These record the CPU of each timed step and can pin the process to the GPU's
# local CPUs, so the two can be told apart.

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def parse_cpulist(text: str) -> list[int]:
    """CPUs of a sysfs cpulist ("0-7,16-23") as a sorted list."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return sorted(cpus)


def format_cpulist(cpus: list[int]) -> str:
    """The sysfs cpulist form of ``cpus``: [0, 1, 2, 3, 8, 10, 11] -> "0-3,8,10-11"."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def proc_stat(path: str) -> list[str] | None:
    """The fields of a /proc ``stat`` file after the command name (whose parentheses may hold spaces): element 0 is
    field 3 (state), element 1 field 4 (parent pid), element 36 field 39 (last CPU); None where the file is missing."""
    stat = _read(path)
    return None if stat is None else stat.rsplit(")", 1)[1].split()


def current_cpu() -> int | None:
    """The CPU this thread last ran on (field 39 of /proc/thread-self/stat); None where /proc has no such file."""
    fields = proc_stat("/proc/thread-self/stat")
    return int(fields[36]) if fields and len(fields) > 36 else None


def cpu_mhz(cpu: int | None) -> float | None:
    """``cpu``'s current clock (cpufreq's ``scaling_cur_freq``, else its /proc/cpuinfo line) in MHz; None where
    neither says (a turbo budget spent by a compile's workers would show here as a slow host mode)."""
    if cpu is None:
        return None
    khz = _read(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_cur_freq")
    if khz and khz.isdigit():
        return round(int(khz) / 1e3, 1)
    info = _read("/proc/cpuinfo") or ""
    for block in info.split("\n\n"):
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}
        if fields.get("processor") == str(cpu):
            return round(float(fields["cpu MHz"]), 1) if fields.get("cpu MHz") else None
    return None


def numa_node(cpu: int | None) -> int | None:
    """The NUMA node of ``cpu`` (sysfs ``node<N>`` entry of the CPU); None where unknown."""
    if cpu is None:
        return None
    try:
        names = os.listdir(f"/sys/devices/system/cpu/cpu{cpu}")
    except OSError:
        return None
    return next((int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit()), None)


def gpu_local_cpus(device: int = 0) -> list[int] | None:
    """The CPUs sysfs lists as local to CUDA ``device``'s PCI function (``local_cpulist``); None off CUDA or
    where sysfs does not say."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    bus = f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    text = _read(f"/sys/bus/pci/devices/{bus}/local_cpulist")
    return parse_cpulist(text) if text else None


def cpu_placement() -> dict:
    """The process's allowed CPUs, the NUMA nodes they span, the GPU's local CPUs and this thread's CPU now."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    nodes = sorted({n for n in map(numa_node, allowed or []) if n is not None})
    local = gpu_local_cpus()
    return {"cpus_allowed": None if allowed is None else format_cpulist(allowed), "numa_nodes": nodes,
            "gpu_local_cpus": None if local is None else format_cpulist(local), "cpu_now": current_cpu()}


def pin_to_gpu_cpus(device: int = 0) -> list[int] | None:
    """Restrict this process to the allowed CPUs local to CUDA ``device`` (its NUMA node); returns them, or None
    (nothing changed) where they are unknown or none of them is allowed."""
    local = gpu_local_cpus(device)
    if not local or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(set(local) & os.sched_getaffinity(0))
    if not cpus:
        return None
    os.sched_setaffinity(0, cpus)
    return cpus


def cpu_counters() -> dict:
    """A snapshot of what decides whether the host ran at full speed: the system's CPU time by kind (/proc/stat's
    ``cpu`` line, in clock ticks: busy, idle, steal), this thread's CPU time and context switches (getrusage), and
    the wall clock. ``cpu_moved`` turns two snapshots into a step's figures (bench/NOTES.md item 88)."""
    import resource  # Unix only: imported where it is used, so the module still imports elsewhere

    fields = (_read("/proc/stat") or "").split("\n", 1)[0].split()
    ticks = [int(v) for v in fields[1:9]] if fields[:1] == ["cpu"] and len(fields) >= 9 else None
    usage = resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF))
    return {"wall": time.perf_counter(), "thread_cpu": time.thread_time(), "ticks": ticks,
            "nvcsw": usage.ru_nvcsw, "nivcsw": usage.ru_nivcsw}


def cpu_moved(before: dict, after: dict) -> dict:
    """Between two ``cpu_counters`` snapshots: ``thread_cpu_pct`` this thread's CPU time over the wall time (the
    CUDA sync spins, so a GPU-bound step is near 100 % too: compare the slow runs with the fast ones);
    ``busy_cpus`` the system's CPUs busy on average (this thread included: other work on the host shows as more
    than ~1); ``steal_pct`` the time the hypervisor gave the system's CPUs to other guests, as a share of all CPU
    time; ``nivcsw`` / ``nvcsw`` this thread's involuntary (preempted) and voluntary context switches. A slow host
    mode with high steal or preemption is the machine's neighbours; with neither, the CPU itself (clock, cache,
    remote memory)."""
    wall = max(after["wall"] - before["wall"], 1e-9)
    out = {"thread_cpu_pct": round(100 * (after["thread_cpu"] - before["thread_cpu"]) / wall, 1),
           "nivcsw": after["nivcsw"] - before["nivcsw"], "nvcsw": after["nvcsw"] - before["nvcsw"],
           "busy_cpus": None, "steal_pct": None}
    if before["ticks"] and after["ticks"]:
        moved = (b - a for a, b in zip(before["ticks"], after["ticks"], strict=True))
        user, nice, system, idle, iowait, irq, softirq, steal = moved
        total = max(user + nice + system + idle + iowait + irq + softirq + steal, 1)
        out["busy_cpus"] = round((user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK") / wall, 2)
        out["steal_pct"] = round(100 * steal / total, 2)
    return out


def host_probe(calls: int = 2000, rounds: int = 15) -> dict:
    """The host CPU and its speed at what bounds eager steps: ``host_us`` is the median time of one tiny torch op
    (``torch.add`` of two 16-element CPU tensors: Python, argument parsing and the dispatcher, no real work).
    Why: the lent GPU machines differ in host speed between sessions (a host-bound Qwen-Image step moved 107 ->
    144 ms with the same code and device time, bench/NOTES.md item 53), so results record the host they ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "host_us": host_us(calls, rounds)}


def host_us(calls: int = 2000, rounds: int = 15) -> float:
    """``host_probe``'s speed alone (no CPU name lookup): the median us of one tiny CPU ``torch.add``, cheap enough
    to take after every timed step (``bench_model.measure``)."""
    a, b = torch.ones(16), torch.ones(16)
    per_call = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            torch.add(a, b)
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
    return round(statistics.median(per_call), 3)


@dataclass(frozen=True)
class HostSettle:
    """Wait before timed steps until the host is back at its normal speed (bench/NOTES.md item 88): on the lent
    GPU machines a tiny CPU op (``host_us``) runs ~2x slower for seconds after a compile or a model build, on
    the same CPU, without steal, preemption or other load, and host-bound steps (a compiled Qwen-Image step: 112
    -> 135-220 ms) follow it. ``reference_us``: the host's speed before that work (the benchmark's parent process
    at its start); settled once a probe is within ``tolerance`` of it; ``timeout_s``: give up (the row says so);
    ``retimes``: how many more times a row's timed steps run when the slow mode caught them anyway
    (``slow_host_runs``: it can start mid-row, after the settle); ``slow``: a probe over this many times the host's
    normal speed marks a step the slow mode caught (in session 31's rows, probes in the normal mode spread up to
    1.45x, 1.26-1.82 us; in the slow mode they were 2-3x the fastest)."""

    reference_us: float
    tolerance: float = 1.25
    timeout_s: float = 30.0
    interval_s: float = 0.2
    retimes: int = 1
    slow: float = 1.5


def reference_host_us(probes: int = 3, interval_s: float = 0.5) -> float:
    """The host's normal speed for ``HostSettle``: the fastest of ``probes`` ``host_us`` probes ``interval_s``
    apart, so a benchmark started right after other work (a compile in an earlier step of the same call) does not take
    the slow mode for its reference."""
    best = host_us()
    for _ in range(probes - 1):
        time.sleep(interval_s)
        best = min(best, host_us())
    return best


def add_settle_args(parser: argparse.ArgumentParser) -> None:
    """A benchmark's ``--settle-s`` (how long each row may wait for the host's normal speed), ``--retimes`` and the
    hidden ``--host-reference-us`` its parent passes to per-variant children (``settle_child_args``)."""
    parser.add_argument("--settle-s", type=float, default=30.0,
                        help="before each row's timed steps, wait up to this long for the host's normal speed (a tiny "
                             "CPU op within 1.25x of its time at the start; bench/NOTES.md item 88); 0: do not wait")
    parser.add_argument("--retimes", type=int, default=1,
                        help="run a row's timed steps again (after another wait) up to this many times when the host's "
                             "slow mode stretched some of them (their spread over 10 %% and the host slow right after)")
    parser.add_argument("--host-reference-us", type=float, default=None, help=argparse.SUPPRESS)  # from the parent


def settle_from_args(args: argparse.Namespace) -> HostSettle | None:
    """The ``HostSettle`` of a benchmark process from ``add_settle_args``' arguments (the parent's reference, or this
    host's speed now, before the process builds or compiles anything); None with ``--settle-s 0``."""
    if args.settle_s <= 0:
        return None
    return HostSettle(args.host_reference_us or reference_host_us(), timeout_s=args.settle_s, retimes=args.retimes)


def settle_note(settled: dict) -> str:
    """One line on what ``settle_host`` did for a row (printed by the benchmarks beside the row)."""
    if settled["settled"]:
        return f"host settled in {settled['settle_s']} s"
    return (f"host NOT settled after {settled['settle_s']} s ({settled['host_us']} us against "
            f"{settled['reference_us']})")


def retimed_note(retimed: list[dict]) -> str:
    """One line on the attempts ``bench_model.measure`` set aside because the host's slow mode stretched them."""
    return "; ".join(f"retimed after host slow mode: steps {' '.join(f'{t:.1f}' for t in r['runs_ms'])} ms, host_us "
                     f"{r['runs_host_us']}, slow after steps {r['slow_runs']}" for r in retimed)


def settle_child_args(args: argparse.Namespace) -> list[str]:
    """A benchmark parent's ``--settle-s`` and ``--retimes`` (``add_settle_args``) for its per-variant child
    processes, with the host's normal speed taken now (``--host-reference-us``, before any child builds or compiles)
    when they are to wait at all."""
    return (["--settle-s", str(args.settle_s), "--retimes", str(args.retimes)]
            + (["--host-reference-us", str(reference_host_us())] if args.settle_s > 0 else []))


def slow_host_runs(runs_ms: list[float], runs_host_us: list[float], settle: HostSettle,
                   spread: float = 1.10) -> list[int]:
    """The timed steps the host's slow mode stretched (indices into ``runs_ms``), or [] when the row stands: the
    steps spread by more than ``spread`` (slowest / fastest) and the ``host_us`` probe right after a step is over
    ``settle.slow`` times the host's normal speed. That speed is the fastest of ``settle.reference_us`` and the
    row's own probes: a reference taken in the slow mode lets everything through (session 31's Qwen-Image rows:
    reference 3.04 us, probes 1.26-1.8 us in the normal mode and 2.8-3.6 us in the slow one, the pack row's steps
    104.5-179.4 ms). A slow probe without a spread is a step the host did not bound; it stands."""
    if not runs_ms or max(runs_ms) <= spread * min(runs_ms):
        return []
    normal = min([settle.reference_us, *runs_host_us])
    return [i for i, probe in enumerate(runs_host_us) if probe > settle.slow * normal]


def settle_host(settle: HostSettle) -> dict:
    """Probe ``host_us`` (idle ``interval_s`` between probes) until it is within ``settle.tolerance`` of
    ``settle.reference_us`` or ``settle.timeout_s`` passed; returns ``settled`` (bool), ``settle_s`` (the wait),
    ``host_us`` (the last probe), ``reference_us`` and ``probes``."""
    start = time.perf_counter()
    probes = 0
    while True:
        probe = host_us(calls=300, rounds=3)
        probes += 1
        waited = time.perf_counter() - start
        settled = probe <= settle.tolerance * settle.reference_us
        if settled or waited >= settle.timeout_s:
            return {"settled": settled, "settle_s": round(waited, 2), "host_us": probe,
                    "reference_us": settle.reference_us, "probes": probes}
        time.sleep(settle.interval_s)


def bench_ms(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of ``fn`` in ms (triton.testing.do_bench: events, L2 flushed before each run)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def bench_graph_ms(fn: Callable[[], object]) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph: device time without Python or launch overhead."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    """10 log10(||ref||^2 / ||ref - y||^2) in float64; inf when equal."""
    ref, y = ref.double().flatten(), y.double().flatten()
    err = (ref - y).norm()
    return math.inf if err == 0 else float(20 * torch.log10(ref.norm() / err))


def sync() -> None:
    """Wait for the GPU (a no-op on CPU-only runs), for wall-clock timings of whole steps."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    o, r = out.double(), ref.double()
    if not torch.isfinite(o).all():
        return float("inf")
    return float((o - r).norm() / r.norm())


def tops(m: int, k: int, n: int, ms: float) -> float:
    return 2.0 * m * n * k / (ms * 1e-3) / 1e12


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


class PowerSampler:
    """``nvidia-smi`` in the background while a benchmark runs: SM clock (MHz), board power (W) and the
    clock-event (throttle) reasons bitmask, one sample per ``period_ms``. ``stop()`` returns the medians and
    the OR of the reasons (0x4: software power cap), or None where nvidia-smi is missing."""

    QUERY = "clocks.sm,power.draw.instant,clocks_event_reasons.active"

    def __init__(self, period_ms: int = 50):
        try:
            self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits",
                                          "-lms", str(period_ms), "-i", "0"], stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None

    def stop(self) -> dict | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        rows = []
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                rows.append((float(parts[0]), float(parts[1]), int(parts[2], 16)))
            except (ValueError, IndexError):
                continue
        if not rows:
            return None
        reasons = 0
        for r in rows:
            reasons |= r[2]
        return {"sm_mhz": statistics.median(r[0] for r in rows), "watts": statistics.median(r[1] for r in rows),
                "clock_event_reasons": hex(reasons), "samples": len(rows)}
