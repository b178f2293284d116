"""bench_model.measure's Dynamo counters: what a compiled step compiled, so a spread of compiled step times can be
told apart from a recompile (or a recompile limit that left the model running eagerly)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from int8_w8a8.bench import bench_model

pytestmark = pytest.mark.unit


def test_counters_show_a_recompile_and_a_recompile_limit():
    # the config's own patch: pytest's monkeypatch deletes a torch config attribute on undo (its module class keeps the
    # values outside __dict__), which broke every later compile test of the process
    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=2, automatic_dynamic_shapes=False):
        _recompile_and_limit()
    assert torch._dynamo.config.recompile_limit == limit


def _recompile_and_limit():
    torch._dynamo.reset()
    f = torch.compile(lambda x: x.sin() + 1, backend="eager")

    def moved(x):
        before = bench_model.dynamo_counts()
        f(x)
        return bench_model.counts_moved(before, bench_model.dynamo_counts())

    first = moved(torch.randn(3))
    assert first["frames/total"] == 1 and first["stats/unique_graphs"] == 1
    assert moved(torch.randn(3)) == {}  # the compiled graph again: nothing moves
    again = moved(torch.randn(4))  # another shape: a recompile
    assert again["frames/total"] == 1 and again["stats/unique_graphs"] == 1
    limit = moved(torch.randn(5))  # over the limit: Dynamo gives up on the frame, which then runs eagerly
    assert any(k.startswith("unimplemented/") and "recompile limit" in k for k in limit), limit
    assert moved(torch.randn(5)) == {}  # eagerly from now on, silently: only ``dynamo`` (the row's total) shows it
    torch._dynamo.reset()


def test_compile_host_measures_each_path_in_each_phase(tmp_path):
    """bench/compile_host.py on the CPU (the torch twin; a smoke run of the GPU benchmark): host us per layer of
    the direct, torch.ops and compiled paths before compiling, after, and with the compile workers shut down."""
    import json
    import os
    import subprocess
    import sys

    from int8_w8a8.bench import compile_host

    out = tmp_path / "host.json"
    with torch._dynamo.config.patch(cache_size_limit=8):
        r = compile_host.main(["--layers", "3", "--m", "15", "--width", "40", "--reps", "2", "--backend", "eager",
                               "--out", str(out)])
    torch._dynamo.reset()
    assert list(r["phases"]) == ["before", "after_compile", "workers_shut_down"]
    assert "compiled" not in r["phases"]["before"]
    for p in r["phases"].values():
        assert all(p[k] > 0 for k in ("host_us", "direct", "torch_ops")) and p["children"] >= -1
    assert r["phases"]["after_compile"]["compiled"] > 0
    assert json.loads(out.read_text())["layers"] == 3
    if os.path.exists("/proc/self/stat"):  # the phases' CPU, and the child count compile workers would show in
        assert all(p["cpu"] in os.sched_getaffinity(0) for p in r["phases"].values())
        before = compile_host._children()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            assert compile_host._children() == before + 1
        finally:
            child.kill()
            child.wait()


def test_cpu_placement_helpers():
    """bench/common.py's CPU placement record (item 87): sysfs cpulists, this thread's CPU from /proc, its NUMA
    node, and no pinning without a CUDA device."""
    import os

    from int8_w8a8.bench import common

    assert common.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert common.parse_cpulist("") == []
    assert common.format_cpulist([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert common.parse_cpulist(common.format_cpulist([5, 7, 6, 9])) == [5, 6, 7, 9]
    cpu = common.current_cpu()
    if os.path.exists("/proc/thread-self/stat"):
        assert cpu in os.sched_getaffinity(0)
    if os.path.exists("/proc/cpuinfo"):
        assert common.cpu_mhz(cpu) is None or common.cpu_mhz(cpu) > 0
    assert common.cpu_mhz(None) is None and common.cpu_mhz(10**6) is None
    placement = common.cpu_placement()
    assert common.parse_cpulist(placement["cpus_allowed"]) == sorted(os.sched_getaffinity(0))
    if not torch.cuda.is_available():
        assert common.gpu_local_cpus() is None and common.pin_to_gpu_cpus() is None
        assert placement["gpu_local_cpus"] is None


def test_cpu_counters_moved():
    """bench/common.py's per-step host record (item 88): a thread spinning on the CPU shows a high CPU share and
    at least one busy CPU; a sleeping one a low share; steal is a share of all CPU time."""
    import os
    import time

    from int8_w8a8.bench import common

    before = common.cpu_counters()
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        pass
    spun = common.cpu_moved(before, common.cpu_counters())
    before = common.cpu_counters()
    time.sleep(0.3)
    slept = common.cpu_moved(before, common.cpu_counters())
    assert spun["thread_cpu_pct"] > 50 > slept["thread_cpu_pct"] >= 0
    assert slept["nvcsw"] >= 1 and spun["nivcsw"] >= 0
    if os.path.exists("/proc/stat"):
        assert spun["busy_cpus"] > 0.5 and 0 <= spun["steal_pct"] <= 100
    # without /proc/stat's ticks the host-wide figures are unknown, not zero
    no_ticks = dict(common.cpu_counters(), ticks=None)
    assert common.cpu_moved(no_ticks, no_ticks)["busy_cpus"] is None


def test_settle_host():
    """common.settle_host (item 88): a host at its reference speed settles on the first probe; one that never
    reaches it gives up after the timeout and says so."""
    from int8_w8a8.bench import common

    fast = common.settle_host(common.HostSettle(reference_us=1e6))
    assert fast["settled"] and fast["probes"] == 1 and fast["host_us"] > 0
    slow = common.settle_host(common.HostSettle(reference_us=1e-6, timeout_s=0.3, interval_s=0.05))
    assert not slow["settled"] and slow["settle_s"] >= 0.3 and slow["probes"] >= 2
    assert slow["reference_us"] == 1e-6
    assert common.settle_note(fast).startswith("host settled in ")
    note = common.settle_note(slow)
    assert note.startswith("host NOT settled after ") and "against 1e-06" in note
    assert 0 < common.reference_host_us(probes=2, interval_s=0.01) < 1e3
