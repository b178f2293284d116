"""Integration tier: the per-architecture step benchmark (bench/bench_arch.py) end to end at tiny widths (CPU).

The GPU numbers come from ``bash bench/run_on_gpu.sh arch-eager``; these tests keep the harness from rotting:
every architecture in the table, every variant, the compile mode, the native file written and read back or
handed over in memory, and each variant in its own process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration

# parameters of the real models (billions), as published; the table's configs must build them
REAL_PARAMS = {"klein9b": 9.1, "klein4b": 3.9, "zimage": 6.15, "chroma": 8.9, "qwen-image": 20.4, "wan14b": 14.3}


@pytest.fixture
def pack_layout(comfyui):
    """The harness installs the pack's layout for native files (as ComfyUI with the pack does); restore it."""
    import comfy.quant_ops

    algo = comfy.quant_ops.QUANT_ALGOS["int8_tensorwise"]
    saved = algo["comfy_tensor_layout"]
    yield
    algo["comfy_tensor_layout"] = saved


def test_every_architecture_is_listed():
    from int8_w8a8.bench import arch_models

    assert set(arch_models.ARCHS) == set(REAL_PARAMS)


@pytest.mark.parametrize("key", sorted(REAL_PARAMS))
def test_table_is_what_comfyui_detects_at_real_widths(comfyui, key):
    """The real-width config of each row builds, through ComfyUI's detection of its keys and shapes, the same
    model (checked on the meta device), with the real model's parameter count."""
    from int8_w8a8.bench import arch_models

    arch = arch_models.ARCHS[key]
    sd = arch_models.meta_model(arch.config).state_dict()
    arch_models.check_detection(arch, sd)
    params = sum(v.numel() for v in sd.values()) / 1e9
    assert params == pytest.approx(REAL_PARAMS[key], rel=0.03)
    broken = dict(sd)
    layer = next(k for k, v in sd.items() if v.dim() == 2 and ("blocks.1." in k or "layers.1." in k))
    broken[layer] = torch.empty((16, 16), device="meta")  # a second block of other widths than the first
    with pytest.raises(AssertionError, match="other shapes"):
        arch_models.check_detection(arch, broken)


def test_dynamic_vram_mode_builds_for_host_memory_and_runs_alone(comfyui, pack_layout):
    """``--modes eager-dvram`` loads BF16, FP8 fast and the pack as ComfyUI's DynamicVRAM does (weights on the host,
    ``disable_dynamic`` off) and compares them within that mode; it runs alone and only for the variants it can build.
    On the CPU ComfyUI gives a plain ModelPatcher (ModelPatcherDynamic needs a GPU load device and comfy-aimdo, which
    ``flux2_model.enable_dynamic_vram`` sets up on the GPU machine)."""
    from int8_w8a8.bench import arch_models, bench_arch

    variants = ["bf16", "fp8-fast", "pack-convert"]
    rows = bench_arch.add_ratios(bench_arch.run(["zimage"], variants, ["eager-dvram"], tiny=True, reps=1, warmup=0))
    assert [(r["variant"], r["mode"]) for r in rows] == [(v, "eager-dvram") for v in variants]
    bf16, fp8, pack = rows
    assert pack["x_bf16"] > 0 and 25 < pack["sqnr_vs_bf16"] < math.inf
    # FP8 fast really holds FP8 weights and runs them (its SQNR is not BF16's inf)
    assert fp8["weights_gb"] < 0.6 * bf16["weights_gb"] and 15 < fp8["sqnr_vs_bf16"] < math.inf
    with pytest.raises(ValueError, match="run it alone"):
        bench_arch.run(["zimage"], ["bf16"], ["eager", "eager-dvram"], tiny=True)
    with pytest.raises(ValueError, match="no DynamicVRAM build"):
        bench_arch.build("comfy-int8", arch_models.ARCHS["zimage"], True, dynamic=True)


def test_variant_env_sets_the_switch_for_its_variant_only(monkeypatch):
    """pack-convert-glugemm runs with the SwiGLU GEMM's opt-in switch set, in its own process or in a shared one: the
    switch is set for the variant and the earlier value restored after, so later variants run as dispatched."""
    from int8_w8a8.bench import bench_arch
    from int8_w8a8.kernels.dispatch import GLU_GEMM_ENV

    monkeypatch.delenv(GLU_GEMM_ENV, raising=False)
    with bench_arch.variant_env("pack-convert-glugemm"):
        assert os.environ[GLU_GEMM_ENV] == "1"
    assert GLU_GEMM_ENV not in os.environ
    monkeypatch.setenv(GLU_GEMM_ENV, "0")
    with bench_arch.variant_env("pack-convert"):
        assert os.environ[GLU_GEMM_ENV] == "0"
    with bench_arch.variant_env("pack-convert-glugemm"):
        assert os.environ[GLU_GEMM_ENV] == "1"
    assert os.environ[GLU_GEMM_ENV] == "0"


def test_fp8_weights_stored_in_the_dtype_their_modules_were_built_for(comfyui):
    """Under DynamicVRAM ComfyUI assigns the state dict's tensors, so a BF16 file loaded as FP8 keeps BF16 weights;
    the FP8 baseline casts them to the dtype ComfyUI built each module for (an FP8 file's weights), as the copy into
    FP8 parameters does without DynamicVRAM. Parameters without a recorded dtype, or already in it, are left alone."""
    from int8_w8a8.bench import flux2_model

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    model[0].weight_comfy_model_dtype = torch.float8_e4m3fn
    model[0].bias_comfy_model_dtype = torch.bfloat16
    weight, bias, norm = model[0].weight.detach().clone(), model[0].bias, model[1].weight
    flux2_model._store_in_model_dtype(model)
    assert model[0].weight.dtype == torch.float8_e4m3fn and not model[0].weight.requires_grad
    torch.testing.assert_close(model[0].weight.float(), weight.to(torch.float8_e4m3fn).float())
    assert model[0].bias is bias and model[1].weight is norm


@pytest.mark.parametrize("key", sorted(REAL_PARAMS))
def test_harness_runs_every_variant_tiny(comfyui, pack_layout, key, tmp_path, capsys):
    from int8_w8a8.bench import bench_arch

    out = tmp_path / "rows.json"
    bench_arch.main(["--tiny", "--no-isolate", "--models", key, "--variants", *bench_arch.VARIANTS, "--reps", "1",
                     "--warmup", "0", "--settle-s", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["variant"] for r in rows] == list(bench_arch.VARIANTS)
    assert result["env"]["cpu"] and result["env"]["host_us"] > 0  # the host the step times depend on
    by_variant = {r["variant"]: r for r in rows}
    for row in rows:
        assert row["arch"] == key and row["mode"] == "eager" and row["res"] == "tiny"
        assert row["ms"] > 0 and row["device_ms"] > 0 and row["x_bf16"] > 0 and row["weights_gb"] > 0
        assert row["x_fp8"] > 0 and row["x_native"] > 0
        assert (row["int8_layers"] > 0) == (row["variant"] not in ("bf16", "fp8-fast")) and row["linear_layers"] > 0
        pack = row["variant"].startswith("pack-")
        assert (row["pack_cast_layers"] == 0) if pack else row["pack_cast_layers"] is None  # fully loaded
    assert by_variant["bf16"]["sqnr_vs_bf16"] == math.inf
    for variant in ("comfy-int8", "pack-native", "pack-convert", "stock-native"):
        # every INT8 variant holds the same INT8 weights; they differ in kernels and rounding of activations
        assert 25 < by_variant[variant]["sqnr_vs_bf16"] < math.inf, variant
        assert by_variant[variant]["weights_gb"] < by_variant["bf16"]["weights_gb"], variant
        assert by_variant[variant]["weights_gb"] == pytest.approx(by_variant["pack-convert"]["weights_gb"], rel=0.02)
    assert by_variant["fp8-fast"]["sqnr_vs_bf16"] > 15
    # quantize_extra_blocks converts Z-Image's refiners (two noise and two context refiners of five linears each here)
    more = by_variant["pack-convert-opt"]["int8_layers"] - by_variant["pack-convert"]["int8_layers"]
    assert more == (20 if key == "zimage" else 0) and by_variant["pack-convert-opt"]["sqnr_vs_bf16"] > 25
    assert by_variant["pack-native"]["native_source"] == "file"  # small enough to go through the disk
    assert by_variant["pack-convert"]["native_source"] is None
    assert "| x BF16 | x FP8 | x native |" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["zimage", "wan14b"])
def test_harness_lora_variants_tiny(comfyui, pack_layout, key, tmp_path, capsys):
    """The -lora64 rows: a LoRA on every linear (ComfyUI's patches for BF16, the pack's dynamic LoRA), SQNR against
    BF16 with the same LoRA, ratios against the -lora64 rows and the overhead over the same variant without it."""
    from int8_w8a8.bench import bench_arch

    out = tmp_path / "rows.json"
    bench_arch.main(["--tiny", "--no-isolate", "--models", key, "--variants", "bf16", "pack-convert",
                     *bench_arch.LORA_VARIANTS, "--reps", "1", "--warmup", "0", "--ref-dir", str(tmp_path / "refs"),
                     "--settle-s", "0", "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["bf16", "pack-convert", "bf16-lora64", "pack-convert-lora64"]
    assert os.path.exists(tmp_path / "refs" / f"ref-{key}-tiny-lora64.pt")
    lora, plain = rows["pack-convert-lora64"], rows["pack-convert"]
    assert rows["bf16-lora64"]["sqnr_vs_bf16"] == math.inf and 25 < lora["sqnr_vs_bf16"] < math.inf
    assert lora["x_bf16"] == pytest.approx(rows["bf16-lora64"]["ms"] / lora["ms"])
    assert lora["lora_overhead"] == pytest.approx(lora["ms"] / plain["ms"] - 1)
    assert plain["lora_overhead"] is None and lora["pack_cast_layers"] == 0
    assert "dynamic LoRA:" in capsys.readouterr().out


def test_step_loads_the_model_once_as_a_sampler_does(comfyui, pack_layout, monkeypatch):
    """A step loads its model only when it is not loaded (a sampler's prepare_sampling, once per run): reloading a
    loaded model re-applies every object patch (fused blocks, dynamic LoRA terms), host time no real step pays."""
    import comfy.model_management

    from int8_w8a8.bench import arch_models, bench_arch, bench_model

    arch = arch_models.ARCHS["zimage"]
    patcher, _ = bench_arch.build("pack-convert", arch, True, "auto")
    patcher = bench_arch._with_lora(patcher, arch, True, 8, pack=True)
    inputs = arch_models.step_inputs(patcher, arch.step_shape(True), "cpu")
    loads = []
    load = comfy.model_management.load_models_gpu
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", lambda models, *a, **k: (loads.append(models),
                                                                                             load(models, *a, **k)))
    first = bench_model.step(patcher, inputs)
    assert torch.equal(bench_model.step(patcher, inputs), first)
    assert [[m is patcher for m in models] for models in loads] == [[True]]
    clone = patcher.clone()  # another patcher (e.g. TorchCompileModel's clone) is loaded on its first step
    bench_model.step(clone, inputs)
    assert len(loads) == 2 and loads[1][0] is clone


def test_harness_compile_mode_and_native_state_dict_in_memory(comfyui, pack_layout, tmp_path):
    from int8_w8a8.bench import bench_arch

    out = tmp_path / "rows.json"
    bench_arch.main(["--tiny", "--no-isolate", "--models", "zimage", "--variants", "bf16", "pack-native",
                     "--modes", "compile", "--backend", "eager", "--native-file", "memory", "--reps", "1",
                     "--warmup", "1", "--ref-dir", str(tmp_path / "refs"), "--settle-s", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["mode"]) for r in rows] == [("bf16", "compile"), ("pack-native", "compile")]
    # without an eager BF16 row the BF16 process still makes the eager reference for SQNR
    assert os.path.exists(tmp_path / "refs" / "ref-zimage-tiny.pt")
    assert rows[1]["native_source"] == "memory" and 25 < rows[1]["sqnr_vs_bf16"] < math.inf
    assert rows[0]["sqnr_vs_bf16"] > 60  # compiled BF16 against eager BF16


def test_harness_isolates_variants_and_merges_files(comfyui, tmp_path):
    """Each variant in its own process (the default), SQNR through the reference the BF16 process saved; two
    result files merged into one table with the ratios recomputed."""
    env = _package_env()
    run = [sys.executable, "-m", "int8_w8a8.bench.bench_arch", "--tiny", "--models", "wan14b", "--reps", "1",
           "--warmup", "0", "--settle-s", "0"]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    subprocess.run([*run, "--variants", "bf16", "pack-convert", "--out", str(first)], env=env, check=True,
                   timeout=600)
    rows = json.loads(first.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["bf16", "pack-convert"]
    assert 25 < rows[1]["sqnr_vs_bf16"] < math.inf and rows[1]["x_bf16"] > 0
    second.write_text(json.dumps({"rows": [{**rows[1], "variant": "fp8-fast", "ms": 2 * rows[1]["ms"]}]}))
    from int8_w8a8.bench import bench_arch

    merged = bench_arch.merge([str(first), str(second)])
    assert [r["variant"] for r in merged] == ["bf16", "fp8-fast", "pack-convert"]
    assert merged[2]["x_fp8"] == pytest.approx(2.0)


def test_merge_keeps_each_lora_overhead_from_its_own_run(tmp_path):
    """Merged tables compare the latest row of each variant, but a LoRA row's overhead stays the one against the
    row without the LoRA of its own run (and stays so when a merged table is merged again)."""
    from int8_w8a8.bench import bench_arch

    def row(variant, ms):
        return {"arch": "zimage", "res": "1024x1024", "mode": "eager", "variant": variant, "ms": ms,
                "device_ms": ms}

    first, second, again = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    first.write_text(json.dumps({"rows": [row("bf16", 120.0), row("pack-convert", 80.0),
                                          row("pack-convert-lora64", 88.0)]}))
    second.write_text(json.dumps({"rows": [row("bf16", 118.0), row("pack-convert", 78.0)]}))
    merged = {r["variant"]: r for r in bench_arch.merge([str(first), str(second)])}
    assert merged["pack-convert"]["x_bf16"] == pytest.approx(118 / 78)
    assert merged["pack-convert-lora64"]["lora_overhead"] == pytest.approx(0.1)
    again.write_text(json.dumps({"rows": list(merged.values())}))
    merged = {r["variant"]: r for r in bench_arch.merge([str(again), str(second)])}
    assert merged["pack-convert-lora64"]["lora_overhead"] == pytest.approx(0.1)


def test_guard_report_counts_the_guards_of_one_compiled_graph(comfyui, tmp_path):
    """bench/guard_report.py at tiny widths on the CPU (its own process: it picks ComfyUI's SDPA attention before
    ComfyUI is imported): one graph, no breaks, one lookup a step, and no INT8 weight of the pack's model guarded as a
    QuantizedTensor (resident layers hand the graph their plain parts, ``Int8Linear._traced``); with
    ``traced_weights`` off (``pack-convert-qt``) every fused layer's weight is, as before bench/NOTES.md item 51."""
    env = _package_env()
    out = tmp_path / "guards.json"
    subprocess.run([sys.executable, "-m", "int8_w8a8.bench.guard_report", "--tiny", "--layers", "3", "--variants",
                    "bf16", "pack-convert", "pack-convert-qt", "--reps", "2", "--out", str(out)],
                   env=env, check=True, timeout=600)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    for row in rows.values():
        assert row["graphs"] == 1 and not row["graph_breaks"] and row["lookups_per_step"] == 1
        assert row["lookup_ms"] > 0 and row["guards_kept"] <= row["guards_seen"]
    for variant in ("bf16", "pack-convert"):
        assert "TENSOR_SUBCLASS_METADATA_MATCH" not in rows[variant]["by_type"]
    # Z-Image's 3 fused layers: qkv, out, w1, w2, w3 each
    assert rows["pack-convert-qt"]["by_type"]["TENSOR_SUBCLASS_METADATA_MATCH"] == 3 * 5
    assert rows["pack-convert"]["guards_kept"] < rows["pack-convert-qt"]["guards_kept"]


def test_guard_report_interleaved_times_each_variants_own_check(comfyui, tmp_path):
    """``guard_report --interleave``: every variant compiled in one process, each guard manager checked on its own
    step's frame (it raises if that check fails), times per check; the pack's tree is smaller than with the
    QuantizedTensor in the graph (``pack-convert-qt``)."""
    env = _package_env()
    out = tmp_path / "checks.json"
    subprocess.run([sys.executable, "-m", "int8_w8a8.bench.guard_report", "--tiny", "--layers", "2", "--variants",
                    "pack-convert-qt", "pack-convert", "--interleave", "3", "--out", str(out)],
                   env=env, check=True, timeout=600)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert all(0 < r["check_ms_min"] <= r["check_ms_p10"] <= r["check_ms_median"] for r in rows.values())
    assert rows["pack-convert"]["tree_lines"] < rows["pack-convert-qt"]["tree_lines"]


def test_cpu_proxy_step_replays_every_int8_linear(comfyui):
    """profile_host's whole-step CPU proxy (a tiny Qwen-Image, launches stopped at Triton's C launcher), eager and
    compiled, times a step and its first pack launch and counts INT8 linears that took the launch path: none, the
    per-block modulation layers included (their LinearPlans must take the proxy's Triton backend, or they ran the
    launch path and inflated the step)."""
    out = subprocess.run([sys.executable, "-m", "int8_w8a8.bench.profile_host", "--cpu-proxy-step", "qwen-image",
                          "--layers", "2"], env=_package_env(), check=True, timeout=600, capture_output=True, text=True)
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("qwen-image, 2 blocks: ") and " ms to the first pack launch; step host " in line and \
        line.endswith(" us per block, 0 INT8 linears a step on the launch path"), line
    # the same step compiled (TorchCompileModel; the eager backend keeps the test short): the pack's ops still replay
    out = subprocess.run([sys.executable, "-m", "int8_w8a8.bench.profile_host", "--cpu-proxy-step", "qwen-image",
                          "--layers", "2", "--compile", "eager"], env=_package_env(), check=True, timeout=600,
                         capture_output=True, text=True)
    line = out.stdout.strip().splitlines()[-1]
    assert line.startswith("qwen-image, 2 blocks (eager): ") and " ms to the first pack launch; " in line and \
        line.endswith(" 0 INT8 linears a step on the launch path"), line


def _package_env() -> dict:
    """This process's environment with the directory holding the ``int8_w8a8`` package on PYTHONPATH, so that a
    ``python -m int8_w8a8...`` child imports the package under test."""
    import int8_w8a8

    parent = os.path.dirname(os.path.dirname(int8_w8a8.__file__))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (parent, os.environ.get("PYTHONPATH")) if p)}


def test_idle_report_finds_gaps_syncs_and_the_op_the_gpu_waited_for():
    """profile_step.idle_report on a made-up timeline: kernels 0-10 and 12-20 us (a gap below the threshold), then a
    50 us gap that ends inside a host op (what the GPU waited for), and one synchronization call."""
    from types import SimpleNamespace

    from int8_w8a8.bench import profile_step

    def ev(name, start, end, dev):
        return SimpleNamespace(name=name, device_type=dev, time_range=SimpleNamespace(start=start, end=end))

    gpu, cpu = "cuda", "cpu"
    events = [ev("k1", 0, 10, gpu), ev("k2", 12, 20, gpu), ev("k3", 70, 100, gpu), ev("k4", 90, 95, gpu),
              ev("step", -30, 110, cpu), ev("int8_w8a8::int8_gemm", 60, 75, cpu), ev("cudaLaunchKernel", 69, 71, cpu),
              ev("cudaStreamSynchronize", 21, 40, cpu), ev("cudaMemcpyAsync", 41, 42, cpu)]
    report = profile_step.idle_report(events, gpu, gap_us=5.0)
    assert report["idle_ms"] == pytest.approx(0.050)
    assert report["lead_ms"] == pytest.approx(0.030)
    assert report["gaps"] == [{"ms": 0.05, "at_ms": 0.07, "op": "int8_w8a8::int8_gemm"}]
    assert report["syncs"] == {"cudaStreamSynchronize": [1, pytest.approx(0.019)]}
    assert profile_step.idle_report([ev("step", 0, 1, cpu)], gpu)["idle_ms"] is None


def test_trace_report_summarizes_a_step_trace(tmp_path):
    """bench/trace_report.py on a made-up gzipped Chrome trace: kernel totals and span, the first kernel's launch
    (matched by correlation id) after the step's frame began and what ran before it, host names by total and by self
    time."""
    import gzip

    from int8_w8a8.bench import trace_report

    def x(name, cat, ts, dur, **args):
        return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "args": args}

    events = [x("int8_w8a8/bench/bench_model.py(133): step", "python_function", 0, 500),
              x("comfy/model_management.py(884): load_models_gpu", "python_function", 5, 95),
              x("cudaLaunchKernel", "cuda_runtime", 120, 5, correlation=7),
              x("_gemm_tma_kernel", "kernel", 130, 200, correlation=7),
              x("cudaLaunchKernel", "cuda_runtime", 300, 5, correlation=8),
              x("_gemm_tma_kernel", "kernel", 340, 100, correlation=8),
              x("int8_w8a8/kernels/fused.py(446): int8_gemm", "python_function", 110, 20),
              x("int8_w8a8/kernels/fused.py(446): int8_gemm", "python_function", 290, 20),
              {"ph": "i", "name": "marker", "ts": 1}]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    r = trace_report.report(trace_report.load(str(path)), match=("kernels/fused",))
    assert r["device_ms"] == pytest.approx(0.3) and r["span_ms"] == pytest.approx(0.31)
    assert r["kernels"] == [("_gemm_tma_kernel", pytest.approx(0.3), 2)]
    assert r["first_launch_ms"] == pytest.approx(0.12)
    assert r["before_first_launch"] == [("comfy/model_management.py(884): load_models_gpu", pytest.approx(0.095))]
    assert r["host"] == [("int8_w8a8/kernels/fused.py(446): int8_gemm", pytest.approx(0.04), 2)]
    # self time: the step's frame less its nested frames and calls (95 + 20 + 20 us), each gemm frame less its launch
    assert r["self"] == [("int8_w8a8/bench/bench_model.py(133): step", pytest.approx(0.365), 1),
                         ("comfy/model_management.py(884): load_models_gpu", pytest.approx(0.095), 1),
                         ("int8_w8a8/kernels/fused.py(446): int8_gemm", pytest.approx(0.03), 2),
                         ("cudaLaunchKernel", pytest.approx(0.01), 2)]
    # an event that starts inside another and ends after it counts against it for the overlap only
    bad = [x("outer", "python_function", 0, 100), x("op", "cpu_op", 60, 80), x("inner", "python_function", 70, 20)]
    assert {n: (ms, k) for n, ms, k in trace_report.self_times(bad)} == {
        "outer": (pytest.approx(0.06), 1), "op": (pytest.approx(0.06), 1), "inner": (pytest.approx(0.02), 1)}
    trace_report.main([str(path)])  # prints the same


def test_harness_overlapped_processes_take_turns(comfyui, tmp_path):
    """``--overlap``: one architecture's variant processes start together (``bench/turns.py``: builds one at a
    time, each row's timed part alone) and give the same table as before: every row, each SQNR against the
    reference the BF16 process saved in its first timed section, eager and compiled in one run; each timed step's
    CPU recorded, and ``--pin-gpu-cpus`` passed to each process (no GPU here: nothing pinned)."""
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, "-m", "int8_w8a8.bench.bench_arch", "--tiny", "--overlap", "--models", "zimage",
                    "--variants", "bf16", "fp8-fast", "pack-convert", "--modes", "eager", "compile", "--backend",
                    "eager", "--reps", "1", "--warmup", "1", "--pin-gpu-cpus", "--settle-s", "2", "--out", str(out)],
                   env=_package_env(),
                   check=True, timeout=900)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["mode"]) for r in rows] == [
        (v, m) for m in ("eager", "compile") for v in ("bf16", "fp8-fast", "pack-convert")]
    assert all(r["overlapped_setup"] for r in rows)
    # where each timed step ran (item 87); --pin-gpu-cpus reaches each process and pins nothing without a GPU
    assert all(len(r["runs_cpu"]) == 1 and isinstance(r["runs_cpu"][0], int) for r in rows)
    assert all(len(r["runs_host_us"]) == 1 and r["runs_host_us"][0] > 0 and len(r["runs_mhz"]) == 1 for r in rows)
    assert all(r["pinned_cpus"] is None for r in rows)
    # and what the host did meanwhile (item 88): the thread's CPU share, busy CPUs, steal, preemptions
    assert all(len(r["runs_sys"]) == 1 and r["runs_sys"][0]["thread_cpu_pct"] >= 0 for r in rows)
    # each row waited (at most --settle-s) for the host's speed the parent measured at its start (item 88)
    assert len({r["host_settle"]["reference_us"] for r in rows}) == 1
    assert all(r["host_settle"]["probes"] >= 1 and r["host_settle"]["settle_s"] <= 2 + 1 for r in rows)
    assert all(r["retimed"] == [] for r in rows)  # one step a row: no spread, nothing timed again
    sqnr = {(r["variant"], r["mode"]): r["sqnr_vs_bf16"] for r in rows}
    assert sqnr[("bf16", "eager")] == math.inf and sqnr[("bf16", "compile")] > 60
    assert all(15 < sqnr[(v, m)] < math.inf for v in ("fp8-fast", "pack-convert") for m in ("eager", "compile"))
    # Dynamo's counters: the compiled rows compiled before their timed steps, and nothing during them
    assert all(r["dynamo"].get("stats/unique_graphs", 0) >= 1 for r in rows if r["mode"] == "compile")
    assert not any(d for r in rows for d in r["runs_dynamo"])
    from int8_w8a8.bench import bench_arch

    with pytest.raises(ValueError, match="does not apply to eager-dvram"):
        bench_arch.main(["--tiny", "--overlap", "--models", "zimage", "--modes", "eager-dvram"])


def test_step_shapes_scale_the_image_not_the_text():
    """``--scale``: the latent's height and width grow, the text and the frames stay; the table's res follows."""
    from int8_w8a8.bench import arch_models

    zimage, wan = arch_models.ARCHS["zimage"], arch_models.ARCHS["wan14b"]
    assert zimage.step_shape(scale=2) == arch_models.StepShape((16, 256, 256), (512, 2560), "2048x2048")
    assert wan.step_shape(scale=2) == arch_models.StepShape((16, 9, 120, 208), (512, 4096), "1664x960x33")
    assert zimage.step_shape() is zimage.shape and zimage.step_shape(True, 2).res == "tiny*2"
    with pytest.raises(ValueError, match="factor >= 1"):
        zimage.shape.scaled(0)


def test_harness_scaled_image_tiny(comfyui, pack_layout, tmp_path):
    """A step at twice the tiny image's size through ComfyUI's Z-Image, BF16 and the pack in one process: rows
    named by the scaled res, the pack's SQNR against the BF16 output of that size."""
    from int8_w8a8.bench import bench_arch

    out = tmp_path / "rows.json"
    bench_arch.main(["--tiny", "--no-isolate", "--models", "zimage", "--variants", "bf16", "pack-convert",
                     "--scale", "2", "--reps", "1", "--warmup", "1", "--settle-s", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["res"]) for r in rows] == [("bf16", "tiny*2"), ("pack-convert", "tiny*2")]
    assert 15 < rows[1]["sqnr_vs_bf16"] < math.inf


def test_out_of_memory_variants_run_again_alone(tmp_path, capsys):
    """``--overlap``: a variant process that exits with ``OUT_OF_MEMORY_EXIT`` runs again by itself after the others
    (real processes: the first attempt of the second command runs out, its second succeeds); other failures keep
    their code and are not rerun."""
    from int8_w8a8.bench import bench_arch

    marker = tmp_path / "tried"
    flaky = [sys.executable, "-c", f"import os, sys; p = {str(marker)!r}; "
             f"sys.exit(0 if os.path.exists(p) else (open(p, 'w').close() or {bench_arch.OUT_OF_MEMORY_EXIT}))"]
    cmds = [[sys.executable, "-c", "pass"], flaky, [sys.executable, "-c", "raise SystemExit(1)"]]
    first = [subprocess.run(c).returncode for c in cmds]
    assert first == [0, bench_arch.OUT_OF_MEMORY_EXIT, 1]
    assert bench_arch.rerun_out_of_memory(cmds, first, ["a", "b", "c"]) == [0, 0, 1]
    said = capsys.readouterr().out
    assert "b: out of GPU memory beside the other variants' processes; running it again alone" in said
    assert "a:" not in said and "c:" not in said


def test_child_out_of_memory_exits_with_its_code(comfyui, pack_layout, monkeypatch, tmp_path):
    """A variant's child process (``--rows-out``) that runs out of GPU memory exits with ``OUT_OF_MEMORY_EXIT`` (its
    parent runs it again alone); run directly, the error propagates."""
    from int8_w8a8.bench import bench_arch

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 MiB.")

    monkeypatch.setattr(bench_arch, "run", oom)
    argv = ["--tiny", "--no-isolate", "--models", "zimage", "--variants", "pack-native", "--settle-s", "0"]
    with pytest.raises(SystemExit) as exit_info:
        bench_arch.main([*argv, "--rows-out", str(tmp_path / "rows.json")])
    assert exit_info.value.code == bench_arch.OUT_OF_MEMORY_EXIT
    with pytest.raises(torch.OutOfMemoryError):
        bench_arch.main(argv)


def test_flux2_harness_rows_wait_for_the_host(comfyui, tmp_path):
    """bench_model (the FLUX.2 harness behind `model-attn8` and the klein rows), each variant in its own process: every
    row waits for the host speed the parent measured at its start (item 88; bounded by --settle-s) and records it."""
    out = tmp_path / "rows.json"
    subprocess.run([sys.executable, "-m", "int8_w8a8.bench.bench_model", "--models", "tiny", "--res", "64",
                    "--variants", "bf16", "pack-row", "--isolate", "--settle-s", "2", "--out", str(out)],
                   env=_package_env(), check=True, timeout=600)
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"bf16", "pack-row"}
    assert len({r["host_settle"]["reference_us"] for r in rows.values()}) == 1
    assert all(r["host_settle"]["probes"] >= 1 and r["host_settle"]["settle_s"] <= 2 + 1 for r in rows.values())
    assert 20 < rows["pack-row"]["sqnr_vs_bf16"] < math.inf
