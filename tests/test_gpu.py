"""GPU tier: the dispatched kernels on a real GPU, at FLUX.2 klein shapes, eager and compiled.

Skipped without CUDA (conftest). Run on the GPU machine with ``pytest -m gpu``; with
``INT8_W8A8_FORCE_ARCH=8.6`` the same tests run the sm_8x path (mma.sync table) on a newer GPU
(``bench/run_on_gpu.sh tests-sm8x``).
"""

from __future__ import annotations

import os

import pytest
import torch

from int8_w8a8 import kernels
from int8_w8a8.kernels import configs, dispatch, reference, triton_gemm, triton_ops

from .conftest import rel_err

pytestmark = pytest.mark.gpu


def _arch() -> tuple[int, int]:
    """The capability the kernels are dispatched as (``INT8_W8A8_FORCE_ARCH`` when set)."""
    return dispatch.forced_arch() or torch.cuda.get_device_capability()


def test_dispatch_picks_triton_here():
    backend = kernels.choose_backend(torch.device("cuda"))
    assert backend.name == "triton", backend.reason
    assert backend.arch == _arch()
    assert backend.table is dispatch.generation_for(_arch()).table


def test_forced_sm8x_path_runs_the_mma_sync_kernel(seed):
    """Under INT8_W8A8_FORCE_ARCH=8.x every GEMM takes the pointer-load kernel from the mma.sync table; with
    Triton's DISABLE_MMA_V3=1 its dots are compiled to INT8 mma.sync as on sm_8x: the stand-in for Ampere/Ada."""
    if _arch() >= (9, 0):
        pytest.skip("runs with INT8_W8A8_FORCE_ARCH=8.6 (bench/run_on_gpu.sh tests-sm8x)")
    backend = kernels.choose_backend(torch.device("cuda"))
    assert backend.table is configs.MMA_TABLE
    k, n = 4096, 4096
    q, s = kernels.quantize_weight(torch.randn(n, k, device="cuda") * 0.02)
    for m in (1, 40, 200, 4608):  # every bucket
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(kernels.int8_linear(x, q, s), reference.int8_linear(x, q, s))
    if torch.cuda.get_device_capability() >= (9, 0) and os.environ.get("DISABLE_MMA_V3", "0") in ("", "0"):
        pytest.skip("without DISABLE_MMA_V3=1 Triton lowers these dots to wgmma on this GPU")
    cache = triton_gemm._gemm_kernel.device_caches[torch.cuda.current_device()][0]
    ptx = [kc.asm["ptx"] for kc in cache.values()]
    assert ptx and all("mma.sync.aligned.m16n8k32" in p and ".s8.s8" in p and "wgmma" not in p for p in ptx)


def test_gpu_without_a_rule_runs_after_the_probe(seed, monkeypatch):
    """A capability with no GENERATIONS entry (8.8, dispatched on this GPU) gets the pointer-load kernels once
    a probe GEMM ran correctly here."""
    if torch.cuda.get_device_capability() < (8, 8):
        pytest.skip("needs a GPU of capability 8.8 or newer")
    monkeypatch.setenv(dispatch.FORCE_ARCH_ENV, "8.8")
    dispatch.reset()
    try:
        backend = kernels.choose_backend(torch.device("cuda"))
        assert backend.name == "triton" and "probe GEMM ran correctly" in backend.reason, backend.reason
        x = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16)
        q, s = kernels.quantize_weight(torch.randn(256, 512, device="cuda") * 0.02)
        assert torch.equal(kernels.int8_linear(x, q, s), reference.int8_linear(x, q, s))
    finally:
        monkeypatch.undo()
        dispatch.reset()


@pytest.mark.parametrize("rank", [16, 200])
def test_blackwell_lora_loop_on_this_gpu(seed, rank):
    """The datacenter-Blackwell configs (LoRA chunks in a loop, one accumulator) run here, at every M bucket:
    the same term as the twin's."""
    backend = dispatch.Backend("triton", "test", (10, 0))
    assert backend.table is configs.BLACKWELL_TABLE
    k, n = 1024, 768
    q, s = kernels.quantize_weight(torch.randn(n, k, device="cuda") * 0.05)
    lora_a = torch.randn(rank, k, device="cuda", dtype=torch.bfloat16) * 0.05
    lora_b = torch.randn(n, rank, device="cuda", dtype=torch.bfloat16) * 0.05
    for m in (16, 64, 256, 1024, 1500):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cfg = backend.table.pick(m, tma_ok=torch.cuda.get_device_capability() >= (9, 0))
        y = triton_ops.int8_linear(x, q, s, None, torch.float32, None, 0, backend, config=cfg, lora_a=lora_a,
                                   lora_b=lora_b)
        y_twin = reference.int8_linear(x, q, s, out_dtype=torch.float32, lora_a=lora_a, lora_b=lora_b)
        y_base = reference.int8_linear(x, q, s, out_dtype=torch.float32)
        assert cfg.lora_loop and rel_err(y - y_base, y_twin - y_base) < 1e-5, m  # summed in another order


@pytest.mark.parametrize("m", [1, 15, 16, 17, 64, 65, 512, 4608])
@pytest.mark.parametrize("per_row", [True, False])
def test_public_int8_linear_equals_twin(seed, m, per_row):
    k, n = 3072, 9216
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q, s = kernels.quantize_weight(torch.randn(n, k, device="cuda") * 0.02, per_row=per_row)
    y = kernels.int8_linear(x, q, s)
    y_twin = reference.int8_linear(x, q, s)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, y_twin)  # bf16 output rounded once, identically, from identical integers


def test_attn_proj_slice_input(seed):
    # FLUX double blocks feed attn[:, txt_len:] (a non-foldable 3-D slice) into img_attn.proj
    attn = torch.randn(2, 512 + 1024, 3072, device="cuda", dtype=torch.bfloat16)
    q, s = kernels.quantize_weight(torch.randn(3072, 3072, device="cuda") * 0.02)
    sl = attn[:, 512:]
    y = kernels.int8_linear(sl, q, s)
    assert y.shape == (2, 1024, 3072)
    assert torch.equal(y, kernels.int8_linear(sl.contiguous(), q, s))


def test_small_m_never_dequantizes_the_weight(seed):
    n, k = 24576, 4096
    q, s = kernels.quantize_weight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    kernels.int8_linear(x, q, s)  # compile outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = kernels.int8_linear(x, q, s)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 4 * 2**20, f"M=1 allocated {extra / 2**20:.1f} MiB; a bf16 weight copy would be 192 MiB"
    assert rel_err(y, reference.int8_linear(x, q, s)) == 0.0


def test_accuracy_vs_bf16_gaussian(seed):
    m, k, n = 4608, 4096, 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    y_bf16 = torch.nn.functional.linear(x, w)
    q, s = kernels.quantize_weight(w)
    assert rel_err(kernels.int8_linear(x, q, s), y_bf16) <= 1.5e-2
    q, s = kernels.quantize_weight(w, per_row=False)
    assert rel_err(kernels.int8_linear(x, q, s), y_bf16) <= 2.0e-2


def test_large_k_quantization(seed):
    x = torch.randn(3, 70001, device="cuda", dtype=torch.float16)
    q, s = kernels.quantize_rows(x)
    q_ref, s_ref = reference.quantize_rows(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_hopper_kernels_use_wgmma_and_tma(seed):
    if _arch() != (9, 0):
        pytest.skip("the Hopper path (wgmma/TMA) runs on SM 9.0, without INT8_W8A8_FORCE_ARCH")
    m, k, n = 512, 4096, 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q, s = kernels.quantize_weight(torch.randn(n, k, device="cuda") * 0.02)
    kernels.int8_linear(x, q, s)
    cfg = kernels.choose_backend(x.device).table.pick(m, True)
    assert cfg.kernel == "tma"
    kernel_cache = triton_gemm._gemm_tma_kernel.device_caches[torch.cuda.current_device()][0]
    ptx = [kc.asm["ptx"] for kc in kernel_cache.values()]
    assert ptx and all("wgmma.mma_async" in p and ".s8.s8" in p for p in ptx)
    assert all("cp.async.bulk.tensor" in p for p in ptx)


class _Block(torch.nn.Module):
    def __init__(self, q1, s1, q2, s2):
        super().__init__()
        self.q1, self.s1, self.q2, self.s2 = q1, s1, q2, s2

    def forward(self, x):
        h = kernels.int8_linear(x, self.q1, self.s1)
        return kernels.int8_linear(torch.nn.functional.gelu(h), self.q2, self.s2)


def test_compile_inductor_no_breaks_no_recompiles(seed):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q1, s1 = kernels.quantize_weight(torch.randn(1024, 512, device="cuda") * 0.02)
    q2, s2 = kernels.quantize_weight(torch.randn(512, 1024, device="cuda") * 0.02, per_row=False)
    block = _Block(q1, s1, q2, s2)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    graphs = []
    for m in (17, 512, 33, 4608, 2, 1, 7):
        x = torch.randn(1, m, 512, device="cuda", dtype=torch.bfloat16)
        y = compiled(x)
        graphs.append(counters["stats"]["unique_graphs"])
        assert torch.equal(y, block(x))
    assert not counters["graph_break"], dict(counters["graph_break"])
    # one graph for every M >= 2; PyTorch's 0/1 specialization adds exactly one for M == 1
    assert graphs[:5] == [1] * 5 and graphs[-1] <= 2, f"unique graphs after each call: {graphs}"


def test_compile_inductor_quantization_in_graph(seed):
    """quant_in_graph under Inductor: the quantization is generated (and fused with the norm) by the
    compiler, which keeps the norm's output in float32 instead of rounding it to bf16 first, so codes
    differ from the eager path's by a rounding step in many elements: both must be as close to float64."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q, s = kernels.quantize_weight(torch.randn(3072, 1024, device="cuda") * 0.02)
    w = q.double() * s.double()

    def block(x):
        h = torch.nn.functional.layer_norm(x, x.shape[-1:]) * 1.1 + 0.05
        return kernels.int8_linear(h, q, s, quant_in_graph=True)

    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    for m in (17, 512, 4608):
        x = torch.randn(1, m, 1024, device="cuda", dtype=torch.bfloat16)
        truth = (torch.nn.functional.layer_norm(x.double(), x.shape[-1:]) * 1.1 + 0.05) @ w.T
        e_compiled, e_eager = rel_err(compiled(x), truth), rel_err(block(x), truth)
        assert e_compiled < 0.02 and e_compiled < 1.1 * e_eager, (e_compiled, e_eager)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1


def test_direct_launches_keep_specializations_apart(seed):
    # The fast launcher reuses a compiled kernel only for arguments with the same alignment and
    # divisibility; alternate aligned and misaligned inputs of the same shape family.
    k, n = 4099, 48  # odd K: row r of a [M, K] bf16 tensor starts at a misaligned address
    q, s = kernels.quantize_weight(torch.randn(n, k, device="cuda") * 0.02)
    big = torch.randn(40, k, device="cuda", dtype=torch.bfloat16)
    for x in (big[:17], big[1:18], big[:17], big[3:20], big[:3], big[1:4]):
        assert torch.equal(kernels.int8_linear(x, q, s), reference.int8_linear(x, q, s))
    for m in (1, 2, 4, 16, 17, 300, 1, 300):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        q2, s2 = kernels.quantize_weight(torch.randn(256, 4096, device="cuda") * 0.02, per_row=m % 2 == 0)
        assert torch.equal(kernels.int8_linear(x, q2, s2), reference.int8_linear(x, q2, s2))
