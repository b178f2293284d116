"""Every GPU target the README claims, checked without the hardware: each kernel the dispatch can choose there
is compiled for it (``bench/check_ptx.py --all``, in a subprocess: TRITON_INTERPRET must be off for
triton.compile to target a GPU) and must fit the generation's shared memory and run on the intended INT8
tensor-core instructions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from int8_w8a8.kernels import dispatch, launch

pytestmark = pytest.mark.unit

GENERATIONS = {g.target: g for g in dispatch.GENERATIONS}


@pytest.fixture(scope="module")
def report() -> dict[int, dict]:
    """``check_ptx --all --json``, by target (a few minutes on two cores without Triton's cache)."""
    pytest.importorskip("triton")
    code = "from int8_w8a8.bench import check_ptx; import sys; sys.exit(check_ptx.main(['--all', '--json']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1500, cwd="/",
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    return {r["arch"]: r for r in json.loads(out.stdout)}


def test_every_claimed_target_is_checked(report):
    assert sorted(report) == [75, 80, 86, 89, 90, 100, 120]


def test_turing_runs_the_torch_path_because_int8_dots_do_not_compile(report):
    gen = GENERATIONS[75]
    assert gen.table is None and "torch._int_mm" in gen.path
    assert report[75]["int8_dot_compiles"] is False, report[75]


@pytest.mark.parametrize("arch", [a for a, g in GENERATIONS.items() if g.table is not None])
def test_gemm_configs_fit_and_use_the_intended_tensor_cores(report, arch):
    gen, result = GENERATIONS[arch], report[arch]
    gemms = [r for r in result["rows"] if r["kind"] == "gemm"]
    assert len(gemms) == 5 * len(set(gen.table.configs()))  # plain, two LoRA ranks, residual, residual + LoRA
    for r in gemms:
        where = f"sm_{arch} {r['what']}"
        assert r["outcome"] == "fits", f"{where}: {r['shared_bytes']} bytes of shared memory, {r['tmem_columns']} " \
                                       f"tensor-memory columns; the table must fit {gen.name} ({gen.smem_optin})"
        assert r["shared_bytes"] <= gen.table.smem_bytes, \
            f"{where} needs {r['shared_bytes']} bytes: raise {gen.table.name}'s smem_bytes (Triton {result['triton']})"
        assert not r["trap_only"], f"{where}: Triton compiled the kernel to a trap"
        kernel = "gluon" if r["kernel"] == "_gluon_gemm_kernel" else \
            "tma" if r["tma_loads"] or r["kernel"] == "_gemm_tma_kernel" else "generic"
        expected = set(gen.expected_mma(kernel))
        assert r["int8_mma"] and set(r["int8_mma"]) <= expected, f"{where}: INT8 dot on {r['int8_mma']}, " \
                                                                 f"expected {sorted(expected)}"
        if r["kernel"] == "_gemm_tma_kernel":
            assert r["tma_loads"] > 0 and r["tma_stores"] > 0, where
        elif kernel == "gluon":  # operands through TMA, the epilogue's stores through pointers
            assert r["tma_loads"] > 0, where
        else:
            assert r["cp_async"] > 0, f"{where}: operand loads are not pipelined"


def test_hopper_gemms_run_on_wgmma_with_tma_and_do_not_spill(report):
    """The measured path: every TMA config on INT8 wgmma, loads and stores through TMA, no register spills; the
    large-M rows in Gluon (``configs.HOPPER_GLUON_LARGE``, ``HOPPER_GLUON_XL``) with their plain, residual and LoRA
    epilogues (the LoRA ones run the plain TMA kernel: the Gluon kernel has no LoRA epilogue)."""
    tma = [r for r in report[90]["rows"] if r["kind"] == "gemm" and r["kernel"] == "_gemm_tma_kernel"]
    assert tma and all(r["int8_mma"] == [dispatch.WGMMA] for r in tma)
    for tile in ("128x128x128 w8 s3 r128", "128x256x128 w8 s3"):  # HOPPER_GLUON_LARGE, HOPPER_GLUON_XL
        gluon = {r["what"].split(f" gluon {tile}")[-1]: r["kernel"] for r in report[90]["rows"]
                 if r["what"].startswith(f"gemm gluon {tile}")}
        assert gluon == {"": "_gluon_gemm_kernel", " +residual": "_gluon_gemm_kernel", " +LoRA16": "_gemm_tma_kernel",
                         " +LoRA512": "_gemm_tma_kernel", " +residual +LoRA512": "_gemm_tma_kernel"}, (tile, gluon)
    assert all(r["local"] == 0 for r in report[90]["rows"]), [r["what"] for r in report[90]["rows"] if r["local"]]
    # ptxas did not serialize any kernel's wgmma (its notes C7510-C7517: an in-flight accumulator's registers
    # touched by other instructions; bench/NOTES.md item 59)
    assert not [r["what"] for r in report[90]["rows"] if r["ptxas_waits"]], report[90]["rows"]


def test_consumer_blackwell_runs_no_hopper_kernel(report):
    rows = report[120]["rows"]
    assert all(r["kernel"] != "_gemm_tma_kernel" for r in rows)
    assert all(r["shared_bytes"] <= 101_376 for r in rows if r["kind"] == "gemm")


@pytest.mark.parametrize("arch", [a for a, g in GENERATIONS.items() if g.table is not None])
def test_quantizers_and_fused_kernels_fit_or_take_the_resource_rule(report, arch):
    """Without rotation and with ConvRot group 256 every quantizer fits as launched; the full-matrix groups
    (64, 128) may take a smaller tile or the torch twin (``launch.first_fit``), never an error."""
    for r in (r for r in report[arch]["rows"] if r["kind"] == "kernel"):
        assert r["outcome"] == "fits" or (not r["must_fit"] and r["outcome"].startswith(("smaller", "torch twin"))), \
            f"sm_{arch} {r['what']}: {r['outcome']} ({r['shared_bytes']} bytes)"
        assert not r["trap_only"], r["what"]


def test_every_launched_kernel_is_in_the_check(report):
    """A kernel added to kernels/ without a line in check_ptx.KERNEL_SPECS fails here."""
    from int8_w8a8.kernels import triton_fused, triton_gemm, triton_quant

    launched = {obj.fn.__name__ for mod in (triton_gemm, triton_quant, triton_fused) for obj in vars(mod).values()
                if isinstance(obj, launch.FastLauncher)} | {"_dequantize_kernel"}
    compiled = {r["kernel"] for r in report[90]["rows"]}
    assert launched <= compiled, f"not compiled by bench/check_ptx.py: {sorted(launched - compiled)}"


@pytest.fixture(scope="module")
def ws_report() -> dict:
    """``check_ptx --ws --json``: the warp-specialized Hopper configs, compiled for sm_90 (~1 min)."""
    pytest.importorskip("triton")
    code = "from int8_w8a8.bench import check_ptx; import sys; sys.exit(check_ptx.main(['--ws', '--json']))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd="/",
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.stdout.strip(), out.stderr[-3000:]
    return json.loads(out.stdout)[0]


def test_hopper_ws_variants_split_into_producer_and_consumers(ws_report):
    """Each warp-specialized config, with every epilogue, compiles on sm_90 into a TMA producer warpgroup and two
    consumer warpgroups (12 warps, setmaxnreg), on INT8 wgmma, within shared memory, without spills; a LoRA
    term (bfloat16 or float32) or a gated residual runs the same tiles without the specialization
    (triton_gemm.gemm's rule)."""
    from int8_w8a8.kernels import configs

    rows = ws_report["rows"]
    assert len(rows) == 6 * len(configs.HOPPER_WS_VARIANTS)
    for r in rows:
        assert not r["problems"], f"{r['what']}: {r['problems']}"
        assert r["int8_mma"] == [dispatch.WGMMA] and r["local"] == 0, r["what"]
        assert r["shared_bytes"] <= GENERATIONS[90].smem_optin, r["what"]
        assert r["split"] == ("LoRA" not in r["what"] and "residual" not in r["what"]), r["what"]
        if r["split"]:
            assert r["num_warps"] == 12 and "inc232" in r["setmaxnreg"] and "dec40" in r["setmaxnreg"], r["what"]
