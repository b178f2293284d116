"""Which implementation runs a kernel call: explicit rules, each decision logged once.

Rules, in order:
1. ``INT8_W8A8_DISABLE_TRITON=1`` in the environment -> torch twin (a switch for debugging).
2. Tensors not on a CUDA device (CPU, MPS, ...) -> torch twin.
3. Triton missing or failing to import -> torch twin.
4. A ROCm build -> Triton generic kernel (no TMA; Triton lowers int8 dots to MFMA on CDNA).
5. Compute capability below 7.5 (no INT8 tensor cores) -> torch twin (exact float32 chunked GEMM).
6. 7.5 (Turing) -> torch twin, whose GEMM is torch._int_mm (cuBLASLt IMMA): Triton lowers int8
   dots to tensor cores only from SM 8.0.
7. 8.x -> Triton generic kernels (mma.sync); 9.0+ -> Triton with the persistent TMA/wgmma kernel
   where the operands allow TMA, generic otherwise.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

DISABLE_ENV = "INT8_W8A8_DISABLE_TRITON"


@dataclass(frozen=True)
class Backend:
    """The decision for one device: ``name`` is "triton" or "reference"; ``arch`` is (major, minor)."""

    name: str
    reason: str
    arch: tuple[int, int] | None = None
    rocm: bool = False


@functools.cache
def triton_import_error() -> str | None:
    """None when Triton imports and has an active driver for this process, else the reason."""
    try:
        import triton  # noqa: F401

        from . import triton_gemm, triton_quant  # noqa: F401
    except Exception as exc:  # any import failure means "no Triton": ImportError, driver errors
        return f"Triton is unavailable ({type(exc).__name__}: {exc})"
    return None


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _log_once(backend: Backend, device: str) -> None:
    logger.info("int8_w8a8: %s kernels on %s (%s)", backend.name, device, backend.reason)


def choose_backend(device: torch.device) -> Backend:
    """Apply the rules above to ``device`` and log the decision the first time it is made."""
    backend = _decide(device.type, device.index if device.index is not None else -1)
    _log_once(backend, str(device))
    return backend


@functools.cache
def _decide(device_type: str, index: int) -> Backend:
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return Backend("reference", f"{DISABLE_ENV} is set")
    if device_type != "cuda":
        return Backend("reference", f"tensors are on {device_type}, where the torch twin runs")
    error = triton_import_error()
    if error is not None:
        return Backend("reference", error)
    idx = index if index >= 0 else torch.cuda.current_device()
    arch = _cuda_capability(idx)
    if torch.version.hip is not None:
        return Backend("triton", "ROCm: Triton generic kernels, no TMA", arch, rocm=True)
    if arch < (7, 5):
        return Backend("reference", f"SM {arch[0]}.{arch[1]} has no INT8 tensor cores; exact float32 GEMM", arch)
    if arch < (8, 0):
        return Backend("reference", "SM 7.5: torch._int_mm (cuBLASLt IMMA); Triton int8 dots need SM 8.0", arch)
    if arch < (9, 0):
        return Backend("triton", f"SM {arch[0]}.{arch[1]}: Triton mma.sync kernels", arch)
    return Backend("triton", f"SM {arch[0]}.{arch[1]}: Triton TMA + wgmma persistent kernels", arch)


def reset() -> None:
    """Forget cached decisions (tests that change the environment or patch capabilities)."""
    _decide.cache_clear()
    _log_once.cache_clear()
    _cuda_capability.cache_clear()
    triton_import_error.cache_clear()
