"""The Gluon INT8 GEMM for Hopper (kernels/gluon_gemm.py): Hopper's large-M GEMM row (configs.HOPPER_GLUON_LARGE).

Without a GPU: its configs' rules, the PTX wait analysis on known text, every benchmarked config compiled for
sm_90 offline (wgmma s8 with a product left in flight, no spills, within 227 KB), and its host launch bound by
Triton's JIT on CPU tensors and compiled for sm_90. On an SM 9.x GPU: the kernel
against the torch twin bit for bit at odd shapes (M = 1, 15, 16, 17; N and K not multiples of the tiles),
per-row and per-tensor scales, bias, every output dtype, strided rows, NaN and all-zero rows, and its input rules;
the table's row through the eager hot path (recorded and replayed launches, ``kernels/direct.py``), the fused
blocks' gated residual GEMM and a LoRA term (which runs the plain TMA kernel), each the twin's bits.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from int8_w8a8.kernels import reference as ref
from int8_w8a8.kernels.gluon_gemm import GluonGemmConfig

from .conftest import HAS_CUDA

HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.unit
@pytest.mark.parametrize("kwargs", [{"block_m": 64, "num_warps": 8}, {"block_n": 96}, {"block_k": 48},
                                    {"stages": 1}, {"num_warps": 2, "block_m": 32}, {"group_m": 0},
                                    {"ctas_per_sm": 0}, {"max_registers": 32}, {"max_registers": 300}])
def test_config_rules(kwargs):
    with pytest.raises(ValueError, match="GluonGemmConfig"):
        GluonGemmConfig(**kwargs)


@pytest.mark.unit
def test_refuses_operands_off_hopper():
    """CPU operands (or any GPU but SM 9.x): ValueError naming the rule, not a compile for the wrong target."""
    from int8_w8a8.kernels import gluon_gemm

    xq, wq = torch.zeros(4, 64, dtype=torch.int8), torch.zeros(8, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="Hopper"):
        gluon_gemm.gemm(xq, torch.ones(4), wq, torch.ones(8), None, torch.bfloat16)


@pytest.mark.unit
def test_wgmma_wait_analysis_on_known_ptx():
    """wait_group 0 right after the commit (Triton 3.6's INT8 products) against products left in flight."""
    from int8_w8a8.bench.check_ptx_attention import wgmma_overlap

    sync = ("wgmma.fence.sync.aligned;\nwgmma.commit_group.sync.aligned;\nmov.b32 %r1, 0;\n"
            "wgmma.wait_group.sync.aligned 0;")
    assert wgmma_overlap(sync) == {"wgmma_waits": [0], "wgmma_overlap_instr": 0}
    flight = ("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 1;\nex2.approx.f32 %f1, %f2;\n"
              "add.f32 %f3, %f1, %f1;\nwgmma.commit_group.sync.aligned;\nex2.approx.f32 %f4, %f3;\n"
              "wgmma.wait_group.sync.aligned 0;")
    assert wgmma_overlap(flight) == {"wgmma_waits": [0, 1], "wgmma_overlap_instr": 1}
    # a product issued before a softmax and waited for (with the next one) after it: counted from its own commit
    under = ("wgmma.commit_group.sync.aligned;\nex2.approx.f32 %f1, %f2;\nadd.f32 %f3, %f1, %f1;\n"
             "wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;")
    assert wgmma_overlap(under) == {"wgmma_waits": [0], "wgmma_overlap_instr": 2}


@pytest.mark.kernels
def test_configs_compile_for_hopper_with_a_product_in_flight():
    """Offline sm_90 compile of every benchmarked config: wgmma s32.s8.s8, ``wait_group 1`` (Triton's own INT8
    kernels only wait with 0), no spills in the K loop (the SASS; spills in the epilogue are the price of a register
    cap or of the 256-wide tile's 255 registers), no ptxas wait, shared memory within sm_90's 227 KB."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISABLE_MMA_V3", "INT8_W8A8_FORCE_ARCH")}
    env["TRITON_INTERPRET"] = "0"
    out = subprocess.run([sys.executable, "-m", "int8_w8a8.bench.bench_gluon_gemm", "--check"], capture_output=True,
                         text=True, env=env, timeout=600)
    if out.returncode != 0 and "No module named 'triton" in out.stderr:
        pytest.skip("Triton (with Gluon) is not installed")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("gluon ")]
    from int8_w8a8.bench.bench_gluon_gemm import CONFIGS

    assert out.returncode == 0 and len(lines) == 2 * len(CONFIGS), (out.stdout[-3000:], out.stderr[-3000:])
    glu = [ln for ln in out.stdout.splitlines() if ln.startswith("glu ")]  # the SwiGLU GEMM, with and without HEAD
    from int8_w8a8.bench.bench_gluon_gemm import GLU_CONFIGS

    assert len(glu) == 2 * len(GLU_CONFIGS) and all("s32.s8.s8" in ln and "wait=[0, 1]" in ln and "regs=128 " in ln
                                                 and ln.endswith(" OK") for ln in glu), glu
    capped = [ln for ln in lines if " r128 " in ln]  # max_registers=128: the cap holds
    assert len(capped) == 4 and all("regs=128 " in ln for ln in capped), capped
    assert all("s32.s8.s8" in ln and "wait=[0, 1]" in ln and ln.endswith(" OK") for ln in lines), lines
    # the host launch (descriptors, scales, bias, out dtypes) bound by Triton's JIT and compiled for sm_90
    launches = [ln for ln in out.stdout.splitlines() if ln.startswith("launch: ")]
    assert len(launches) == 2 and all(ln.endswith(" OK") for ln in launches), launches


def _operands(m: int, k: int, n: int, row_pad: int = 0):
    """xq [M, K] (rows ``row_pad`` bytes apart beyond K when given), x_scale [M], wq [N, K], w_scale [N], on the GPU."""
    x = torch.randn(m, k, device="cuda")
    buf = torch.empty(m, k + row_pad, device="cuda", dtype=torch.int8)
    xq, xs = ref.quantize_rows(x)
    buf[:, :k] = xq
    wq, ws = ref.quantize_weight(torch.randn(n, k, device="cuda") * 0.05)
    return buf[:, :k], xs.reshape(-1), wq, ws.reshape(-1)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Gluon GEMM is written for SM 9.x (Hopper)")
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (15, 96, 200), (16, 128, 128), (17, 4096, 300), (300, 160, 1024),
                                   (777, 3072, 1000)])
@pytest.mark.parametrize("cfg", [GluonGemmConfig(), GluonGemmConfig(64, 128, 128, 4, 4),
                                 GluonGemmConfig(128, 128, 64, 6, 8), GluonGemmConfig(persistent=True),
                                 GluonGemmConfig(64, 128, 128, 4, 4, persistent=True, ctas_per_sm=2),
                                 GluonGemmConfig(128, 128, 64, 4, 8, max_registers=128),
                                 GluonGemmConfig(128, 256, 128, 3, 8)],
                         ids=["128", "64", "128k64", "persistent128", "persistent64x2", "128r128", "256"])
def test_matches_the_twin_bit_for_bit(seed, m, k, n, cfg):
    from int8_w8a8.kernels import gluon_gemm

    xq, xs, wq, ws = _operands(m, k, n, row_pad=16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        for w_scale, b in ((ws, bias), (ws.amax(), None)):
            y = gluon_gemm.gemm(xq, xs, wq, w_scale, b, out_dtype, cfg)
            want = ref.epilogue(ref.int8_matmul(xq, wq), xs, w_scale, b, out_dtype)
            assert y.shape == (m, n) and y.dtype == out_dtype
            assert torch.equal(y, want), (out_dtype, w_scale.dim(), float((y.float() - want.float()).abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Gluon GEMM is written for SM 9.x (Hopper)")
@pytest.mark.parametrize("m,k,n,batches", [(17, 256, 200, 1), (300, 4096, 1000, 2), (777, 3072, 3072, 3)])
@pytest.mark.parametrize("cfg", [GluonGemmConfig(), GluonGemmConfig(64, 128, 128, 4, 4, persistent=True,
                                                                    ctas_per_sm=2),
                                 GluonGemmConfig(128, 128, 64, 4, 8, max_registers=128),
                                 GluonGemmConfig(128, 256, 128, 3, 8)],
                         ids=["128", "persistent64x2", "128r128", "256"])
def test_gated_residual_in_place(seed, m, k, n, batches, cfg):
    """``residual += gate[row // (M / B)] * y`` in place, rounded once: the twin's float32 order and the Triton
    kernel's bits (``triton_gemm.gemm`` with a gate)."""
    from int8_w8a8.kernels import configs, gluon_gemm, triton_gemm

    xq, xs, wq, ws = _operands(m, k, n)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(batches, n, device="cuda", dtype=torch.bfloat16)
    start = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    res = start.clone()
    assert gluon_gemm.gemm(xq, xs, wq, ws, bias, torch.bfloat16, cfg, residual=res, gate=gate) is res
    from int8_w8a8.kernels import reference_fused

    twin = reference_fused.int8_gemm_residual(xq, xs, wq, ws, bias, start.clone(), gate, m // batches)
    assert torch.equal(res, twin)
    triton_res = start.clone()
    cfg_t = configs.for_residual(configs.HOPPER_PLAIN_TABLE.rows[-1][1])
    triton_gemm.gemm(xq, xs, wq, ws, bias, triton_res, cfg_t, gate=gate, rows_per_batch=m // batches)
    assert torch.equal(res, triton_res)
    with pytest.raises(ValueError, match="together"):
        gluon_gemm.gemm(xq, xs, wq, ws, bias, torch.bfloat16, cfg, residual=res)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Gluon GEMM is written for SM 9.x (Hopper)")
def test_nan_and_zero_rows_and_input_rules(seed):
    from int8_w8a8.kernels import gluon_gemm

    xq, xs, wq, ws = _operands(17, 256, 130)
    xq[3] = 0
    xs[5] = float("nan")  # a row whose input held NaN/Inf: its scale is NaN, so is its output row
    y = gluon_gemm.gemm(xq, xs, wq, ws, None, torch.bfloat16)
    assert torch.equal(y[3], torch.zeros_like(y[3])) and y[5].isnan().all()
    assert not y[[i for i in range(17) if i != 5]].isnan().any()
    assert gluon_gemm.gemm(xq[:0], xs[:0], wq, ws, None, torch.bfloat16).shape == (0, 130)
    with pytest.raises(ValueError, match="multiple of 16"):
        gluon_gemm.gemm(xq[:, :72], xs, wq[:, :72], ws, None, torch.bfloat16)
    with pytest.raises(ValueError, match="contiguous"):
        gluon_gemm.gemm(xq.t().contiguous().t(), xs, wq, ws, None, torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype"):
        gluon_gemm.gemm(xq, xs, wq, ws, None, torch.int32)


def _gluon_backend():
    from int8_w8a8.kernels import configs, dispatch

    if dispatch.gluon_error() is not None:
        pytest.skip(f"no Gluon GEMM here: {dispatch.gluon_error()}")
    return dispatch.Backend("triton", "test", (9, 0), table=configs.HOPPER_GLUON_TABLE)


def _launched(replay) -> set[str]:
    return {rec.launcher.fn.__name__ for rec, *_ in replay.launches}


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Gluon GEMM is written for SM 9.x (Hopper)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1100, 8300])
def test_table_row_replays_bit_for_bit(seed, dtype, m):
    """An eager layer at M > 1024 on Hopper's table (past 8192 rows its 256-wide row): the Gluon GEMM, recorded
    once and replayed through Triton's C launcher with this call's operands (its host descriptors re-based), bit
    for bit the launch path and the twin, call after call; the rows' quantizer replays with it."""
    from int8_w8a8.kernels import direct, triton_ops

    backend = _gluon_backend()
    k, n = 3840, 1000
    wq, ws = ref.quantize_weight(torch.randn(n, k, device="cuda") * 0.05)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    plan = direct.LinearPlan(wq, ws, bias, backend=backend)
    for _ in range(3):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        y = plan(x)
        assert torch.equal(y, triton_ops.int8_linear(x, wq, ws, bias, dtype, None, 0, backend))
        assert torch.equal(y, ref.int8_linear(x, wq, ws, bias, out_dtype=dtype))
    replay = next(iter(plan.replays.values()))
    assert isinstance(replay, direct._Replay) and "_gluon_gemm_kernel" in _launched(replay)
    assert all(rec.claunch is not None for rec, *_ in replay.launches)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Gluon GEMM is written for SM 9.x (Hopper)")
def test_table_row_in_the_fused_gemms(seed):
    """The fused blocks' GEMMs on pre-quantized rows at M > 1024 (``fused.int8_gemm`` and the gated residual
    ``int8_gemm_residual``, eager and replayed): the twin's bits; with a dynamic LoRA term the plain TMA kernel
    runs (the Gluon kernel has no LoRA epilogue): that kernel's bits (its LoRA dot sums in another order than the
    twin's, so not the twin's)."""
    from int8_w8a8.kernels import configs, dispatch, fused, gluon_gemm, reference_fused, triton_gemm

    _gluon_backend()
    if dispatch.choose_backend(torch.device("cuda")).table is not _gluon_backend().table:
        pytest.skip("the dispatch does not give this GPU the Gluon table")
    m, k, n, b = 2 * 1100, 3072, 3072, 2
    xq, xs, wq, ws = _operands(m, k, n)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    gate = torch.randn(b, 1, n, device="cuda", dtype=torch.bfloat16)
    h, lb = torch.randn(m, 64, device="cuda", dtype=torch.bfloat16), torch.randn(n, 64, device="cuda",
                                                                                 dtype=torch.bfloat16) * 0.01
    for _ in range(3):  # record, replay
        y = fused.int8_gemm(xq, xs, wq, ws, bias, torch.bfloat16)
        assert torch.equal(y, ref.epilogue(ref.int8_matmul(xq, wq), xs, ws, bias, torch.bfloat16))
        start = torch.randn(b, m // b, n, device="cuda", dtype=torch.bfloat16)
        res = start.clone()
        fused.int8_gemm_residual(xq, xs, wq, ws, bias, res, gate)
        want = reference_fused.int8_gemm_residual(xq, xs, wq, ws, bias, start.reshape(m, n).clone(),
                                                  gate.reshape(b, n), m // b)
        assert torch.equal(res.reshape(m, n), want)
        y = fused.int8_gemm(xq, xs, wq, ws, bias, torch.bfloat16, h, lb)
        plain = triton_gemm.gemm(xq, xs, wq, ws, bias, torch.empty_like(y), configs.HOPPER_PLAIN_TABLE.pick(m), h, lb)
        assert torch.equal(y, plain)  # the LoRA dot sums in another order than the twin's: the plain kernel's bits
    for replayer in (fused._GEMM, fused._GEMM_RESIDUAL):  # both replay the Gluon kernel at this M
        kernels = {rec.launcher.fn for entry in replayer.table.values() if entry is not None
                   for rec, *_ in entry.launches}
        assert gluon_gemm._gluon_gemm_kernel in kernels, replayer.name
