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


def test_slow_host_runs_on_session_31_rows():
    """common.slow_host_runs on the steps and probes of session 31's Qwen-Image rows (H100): the parent's reference
    (3.035 us) was taken in the host's slow mode, so the row's own fastest probe sets the normal speed."""
    from int8_w8a8.bench import common

    settle = common.HostSettle(reference_us=3.035)
    native_ms = [105.0, 104.6, 123.2, 125.7, 104.5, 128.8, 179.4]
    native_us = [1.698, 1.643, 3.649, 1.351, 2.835, 2.936, 3.025]
    assert common.slow_host_runs(native_ms, native_us, settle) == [2, 4, 5, 6]
    bf16_ms = [173.8, 174.7, 175.8, 182.9, 197.7, 172.7, 173.0]
    bf16_us = [1.684, 1.627, 1.359, 1.407, 1.769, 1.407, 1.574]
    # BF16's 197.7 ms step came with a probe in the normal mode's range: not the host's (BF16 is not host-bound)
    assert common.slow_host_runs(bf16_ms, bf16_us, settle) == []
    assert common.slow_host_runs(bf16_ms, [*bf16_us[:4], 2.1, *bf16_us[5:]], settle) == [4]
    # spread under 10 %: the converted row stands, slow probes or not
    convert_ms = [105.0, 104.7, 104.3, 105.0, 103.8, 105.8, 109.7]
    assert common.slow_host_runs(convert_ms, [1.258, 3.0, 1.617, 1.419, 1.344, 1.557, 1.61], settle) == []
    # a spread with every probe at the host's normal speed is not the host's: it stands too
    assert common.slow_host_runs(native_ms, [1.5] * 7, settle) == []
    assert common.slow_host_runs([], [], settle) == []


def _scripted_measure(monkeypatch, retimes: int, probes: list[float], sleeps_ms: list[float], reps: int = 4) -> dict:
    """bench_model.measure with its step and host probe scripted: each step sleeps the next of ``sleeps_ms`` (the
    first call included), each ``host_us`` probe (settles and after-step probes alike) returns the next of
    ``probes``; both lists must be used up exactly."""
    import time

    from int8_w8a8.bench import common

    probes, sleeps_ms = list(probes), list(sleeps_ms)

    def step(patcher, inputs):
        time.sleep(sleeps_ms.pop(0) / 1e3)
        return torch.zeros(2)

    monkeypatch.setattr(bench_model, "step", step)
    monkeypatch.setattr(common, "host_us", lambda calls=0, rounds=0: probes.pop(0))
    settle = common.HostSettle(reference_us=1.0, timeout_s=5.0, interval_s=0.0, retimes=retimes)
    out = bench_model.measure(None, None, reps=reps, warmup=1, power_s=0, settle=settle)
    assert probes == [] and sleeps_ms == []
    return out


def test_measure_times_again_after_the_host_slow_mode(monkeypatch):
    """measure's retime (bench/NOTES.md item 93): steps the host's slow mode stretched after the settle are set
    aside with their probes, the host settles again and the steps run again; the row's runs are the last attempt."""
    out = _scripted_measure(monkeypatch, retimes=1,
                            probes=[1.0, 1.0, 1.0, 1.0, 3.0,  # settle, then the slow mode after the fourth step
                                    3.0, 1.4,  # the second settle waits one probe out (1.4: within 1.5x)
                                    1.0, 1.0, 1.0, 1.0],
                            sleeps_ms=[0, 10, 10, 10, 120, 10, 10, 10, 10])
    [aside] = out["retimed"]
    assert aside["slow_runs"] == [3] and aside["runs_host_us"] == [1.0, 1.0, 1.0, 3.0]
    assert aside["runs_ms"][3] >= 120 and aside["host_settle"]["probes"] == 1
    assert out["host_settle"]["settled"] and out["host_settle"]["probes"] == 2
    assert out["runs_host_us"] == [1.0] * 4 and max(out["runs_ms"]) < 100 and len(out["runs_ms"]) == 4
    assert out["ms"] < 100
    from int8_w8a8.bench import common

    assert common.retimed_note(out["retimed"]).startswith("retimed after host slow mode: steps ")


def test_measure_keeps_the_last_attempt_when_retimes_run_out(monkeypatch):
    """With no retimes left (or none asked for) the stretched steps are the row, and nothing is set aside."""
    out = _scripted_measure(monkeypatch, retimes=0, probes=[1.0, 1.0, 1.0, 1.0, 3.0],
                            sleeps_ms=[0, 10, 10, 10, 120])
    assert out["retimed"] == [] and out["runs_host_us"][3] == 3.0 and out["runs_ms"][3] >= 120
    out = _scripted_measure(monkeypatch, retimes=1,
                            probes=[1.0, 1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0, 3.0],
                            sleeps_ms=[0, 10, 10, 10, 120, 10, 10, 10, 120])
    assert len(out["retimed"]) == 1 and out["runs_host_us"][3] == 3.0  # slow again: kept, and said by the spread


def test_settle_arguments_reach_the_children():
    """A benchmark parent's --settle-s and --retimes reach its per-variant children with the reference it took."""
    import argparse

    from int8_w8a8.bench import common

    parser = argparse.ArgumentParser()
    common.add_settle_args(parser)
    child_argv = common.settle_child_args(parser.parse_args(["--settle-s", "5", "--retimes", "2"]))
    child = common.settle_from_args(parser.parse_args(child_argv))
    assert child.timeout_s == 5 and child.retimes == 2 and child.reference_us > 0
    no_wait = common.settle_child_args(parser.parse_args(["--settle-s", "0"]))
    assert common.settle_from_args(parser.parse_args(no_wait)) is None
