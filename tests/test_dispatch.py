"""Dispatch rules and config selection, on CPU with the hardware probes patched."""

from __future__ import annotations

import logging

import pytest
import torch

from int8_w8a8.kernels import configs, dispatch
from int8_w8a8.kernels.configs import GemmConfig

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _fresh_decisions():
    dispatch.reset()
    yield
    dispatch.reset()


def _as_gpu(monkeypatch, arch, hip=None):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: arch)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: None)


def test_cpu_tensors_use_the_twin():
    b = dispatch.choose_backend(torch.device("cpu"))
    assert b.name == "reference" and "cpu" in b.reason


@pytest.mark.parametrize(
    "arch,name,words",
    [
        ((6, 1), "reference", "no INT8 tensor cores"),
        ((7, 0), "reference", "no INT8 tensor cores"),
        ((7, 5), "reference", "torch._int_mm"),
        ((8, 0), "triton", "mma.sync"),
        ((8, 9), "triton", "mma.sync"),
        ((9, 0), "triton", "TMA"),
        ((10, 0), "triton", "TMA"),
        ((12, 0), "triton", "TMA"),
    ],
)
def test_rules_by_compute_capability(monkeypatch, arch, name, words):
    _as_gpu(monkeypatch, arch)
    b = dispatch._decide("cuda", 0)
    assert (b.name, b.arch) == (name, arch) and words in b.reason


def test_rocm_uses_generic_triton(monkeypatch):
    _as_gpu(monkeypatch, (9, 4), hip="6.2")
    b = dispatch._decide("cuda", 0)
    assert b.name == "triton" and b.rocm


def test_missing_triton_falls_back(monkeypatch):
    _as_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(dispatch, "triton_import_error", lambda: "Triton is unavailable (ImportError: x)")
    b = dispatch._decide("cuda", 0)
    assert b.name == "reference" and "Triton is unavailable" in b.reason


def test_environment_switch(monkeypatch):
    _as_gpu(monkeypatch, (9, 0))
    monkeypatch.setenv(dispatch.DISABLE_ENV, "1")
    assert dispatch._decide("cuda", 0).name == "reference"


def test_each_decision_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="int8_w8a8.kernels.dispatch"):
        for _ in range(5):
            dispatch.choose_backend(torch.device("cpu"))
    assert len([r for r in caplog.records if "reference kernels on cpu" in r.getMessage()]) == 1


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("m", [1, 16, 17, 64, 65, 256, 257, 1024, 1025, 4608, 10**6])
def test_hopper_buckets(m):
    cfg = configs.select_config(m, (9, 0), tma_ok=True)
    if m <= configs.SMALL_M:
        assert cfg.kernel == "generic" and cfg.block_m == 16
    else:
        assert cfg.kernel == "tma"
    # the rule depends on the bucket only: every M of a bucket gets the same config
    bounds = [b for b, _ in configs.HOPPER_TABLE]
    bucket_top = next(b for b in bounds if m <= b)
    assert configs.select_config(bucket_top, (9, 0), True) == cfg


def test_no_tma_without_alignment_or_before_hopper():
    assert configs.select_config(4608, (9, 0), tma_ok=False).kernel == "generic"
    assert configs.select_config(4608, (8, 6), tma_ok=True).kernel == "generic"
    assert configs.select_config(4608, (7, 5), tma_ok=True).kernel == "generic"


def test_config_validation():
    with pytest.raises(ValueError, match="kernel"):
        GemmConfig("wgmma", 64, 64, 64)
    with pytest.raises(ValueError, match="block_n"):
        GemmConfig("tma", 64, 48, 64)
    with pytest.raises(ValueError, match="ctas_per_sm"):
        GemmConfig("tma", 64, 64, 64, ctas_per_sm=0)


def test_configs_are_frozen():
    cfg = configs.select_config(1, (9, 0), True)
    with pytest.raises(AttributeError):
        cfg.block_m = 32
