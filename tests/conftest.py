"""Test tiers and shared helpers.

Tiers (pytest markers): ``unit`` (CPU, torch twins and pure Python), ``kernels`` (the Triton kernels:
under ``TRITON_INTERPRET=1`` on a machine without a GPU, natively on a GPU), ``integration`` (a real
ComfyUI checkout from ``COMFYUI_PATH``; skipped with the reason when absent), ``gpu`` (CUDA only).

``TRITON_INTERPRET`` must be set before any module defining a ``@triton.jit`` kernel is imported,
which is why it happens here, at conftest import time.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request) -> int:
    """A fresh random seed per test, seeded into torch and printed so a failure can be replayed.

    Set INT8_W8A8_TEST_SEED to replay one.
    """
    value = int(os.environ.get("INT8_W8A8_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    print(f"[seed] {request.node.nodeid}: INT8_W8A8_TEST_SEED={value}")
    return value


def offline_python(code: str, timeout: int = 600):
    """Run ``code`` in a fresh Python without the interpreter (``TRITON_INTERPRET=0``) and without the sm_8x stand-in's
    switches (``DISABLE_MMA_V3`` turns wgmma off in Triton): what compiles for a GPU target offline. Skips the test
    where Triton is not installed; returns the ``subprocess.CompletedProcess``."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISABLE_MMA_V3", "INT8_W8A8_FORCE_ARCH")}
    env["TRITON_INTERPRET"] = "0"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0 and "No module named 'triton'" in out.stderr:
        pytest.skip("Triton is not installed")
    return out


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 20*log10(||ref|| / ||ref - out||) in dB (float64)."""
    r, o = ref.double(), out.double()
    noise = (r - o).norm()
    if noise == 0:
        return float("inf")
    return float(20 * torch.log10(r.norm() / noise))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    r, o = ref.double(), out.double()
    return float((o - r).norm() / r.norm())


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of last place between two same-dtype float tensors (NaN == NaN)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    int_t = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[a.dtype]
    ai, bi = a.view(int_t).long(), b.view(int_t).long()
    # map sign-magnitude bit patterns onto a monotonic integer line
    bits = a.element_size() * 8
    ai = torch.where(ai < 0, -(ai & ((1 << (bits - 1)) - 1)), ai)
    bi = torch.where(bi < 0, -(bi & ((1 << (bits - 1)) - 1)), bi)
    both_nan = torch.isnan(a) & torch.isnan(b)
    d = torch.where(both_nan, 0, (ai - bi).abs())
    return int(d.max()) if d.numel() else 0


@pytest.fixture(scope="session")
def comfyui():
    """A real ComfyUI checkout from COMFYUI_PATH (on the CPU, or the GPU when there is one); skips when absent.

    ComfyUI is not on PyPI: see README.md (Tests) for making a checkout.
    """
    import sys

    path = os.environ.get("COMFYUI_PATH")
    if not path or not os.path.isfile(os.path.join(path, "comfy", "model_patcher.py")):
        pytest.skip("integration tier: set COMFYUI_PATH to a ComfyUI checkout (0.27+) to run it")
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        from comfy.cli_args import args

        args.cpu = not HAS_CUDA  # before comfy.model_management is imported
        import comfy.model_management
        import comfy.ops
        import folder_paths  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"integration tier: ComfyUI at {path} does not import ({exc}); install its requirements")
    import types

    import comfy

    return types.SimpleNamespace(path=path, comfy=comfy)  # tests import ComfyUI's `nodes` where they use it


@pytest.fixture(scope="session")
def flux2(comfyui):
    """A tiny FLUX.2 in BF16 (tests/tiny_flux2.py): state dict, fixed inputs and the float model's output."""
    from . import tiny_flux2

    return tiny_flux2.make()


@pytest.fixture
def models_dir(comfyui, tmp_path, monkeypatch):
    """``tmp_path`` registered as ComfyUI's diffusion_models folder for one test."""
    import folder_paths

    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    folder_paths.add_model_folder_path("diffusion_models", str(tmp_path), is_default=True)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    yield tmp_path
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)


@pytest.fixture
def cast_calls(comfyui, monkeypatch):
    """Counts calls of ComfyUI's real cast_bias_weight (the function still runs)."""
    import comfy.ops

    calls = []
    real = comfy.ops.cast_bias_weight

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(comfy.ops, "cast_bias_weight", counting)
    return calls


@pytest.fixture
def triton_gemms(monkeypatch):
    """The fused kernels and GEMMs on Triton (the interpreter on a CPU) with the Hopper table: the generic kernel
    at M <= 16, TMA above (on the CPU the rules would pick the torch twins). Returns ``kernels.fused``."""
    from int8_w8a8.kernels import api, fused
    from int8_w8a8.kernels.dispatch import Backend

    hopper = Backend("triton", "test", (9, 0))
    monkeypatch.setattr(fused, "_triton", lambda device: True)
    if KERNEL_DEVICE == "cpu":
        monkeypatch.setattr(fused, "choose_backend", lambda device: hopper)
        monkeypatch.setattr(api, "choose_backend", lambda device: hopper)
    return fused


@pytest.fixture
def gpu(monkeypatch):
    """A simulated CUDA device whose generation the test sets (``gpu["arch"]``); decisions reset around it."""
    from int8_w8a8.kernels import attention as attn

    state = {"arch": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["arch"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(attn, "triton_import_error", lambda: None)
    monkeypatch.setattr(attn, "_kitchen_op", lambda: object())
    # the Triton kernel's table (test_gluon_counts_by_its_own_entry: the Gluon kernel's)
    monkeypatch.setattr(attn, "_gluon_error", lambda cfg: "Gluon off in this test")
    monkeypatch.delenv("INT8_W8A8_DISABLE_TRITON", raising=False)
    attn.reset()
    yield state
    attn.reset()


@pytest.fixture(autouse=True)
def _integration_needs_comfyui(request):
    """Every ``integration`` test goes through the ``comfyui`` fixture, also one that does not name it: without a
    ComfyUI checkout it skips with the fixture's reason instead of failing on ``import comfy``."""
    if request.node.get_closest_marker("integration") is not None:
        request.getfixturevalue("comfyui")


@pytest.fixture(autouse=True)
def _fresh_kernel_recordings():
    """Launches recorded by ``kernels.direct.Replayer`` (eager calls on a GPU) belong to one test: tests patch the
    launch path (forced kernels, simulated misfits), which a recording from an earlier test would bypass."""
    from int8_w8a8.kernels import direct

    direct.forget_recordings()
    yield
