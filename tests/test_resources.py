"""The resource rule (``launch.first_fit``): a launch the GPU rejects for resources takes the next smaller config
of the same kernel, each misfit logged once and never tried again, and only a kernel with no config left
runs its torch twin, for that call.

Kernels tier: the GPU's limit is emulated by wrapping the real launchers (Triton's OutOfResources for any
config whose operand stages exceed a budget), so the real kernels run under the interpreter on the CPU and
natively on a GPU; the GPU tier lowers the limit Triton itself reads from the device."""

from __future__ import annotations

import logging

import pytest
import torch
from triton.runtime.errors import OutOfResources

from int8_w8a8.kernels import configs, launch, triton_fused, triton_gemm, triton_ops, triton_quant
from int8_w8a8.kernels import reference as ref
from int8_w8a8.kernels.dispatch import Backend

from .conftest import KERNEL_DEVICE, rel_err

pytestmark = pytest.mark.kernels

DEV = KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _no_misfits(monkeypatch):
    monkeypatch.setattr(launch, "_MISFITS", set())


class SmallGpu:
    """Wraps a kernel's launcher as on a GPU with ``limit`` bytes of shared memory per block, estimating a
    launch's need from its tile (``need``); records every launch's meta-parameters."""

    def __init__(self, launcher, limit: int, need):
        self.launcher, self.limit, self.need, self.calls = launcher, limit, need, []

    def __call__(self, grid, *args, **kwargs):
        need = self.need(kwargs)
        tile = tuple(kwargs.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages", "EPILOGUE_SUBTILE"))
        self.calls.append((*tile, need <= self.limit))
        if need > self.limit:
            raise OutOfResources(need, self.limit, "shared memory")
        self.launcher(grid, *args, **kwargs)


def _gemm_need(kw) -> int:
    """int8 operand stages plus the TMA kernel's output tile (bf16/fp32 out: 4 bytes at most)."""
    stages = (kw["BLOCK_M"] + kw["BLOCK_N"]) * kw["BLOCK_K"] * kw["num_stages"]
    out = kw["BLOCK_M"] * kw["BLOCK_N"] * 4 // (2 if kw.get("EPILOGUE_SUBTILE") else 1) if "NUM_PROGRAMS" in kw else 0
    return stages + out


def _config_need(cfg: configs.GemmConfig) -> int:
    tma = {"NUM_PROGRAMS": 1, "EPILOGUE_SUBTILE": cfg.epilogue_subtile} if cfg.kernel == "tma" else {}
    return _gemm_need({"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                       "num_stages": cfg.num_stages, **tma})


@pytest.mark.parametrize("arch,m", [((8, 6), 40), ((9, 0), 300)], ids=["mma", "tma"])
def test_gemm_falls_back_to_the_next_smaller_config(seed, monkeypatch, caplog, arch, m):
    backend = Backend("triton", "test", arch)
    cfg = backend.table.pick(m)
    limit = _config_need(cfg) // 3
    name = "_GEMM_TMA" if cfg.kernel == "tma" else "_GEMM"
    gpu = SmallGpu(getattr(triton_gemm, name), limit, _gemm_need)
    monkeypatch.setattr(triton_gemm, name, gpu)
    k, n = 128, 96
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    q, s = ref.quantize_weight(torch.randn(n, k, device=DEV) * 0.02)
    want = ref.int8_linear(x, q, s, out_dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="int8_w8a8.kernels.launch"):
        for _ in range(3):
            y = triton_ops.int8_linear(x, q, s, None, torch.float32, None, 0, backend)
            assert torch.equal(y, want)
    rejected = [c for c in gpu.calls if not c[-1]]
    ran = [c for c in gpu.calls if c[-1]]
    assert rejected and len(set(rejected)) == len(rejected), "a rejected config was tried twice"
    assert len(set(ran)) == 1 and len(ran) == 3, "every call after the first runs the config that fitted"
    logged = [r.getMessage() for r in caplog.records if "does not fit this GPU" in r.getMessage()]
    assert len(logged) == len(rejected) and "int8 GEMM" in logged[0] and "next smaller config" in logged[0]


def test_gemm_without_any_fitting_config_says_what_to_do(monkeypatch):
    monkeypatch.setattr(triton_gemm, "_GEMM", SmallGpu(triton_gemm._GEMM, 0, _gemm_need))
    xq = torch.randint(-127, 128, (17, 64), dtype=torch.int8, device=DEV)
    q = torch.randint(-127, 128, (32, 64), dtype=torch.int8, device=DEV)
    out = torch.empty(17, 32, device=DEV)
    ones = torch.ones(32, device=DEV)
    with pytest.raises(launch.TileTooLargeError, match="INT8_W8A8_DISABLE_TRITON=1"):
        triton_gemm.gemm(xq, ones[:17].contiguous(), q, ones, None, out, configs.MMA_TABLE.pick(17))


def _tile_need(kw) -> int:
    return kw["BLOCK_M"] * kw["BLOCK_K"] * 4


def test_quantizer_takes_a_smaller_tile_then_the_twin(seed, monkeypatch, caplog):
    """Group-128 float32 rows: (1, 4096) does not fit a 99-KB GPU, (1, 2048) does on an A100; both rejected,
    the rows are quantized by the twin, for this specialization only and without retrying."""
    x = torch.randn(5, 3072, device=DEV)
    gpu = SmallGpu(triton_quant._QUANTIZE, 2048 * 4, _tile_need)  # admits (1, 2048)
    monkeypatch.setattr(triton_quant, "_QUANTIZE", gpu)
    q, s = triton_quant.quantize_rows(x, rotate_group=128)
    q_ref, s_ref = ref.quantize_rows(x, rotate_group=128)
    assert [c[:3:2] for c in gpu.calls] == [(1, 4096), (1, 2048)] and gpu.calls[-1][-1]
    assert (q.int() - q_ref.int()).abs().max() <= 1 and rel_err(s, s_ref) < 1e-6  # tf32x3 rotation vs float64

    gpu.limit = 1024 * 4  # now neither fits: the twin, logged with what happens instead
    monkeypatch.setattr(launch, "_MISFITS", set())
    with caplog.at_level(logging.WARNING, logger="int8_w8a8.kernels.launch"):
        for _ in range(2):
            q, s = triton_quant.quantize_rows(x, rotate_group=128)
            assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
            y = triton_ops.int8_linear(x, *ref.quantize_weight(torch.randn(48, 3072, device=DEV), rotate_group=128),
                                       None, torch.float32, None, 128, Backend("triton", "test", (8, 6)))
            assert y.shape == (5, 48)
    assert len(gpu.calls) == 4  # two rejected tiles, then never tried again
    twin = [r.getMessage() for r in caplog.records if "torch twin" in r.getMessage()]
    assert len(twin) == 1 and "quantize_rows" in twin[0]


def test_glu_quantizer_takes_a_smaller_tile(seed, monkeypatch):
    glu = torch.randn(3, 2 * 4096, device=DEV)
    gpu = SmallGpu(triton_fused._GLU_QUANT, 2048 * 4, _tile_need)
    monkeypatch.setattr(triton_fused, "_GLU_QUANT", gpu)
    q, s = triton_fused.glu_quantize(None, glu, 4096, rotate_group=128)
    from int8_w8a8.kernels import reference_fused

    q_ref, s_ref = reference_fused.glu_quantize(None, glu, 4096, 128)
    assert [c[:3:2] for c in gpu.calls] == [(1, 4096), (1, 2048)]
    assert (q.int() - q_ref.int()).abs().max() <= 1 and rel_err(s, s_ref) < 1e-3  # tf32 rotation


@pytest.mark.gpu
def test_real_out_of_resources_on_the_gpu(seed, monkeypatch):
    """Triton told the GPU has 99 KB per block: the Hopper table's M <= 64 TMA config (164 KB on sm_90) is
    rejected by Triton itself at load time and the GEMM runs on the next smaller config that fits."""
    import triton

    utils = triton.runtime.driver.active.utils
    real = utils.get_device_properties
    from int8_w8a8.kernels import triton_gemm

    def forget_loaded_kernels() -> None:
        # Triton checks shared memory when it loads a compiled kernel, once per process and specialization: drop
        # the loaded GEMM kernels (the pack's launchers and Triton's in-memory cache; the disk cache stays) so the
        # patched limit is checked, and again afterwards so no kernel loaded under it (or failed) is kept
        for launcher in (triton_gemm._GEMM_TMA, triton_gemm._GEMM):
            launcher.cache.clear()
            launcher.fn.device_caches.clear()

    forget_loaded_kernels()
    monkeypatch.setattr(launch, "_MISFITS", set())
    monkeypatch.setattr(utils, "get_device_properties", lambda dev: {**real(dev), "max_shared_mem": 101_376})
    # the function Triton's loader calls for that limit (CompiledKernel._init_handles): patched too, since on the
    # H200 patching the driver's properties alone did not make the loader reject the kernel (two runs)
    import triton.compiler.compiler as triton_compiler

    monkeypatch.setattr(triton_compiler, "max_shared_mem", lambda device: 101_376)
    try:
        backend = Backend("triton", "test", (9, 0))
        m, k, n = 48, 4096, 4096 + 16  # the Hopper table's M <= 64 config: TMA, 164 KB on sm_90
        x = torch.randn(m, k, device=DEV, dtype=torch.float16)
        q, s = ref.quantize_weight(torch.randn(n, k, device=DEV) * 0.02, per_row=False)
        bias = torch.randn(n, device=DEV, dtype=torch.float16)
        y = triton_ops.int8_linear(x, q, s, bias, torch.float16, None, 0, backend)
        assert torch.equal(y, ref.int8_linear(x, q, s, bias))
        assert any(key[0] == "int8 GEMM" for key in launch._MISFITS), launch._MISFITS
    finally:
        monkeypatch.undo()
        forget_loaded_kernels()


def test_tma_rule_is_one_predicate():
    """``launch.tma_ok``, the one TMA rule (the GEMMs' ``tma_compatible`` and ``_tma_rows``, the Gluon GEMM's
    ``supports`` and the attention's V all use it): a 16-byte aligned base, unit last stride, every other stride a
    multiple of 16 bytes, size-1 dimensions included (Triton's host descriptor asserts them), no broadcast."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    base = torch.zeros(2, 3, 40, 64, dtype=torch.bfloat16)
    assert launch.tma_ok(base) and launch.tma_ok(base.transpose(1, 2))  # any order of the leading strides
    assert not launch.tma_ok(base[..., 1:])  # base 2 bytes off
    assert not launch.tma_ok(torch.zeros(40, 65, dtype=torch.bfloat16)[:, :64])  # row stride of 130 bytes
    assert not launch.tma_ok(base.transpose(2, 3))  # last stride not 1
    assert not launch.tma_ok(base[:, :1].expand(2, 3, 40, 64))  # broadcast heads
    assert launch.tma_ok(base[:, :1])  # a size-1 dimension of aligned stride
    odd = torch.zeros(1, 3, 40, 64, dtype=torch.bfloat16).as_strided((1, 3, 40, 64), (7, 2560, 64, 1))
    assert not launch.tma_ok(odd)  # a size-1 dimension's unaligned stride still goes into the descriptor
    with pytest.raises(AssertionError, match="16-byte aligned"):
        TensorDescriptor.from_tensor(odd, [1, 1, 64, 64])
    xq = torch.zeros(5, 48, dtype=torch.int8)
    assert triton_gemm.tma_compatible(xq, torch.zeros(8, 48, dtype=torch.int8), torch.zeros(5, 8))
    assert not triton_gemm.tma_compatible(torch.zeros(5, 40, dtype=torch.int8), torch.zeros(8, 40, dtype=torch.int8),
                                          torch.zeros(5, 8))  # K % 16
    assert not triton_gemm.tma_compatible(xq, torch.zeros(8, 48, dtype=torch.int8), torch.zeros(5, 7))  # 28-byte rows
    rows = torch.zeros(6, 17, dtype=torch.bfloat16)[:, :16]
    assert triton_gemm._tma_rows(rows)[0].is_contiguous() and triton_gemm._tma_rows(base)[0] is base
