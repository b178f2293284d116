"""Dispatch rules per GPU generation and config selection, on CPU with the hardware probes patched
(compute capability, device name and the opt-in shared memory per block)."""

from __future__ import annotations

import dataclasses
import logging
import os
import types

import pytest
import torch

from int8_w8a8.kernels import configs, dispatch
from int8_w8a8.kernels.configs import GemmConfig

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _fresh_decisions():
    """Decisions made afresh, without the switches of the calling environment (set back afterwards; this
    fixture is set up before and torn down after the tests' own monkeypatches)."""
    saved = {k: os.environ.pop(k) for k in (dispatch.FORCE_ARCH_ENV, dispatch.DISABLE_ENV, dispatch.DISABLE_GLUON_ENV,
                                            dispatch.DISABLE_GLUON_XL_ENV) if k in os.environ}
    dispatch.reset()
    yield
    os.environ.update(saved)
    dispatch.reset()


def _as_gpu(monkeypatch, arch, smem=None, name="NVIDIA Test GPU", hip=None):
    """Make dispatch see a CUDA device of capability ``arch`` with ``smem`` bytes of opt-in shared memory per
    block (default: what NVIDIA documents for that generation)."""
    if smem is None:
        gen = dispatch.generation_for(arch)
        smem = gen.smem_optin if gen else 232_448
    props = types.SimpleNamespace(name=name, shared_memory_per_block_optin=smem)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: arch)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 6))
    monkeypatch.setattr(dispatch, "_gluon_import_error", lambda: None)  # Gluon as with Triton 3.6 on a GPU


def _forget_hardware():
    """Forget the decisions and the probed capability and properties (``dispatch.reset`` without Triton's)."""
    for cached in (dispatch._decide, dispatch._cuda_capability, dispatch._device_props):
        cached.cache_clear()


def test_cpu_tensors_use_the_twin():
    b = dispatch.choose_backend(torch.device("cpu"))
    assert b.name == "reference" and "cpu" in b.reason


@pytest.mark.parametrize(
    "arch,table,words",
    [
        ((7, 5), None, "torch._int_mm"),
        ((8, 0), configs.MMA_TABLE, "Ampere"),
        ((8, 6), configs.MMA_TABLE, "Ampere"),
        ((8, 9), configs.MMA_TABLE, "Ada"),
        ((9, 0), configs.HOPPER_GLUON_TABLE, "wgmma"),
        ((10, 0), configs.BLACKWELL_TABLE, "Blackwell (datacenter)"),
        ((10, 3), configs.BLACKWELL_TABLE, "Blackwell (datacenter)"),
        ((12, 0), configs.MMA_TABLE, "Blackwell (consumer)"),
        ((12, 1), configs.MMA_TABLE, "Blackwell (consumer)"),
    ],
)
def test_each_generation_gets_its_path_and_table(monkeypatch, arch, table, words):
    _as_gpu(monkeypatch, arch, name="NVIDIA GeForce Test")
    b = dispatch._decide("cuda", 0)
    assert b.arch == arch and words in b.reason and "NVIDIA GeForce Test" in b.reason
    if table is None:
        assert b.name == "reference"
    else:
        assert b.name == "triton" and b.table is table


@pytest.mark.parametrize("arch", [(6, 1), (7, 0), (7, 2)])
def test_no_int8_tensor_cores_use_the_twin(monkeypatch, arch):
    _as_gpu(monkeypatch, arch)
    b = dispatch._decide("cuda", 0)
    assert b.name == "reference" and "no INT8 tensor cores" in b.reason


def test_consumer_blackwell_never_gets_the_hopper_table(monkeypatch):
    """sm_120 has TMA but no wgmma and 99 KB per block: the Hopper table's TMA configs need up to 213 KB."""
    for arch in ((12, 0), (12, 1)):
        _as_gpu(monkeypatch, arch)
        _forget_hardware()
        table = dispatch._decide("cuda", 0).table
        assert not table.tma and table.smem_bytes <= 101_376
        assert all(cfg.kernel == "generic" for cfg in table.configs())


def test_every_generation_table_fits_its_documented_shared_memory():
    for gen in dispatch.GENERATIONS:
        assert gen.target == gen.capabilities[0][0] * 10 + gen.capabilities[0][1]
        if gen.table is not None:
            assert gen.table.smem_bytes <= gen.smem_optin, gen
            assert gen.expected_mma("generic"), f"{gen.name}: no INT8 instruction expected"
            if gen.table.tma:
                assert gen.expected_mma("tma"), gen.name
    caps = [c for g in dispatch.GENERATIONS for c in g.capabilities]
    assert len(caps) == len(set(caps)), "a capability in two generations"


def test_a_table_over_the_device_limit_is_replaced(monkeypatch, caplog):
    """A Hopper exposing 99 KB per block (a MIG slice, a future part): not the Hopper table, and one log line
    naming the GPU, the table's need and the limit."""
    _as_gpu(monkeypatch, (9, 0), smem=101_376, name="NVIDIA H-small")
    with caplog.at_level(logging.INFO, logger="int8_w8a8.kernels.dispatch"):
        b = dispatch.choose_backend(torch.device("cuda", 0))
        dispatch.choose_backend(torch.device("cuda", 0))
    assert b.name == "triton" and b.table is configs.MMA_TABLE
    lines = [r.getMessage() for r in caplog.records if "NVIDIA H-small" in r.getMessage()]
    assert len(lines) == 1 and "101376" in lines[0] and str(configs.HOPPER_TABLE.smem_bytes) in lines[0]


@pytest.mark.parametrize("arch", [(11, 0), (13, 0), (8, 8)])
def test_unknown_gpu_runs_the_generic_path_when_the_probe_passes(monkeypatch, arch, caplog):
    _as_gpu(monkeypatch, arch, name="NVIDIA Future GPU")
    probes = []
    monkeypatch.setattr(dispatch, "_probe", lambda device: probes.append(device))
    with caplog.at_level(logging.INFO, logger="int8_w8a8.kernels.dispatch"):
        for _ in range(3):
            b = dispatch.choose_backend(torch.device("cuda", 0))
    assert b.name == "triton" and b.table is configs.MMA_TABLE and len(probes) == 1
    lines = [r.getMessage() for r in caplog.records if "NVIDIA Future GPU" in r.getMessage()]
    assert len(lines) == 1 and "no rule for this GPU" in lines[0] and f"SM {arch[0]}.{arch[1]}" in lines[0]


def test_unknown_gpu_falls_back_to_the_twin_when_the_probe_fails(monkeypatch):
    """No GPU here: the real probe fails (no CUDA device), which must give the twin with the reason, not a crash."""
    _as_gpu(monkeypatch, (13, 0), name="NVIDIA Future GPU")
    b = dispatch._decide("cuda", 0)
    assert b.name == "reference" and "probe failed" in b.reason and "NVIDIA Future GPU" in b.reason


@pytest.mark.parametrize("arch", [(12, 0), (10, 0)])
def test_blackwell_needs_the_triton_it_was_checked_with(monkeypatch, arch):
    """Triton 3.6 is the first with a Blackwell ptxas (3.5's cannot assemble sm_121a); older: the torch twin."""
    _as_gpu(monkeypatch, arch, name="NVIDIA GeForce RTX 5090")
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 5))
    b = dispatch._decide("cuda", 0)
    assert b.name == "reference" and "Triton 3.5 is older than 3.6" in b.reason
    _forget_hardware()
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 6))
    assert dispatch._decide("cuda", 0).name == "triton"
    _forget_hardware()
    _as_gpu(monkeypatch, (8, 9))
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 4))
    assert dispatch._decide("cuda", 0).name == "triton"


def test_hopper_without_gluon_runs_the_warp_specialized_table(monkeypatch, caplog):
    """The Gluon large-M row needs Triton 3.6's Gluon; without it (an older Triton, a Gluon that does not import,
    or the debugging switch) Hopper runs HOPPER_TABLE, said in the one log line of the decision."""
    _as_gpu(monkeypatch, (9, 0), name="NVIDIA H200")
    assert dispatch._decide("cuda", 0).table is configs.HOPPER_GLUON_TABLE
    for patch, words in ((lambda: monkeypatch.setenv(dispatch.DISABLE_GLUON_ENV, "1"), dispatch.DISABLE_GLUON_ENV),
                         (lambda: monkeypatch.setattr(dispatch, "_gluon_import_error",
                                                      lambda: "Triton's Gluon is unavailable (ImportError: x)"),
                          "Gluon is unavailable")):
        _forget_hardware()
        patch()
        with caplog.at_level(logging.INFO, logger="int8_w8a8.kernels.dispatch"):
            b = dispatch.choose_backend(torch.device("cuda", 0))
        assert b.name == "triton" and b.table is configs.HOPPER_TABLE and words in b.reason
        assert words in caplog.records[-1].getMessage() and configs.HOPPER_TABLE.name in b.reason
        assert dispatch.Backend("triton", "test", (9, 0)).table is configs.HOPPER_TABLE
        monkeypatch.undo()
        _as_gpu(monkeypatch, (9, 0), name="NVIDIA H200")
    monkeypatch.undo()
    dispatch.reset()
    monkeypatch.setattr(dispatch, "triton_version", lambda: (3, 5))
    assert "Triton 3.5 is older than 3.6" in dispatch._gluon_import_error()


def test_hopper_without_the_wide_gluon_row_on_request(monkeypatch, caplog):
    """``INT8_W8A8_DISABLE_GLUON_XL=1`` (an A/B switch): Hopper runs the Gluon table without its 256-wide row past
    8192 rows (``GemmTable.narrow``), said in the decision's log line; with Gluon off as well, HOPPER_TABLE."""
    _as_gpu(monkeypatch, (9, 0), name="NVIDIA H100 80GB HBM3")
    monkeypatch.setenv(dispatch.DISABLE_GLUON_XL_ENV, "1")
    with caplog.at_level(logging.INFO, logger="int8_w8a8.kernels.dispatch"):
        b = dispatch.choose_backend(torch.device("cuda", 0))
    assert b.table is configs.HOPPER_GLUON_128_TABLE and dispatch.DISABLE_GLUON_XL_ENV in b.reason
    assert "Triton TMA + wgmma" in b.reason and dispatch.DISABLE_GLUON_XL_ENV in caplog.records[-1].getMessage()
    assert b.table.pick(14040) is configs.HOPPER_GLUON_LARGE
    assert dispatch.Backend("triton", "test", (9, 0)).table is configs.HOPPER_GLUON_128_TABLE
    _forget_hardware()
    monkeypatch.setenv(dispatch.DISABLE_GLUON_ENV, "1")
    assert dispatch.choose_backend(torch.device("cuda", 0)).table is configs.HOPPER_TABLE


def test_rocm_uses_generic_triton(monkeypatch):
    _as_gpu(monkeypatch, (9, 4), hip="6.2")
    b = dispatch._decide("cuda", 0)
    assert b.name == "triton" and b.rocm and b.table is configs.MMA_TABLE


def test_missing_triton_falls_back(monkeypatch):
    _as_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "Triton is unavailable (ImportError: x)")
    b = dispatch._decide("cuda", 0)
    assert b.name == "reference" and "Triton is unavailable" in b.reason


def test_environment_switch(monkeypatch):
    _as_gpu(monkeypatch, (9, 0))
    monkeypatch.setenv(dispatch.DISABLE_ENV, "1")
    assert dispatch._decide("cuda", 0).name == "reference"


def test_forced_arch_dispatches_an_h200_as_sm86(monkeypatch, caplog):
    _as_gpu(monkeypatch, (9, 0), name="NVIDIA H200")
    monkeypatch.setenv(dispatch.FORCE_ARCH_ENV, "8.6")
    with caplog.at_level(logging.INFO, logger="int8_w8a8.kernels.dispatch"):
        b = dispatch.choose_backend(torch.device("cuda", 0))
    assert b.name == "triton" and b.arch == (8, 6) and b.table is configs.MMA_TABLE
    line = next(r.getMessage() for r in caplog.records if "NVIDIA H200" in r.getMessage())
    assert dispatch.FORCE_ARCH_ENV in line and "dispatched as SM 8.6" in line and "SM 9.0" in line


def test_forced_arch_keeps_the_device_limit(monkeypatch):
    """Under the switch the table is still checked against the device's own shared memory."""
    _as_gpu(monkeypatch, (10, 0), smem=232_448, name="NVIDIA B200")
    monkeypatch.setenv(dispatch.FORCE_ARCH_ENV, "9.0")
    assert dispatch._decide("cuda", 0).table is configs.HOPPER_GLUON_TABLE  # (its Gluon row runs only on 9.x)
    _forget_hardware()
    _as_gpu(monkeypatch, (10, 0), smem=150_000, name="NVIDIA B200")
    assert dispatch._decide("cuda", 0).table is configs.MMA_TABLE


@pytest.mark.parametrize("value,match", [("9.0", "only an older generation"), ("eight", "such as 8.6"),
                                         ("8", "such as 8.6")])
def test_forced_arch_rejects_a_newer_or_malformed_capability(monkeypatch, value, match):
    _as_gpu(monkeypatch, (8, 6), name="NVIDIA GeForce RTX 3090")
    monkeypatch.setenv(dispatch.FORCE_ARCH_ENV, value)
    with pytest.raises(ValueError, match=match) as info:
        dispatch._decide("cuda", 0)
    assert dispatch.FORCE_ARCH_ENV in str(info.value)


def test_each_decision_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="int8_w8a8.kernels.dispatch"):
        for _ in range(5):
            dispatch.choose_backend(torch.device("cpu"))
    assert len([r for r in caplog.records if "reference kernels on cpu" in r.getMessage()]) == 1


def test_backends_built_from_an_arch_get_that_generation_table(monkeypatch):
    monkeypatch.setattr(dispatch, "_gluon_import_error", lambda: None)
    assert dispatch.Backend("triton", "test", (9, 0)).table is configs.HOPPER_GLUON_TABLE
    assert dispatch.Backend("triton", "test", (12, 0)).table is configs.MMA_TABLE
    assert dispatch.Backend("triton", "test", (11, 0)).table is configs.MMA_TABLE
    assert dispatch.Backend("reference", "test").table is configs.MMA_TABLE  # Triton forced on the CPU (tests)


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("m", [1, 16, 17, 64, 65, 256, 257, 1024, 1025, 4608, 10**6])
def test_hopper_buckets(m):
    cfg = configs.HOPPER_TABLE.pick(m)
    if m <= configs.SMALL_M:
        assert cfg.kernel == "generic" and cfg.block_m == 16
    else:
        assert cfg.kernel == "tma"
    # the rule depends on the bucket only: every M of a bucket gets the same config
    bucket_top = next(b for b, _ in configs.HOPPER_TABLE.rows if m <= b)
    assert configs.HOPPER_TABLE.pick(bucket_top) == cfg


def test_no_tma_without_alignment_or_on_mma_tables():
    assert configs.HOPPER_TABLE.pick(4608, tma_ok=False) == configs.MMA_TABLE.pick(4608)
    assert configs.MMA_TABLE.pick(4608, tma_ok=True).kernel == "generic"
    assert not configs.MMA_TABLE.tma and configs.HOPPER_TABLE.tma


def test_blackwell_table_is_hopper_tiles_with_the_lora_chunks_in_a_loop():
    for ours, hopper in zip(configs.BLACKWELL_TABLE.configs(), configs.HOPPER_PLAIN_TABLE.configs(), strict=True):
        assert ours.lora_loop and ours == dataclasses.replace(hopper, lora_loop=True)
    assert not any(cfg.lora_loop for cfg in configs.HOPPER_TABLE.configs() + configs.MMA_TABLE.configs())


@pytest.mark.parametrize("cfg", configs.HOPPER_TABLE.configs() + configs.MMA_TABLE.configs(), ids=str)
def test_smaller_configs_shrink_to_an_end(cfg):
    """Each step needs less shared memory (fewer stages x tile bytes), or drops only the warp specialization (the
    same tiles, one program's registers), and the chain ends."""
    def cost(c):
        return (c.block_m + c.block_n) * c.block_k * c.num_stages + c.block_m * c.block_n * (1 if c.epilogue_subtile
                                                                                              else 2)

    seen = [cfg]
    while (nxt := configs.smaller(seen[-1])) is not None:
        dropped_ws = seen[-1].warp_spec and nxt == configs.without_warp_spec(seen[-1])
        assert nxt.kernel == cfg.kernel and (cost(nxt) < cost(seen[-1]) or dropped_ws), (seen[-1], nxt)
        assert nxt.block_m >= (64 if cfg.kernel == "tma" else 16) and nxt.block_k >= 32
        seen.append(nxt)
    assert len(seen) < 20


def test_config_validation():
    with pytest.raises(ValueError, match="kernel"):
        GemmConfig("wgmma", 64, 64, 64)
    with pytest.raises(ValueError, match="block_n"):
        GemmConfig("tma", 64, 48, 64)
    with pytest.raises(ValueError, match="ctas_per_sm"):
        GemmConfig("tma", 64, 64, 64, ctas_per_sm=0)


def test_gluon_row_rules():
    """HOPPER_GLUON_TABLE: the Gluon config at large M, with or without a gated residual (its own epilogue); LoRA
    terms, outputs narrower than its tile and operands TMA cannot take run the plain and unaligned tables; the
    other rows are the plain table's. Off Hopper, with a LoRA term given directly and when the GPU rejects it,
    the plain TMA kernel's large-M config runs (the same bits); Gluon's own rules are checked."""
    table, gluon, xl = configs.HOPPER_GLUON_TABLE, configs.HOPPER_GLUON_LARGE, configs.HOPPER_GLUON_XL
    assert table.gluon and not configs.HOPPER_TABLE.gluon and table.without_gluon is configs.HOPPER_TABLE
    assert table.tma and not any(c.warp_spec for c in table.configs())
    assert table.narrow is configs.HOPPER_GLUON_128_TABLE and table.narrow.narrow is None
    assert table.narrow.without_gluon is configs.HOPPER_TABLE and xl in table.configs()
    plain_large = configs.HOPPER_PLAIN_TABLE.rows[-1][1]
    for m in (1, 17, 200, 1024, 1025, 4608, configs.GLUON_XL_M, configs.GLUON_XL_M + 1, 14040):
        below = gluon if m > 1024 else configs.HOPPER_PLAIN_TABLE.pick(m)  # the 128-wide rows
        want = xl if m > configs.GLUON_XL_M else below
        assert table.pick(m) == want and table.narrow.pick(m) == below
        # outputs narrower than the 256-wide tile keep the 128-wide row (``narrow``); a gated residual takes the
        # row its M picks, as the plain epilogue does
        assert table.pick(m, residual=True) == want and table.pick(m, n=200) == below
        assert table.pick(m, n=256) == want
        assert table.pick(m, lora=True) == configs.HOPPER_PLAIN_TABLE.pick(m)
        assert table.pick(m, residual=True, lora=True) == configs.HOPPER_PLAIN_TABLE.pick(m)
        assert table.pick(m, n=64) == configs.HOPPER_PLAIN_TABLE.pick(m)
        if table.pick(m).kernel != "generic":
            assert table.pick(m, tma_ok=False) == configs.MMA_TABLE.pick(m)
    # the SwiGLU GEMM runs the 128-wide form it was checked with, whatever row the rows pick
    assert configs.glu_form(xl) is gluon and configs.glu_form(gluon) is gluon
    assert configs.glu_form(plain_large) is plain_large
    assert configs.without_gluon(xl) == plain_large and configs.for_residual(xl) is xl
    assert configs.without_gluon(gluon) == plain_large and configs.without_gluon(plain_large) is plain_large
    assert configs.for_launch(gluon, (9, 0), lora=False, residual=True) is gluon
    assert configs.for_launch(gluon, None, lora=False, residual=False) is gluon  # offline: as given
    assert configs.for_launch(gluon, (9, 0), lora=True, residual=False) == plain_large
    for arch in ((8, 9), (10, 0), (12, 0)):
        assert configs.for_launch(gluon, arch, lora=False, residual=False) == plain_large
    assert configs.smaller(gluon) == dataclasses.replace(gluon, num_stages=2)
    assert configs.smaller(configs.smaller(gluon)) == plain_large
    assert configs.for_residual(gluon) is gluon
    for bad, words in (({"block_m": 64}, "16 \\* num_warps"), ({"block_n": 32}, "block_n in"),
                       ({"num_stages": 1}, "num_stages >= 2"), ({"split_tail": 16}, "no warp_spec"),
                       ({"max_registers": 300}, "max_registers")):
        with pytest.raises(ValueError, match=words):
            dataclasses.replace(gluon, **bad)
    with pytest.raises(ValueError, match="only the 'gluon' kernel"):
        GemmConfig("tma", 128, 128, 64, max_registers=128)
    with pytest.raises(ValueError, match="needs without_gluon"):
        configs.GemmTable("t", ((configs._LARGE, gluon),), smem_bytes=1)


def test_configs_are_frozen():
    cfg = configs.HOPPER_TABLE.pick(1)
    with pytest.raises(AttributeError):
        cfg.block_m = 32
