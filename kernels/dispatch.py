"""Which implementation runs a kernel call: explicit rules, each decision logged once.

Rules, in order:
1. ``INT8_W8A8_DISABLE_TRITON=1`` in the environment -> torch twin (a switch for debugging).
2. Tensors not on a CUDA device (CPU, MPS, ...) -> torch twin.
3. Triton missing or failing to import -> torch twin.
4. A ROCm build -> Triton pointer-load kernels (no TMA; Triton lowers int8 dots to MFMA on CDNA).
5. The GPU's generation, from its compute capability (``INT8_W8A8_FORCE_ARCH=8.6`` dispatches a GPU as an
   older one: the sm_8x path on a Hopper, for testing), decides the kernel path and GEMM table
   (``GENERATIONS``, one entry per generation). A table needing more shared memory per block than the GPU
   allows is replaced by the mma.sync table, which fits every generation the pack runs Triton on. A table with
   Gluon rows (Hopper's large-M row) is replaced by its ``without_gluon`` table where the Gluon kernel cannot
   run (``gluon_error``: a Triton without Gluon or older than 3.6, or ``INT8_W8A8_DISABLE_GLUON=1``).
6. A capability with no entry: below 7.5 (no INT8 tensor cores) -> torch twin (exact float32 GEMM); else
   the pointer-load kernels, after a probe launch checks that this Triton can run them on the GPU (else
   the torch twin, with the reason).
A launch that still fails for resources takes the next smaller config (``launch.first_fit``).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

import torch

from . import configs
from .configs import GemmTable

logger = logging.getLogger(__name__)

DISABLE_ENV = "INT8_W8A8_DISABLE_TRITON"
DISABLE_GLUON_ENV = "INT8_W8A8_DISABLE_GLUON"  # a switch for debugging and A/B runs: the tables without Gluon rows
# a switch for A/B runs: Hopper's Gluon table without its widest large-M row (``GemmTable.narrow``)
DISABLE_GLUON_XL_ENV = "INT8_W8A8_DISABLE_GLUON_XL"
GLU_GEMM_ENV = "INT8_W8A8_GLU_GEMM"  # opts the fused blocks into the SwiGLU GEMM (``fused.glu_gemm_rule``)
GLUON_MIN_TRITON = (3, 6)  # the Triton the Gluon GEMM was written, checked and measured with
FORCE_ARCH_ENV = "INT8_W8A8_FORCE_ARCH"

# INT8 tensor-core instructions in the PTX, as bench/check_ptx.py names them.
MMA_SYNC = "mma.sync"  # mma.sync.aligned.m16n8k32 ... s32.s8.s8.s32 (Ampere's instruction)
WGMMA = "wgmma"  # wgmma.mma_async ... s32.s8.s8 (Hopper's warpgroup MMA)
TCGEN05 = "tcgen05"  # tcgen05.mma ... kind::i8 (datacenter Blackwell's, in tensor memory)


@dataclass(frozen=True)
class Generation:
    """What the pack runs on one GPU generation, and what the offline check expects of it.

    capabilities: the compute capabilities it covers; target: the one compiled offline (``sm_<target>``,
    bench/check_ptx.py). table: its GEMM configs (None: Triton does not run there). smem_optin: the
    opt-in shared memory per block NVIDIA documents for it, in bytes (the device's own figure is read at
    run time). int8_mma: per GEMM kernel ("tma", "generic"), the INT8 tensor-core instructions Triton may
    lower its dot to there (more than one where Triton versions differ). min_triton: the oldest Triton the
    kernels were compiled with for it (older ones get the torch twin).
    """

    name: str
    gpus: str
    capabilities: tuple[tuple[int, int], ...]
    target: int
    path: str
    table: GemmTable | None
    smem_optin: int
    int8_mma: tuple[tuple[str, tuple[str, ...]], ...] = ()
    min_triton: tuple[int, int] = (3, 4)

    def expected_mma(self, kernel: str) -> tuple[str, ...]:
        return dict(self.int8_mma).get(kernel, ())


_MMA_ONLY = (("generic", (MMA_SYNC,)),)

GENERATIONS: tuple[Generation, ...] = (
    # Triton's int8 tl.dot does not compile for sm_75 (TritonGPUAccelerateMatmul fails; triton-lang/triton#9349),
    # so Turing runs the torch twin, whose GEMM is torch._int_mm (cuBLASLt IMMA) where its shapes allow
    Generation("Turing", "GeForce RTX 20, T4", ((7, 5),), 75, "torch twin, torch._int_mm (cuBLASLt)", None,
               65_536),
    Generation("Ampere", "A100, A30", ((8, 0),), 80, "Triton mma.sync, pointer loads", configs.MMA_TABLE,
               166_912, _MMA_ONLY),
    Generation("Ampere", "GeForce RTX 30, RTX A-series, A10, A40", ((8, 6),), 86, "Triton mma.sync, pointer loads",
               configs.MMA_TABLE, 101_376, _MMA_ONLY),
    Generation("Ada", "GeForce RTX 40, L4, L40S", ((8, 9),), 89, "Triton mma.sync, pointer loads",
               configs.MMA_TABLE, 101_376, _MMA_ONLY),
    Generation("Hopper", "H100, H200, GH200", ((9, 0),), 90, "Triton TMA + wgmma, persistent",
               configs.HOPPER_GLUON_TABLE, 232_448, (("tma", (WGMMA,)), ("generic", (MMA_SYNC, WGMMA)),
                                                     ("gluon", (WGMMA,)))),
    Generation("Blackwell (datacenter)", "B200, GB200, B300", ((10, 0), (10, 3)), 100,
               "Triton TMA + mma.sync (Triton 3.6) or tcgen05 (3.8), persistent", configs.BLACKWELL_TABLE, 232_448,
               (("tma", (MMA_SYNC, TCGEN05)), ("generic", (MMA_SYNC, TCGEN05))), min_triton=(3, 6)),
    # TMA exists here but neither wgmma nor tcgen05, and a block gets at most 99 KB: the Hopper tables do not
    # fit (their TMA configs need 82-164 KB); Triton lowers int8 dots to the same mma.sync as on sm_8x. Triton
    # ships a Blackwell ptxas (12.9) from 3.6 on; 3.5's ptxas 12.8 cannot assemble sm_121a (triton#10331)
    Generation("Blackwell (consumer)", "GeForce RTX 50, RTX PRO Blackwell, DGX Spark", ((12, 0), (12, 1)), 120,
               "Triton mma.sync, pointer loads", configs.MMA_TABLE, 101_376, _MMA_ONLY, min_triton=(3, 6)),
)


def generation_for(arch: tuple[int, int]) -> Generation | None:
    """The entry of ``GENERATIONS`` covering compute capability ``arch``, or None."""
    return next((g for g in GENERATIONS if tuple(arch) in g.capabilities), None)


@dataclass(frozen=True)
class Backend:
    """The decision for one device: ``name`` is "triton" or "reference"; ``arch`` is (major, minor) as dispatched
    (the forced one under ``INT8_W8A8_FORCE_ARCH``); ``table``: the GEMM table the Triton kernels run with (by
    default the generation's, from ``arch``, without its Gluon rows where ``gluon_error`` says so, else the
    mma.sync table: also what tests that run the Triton kernels on the CPU get)."""

    name: str
    reason: str
    arch: tuple[int, int] | None = None
    rocm: bool = False
    table: GemmTable = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.table is None:
            gen = None if self.rocm or self.arch is None else generation_for(self.arch)
            table = gen.table if gen is not None and gen.table else configs.MMA_TABLE
            if table.gluon:  # a reference backend launches nothing: no Gluon import for it
                table = table.without_gluon if self.name != "triton" else runnable(table)[0]
            object.__setattr__(self, "table", table)


@functools.cache
def triton_import_error() -> str | None:
    """None when Triton imports and has an active driver for this process, else the reason."""
    try:
        import triton  # noqa: F401

        from . import triton_gemm, triton_quant  # noqa: F401
    except Exception as exc:  # any import failure means "no Triton": ImportError, driver errors
        return f"Triton is unavailable ({type(exc).__name__}: {exc})"
    return None


def runnable(table: GemmTable) -> tuple[GemmTable, str | None]:
    """``table``, or its ``without_gluon`` table and the reason when it has Gluon rows that cannot run here, or its
    ``narrow`` table and the reason under ``INT8_W8A8_DISABLE_GLUON_XL=1``."""
    why = gluon_error() if table.gluon else None
    if why is not None:
        return table.without_gluon, why
    if table.narrow is not None and os.environ.get(DISABLE_GLUON_XL_ENV, "0") not in ("", "0"):
        return table.narrow, f"{DISABLE_GLUON_XL_ENV} is set"
    return table, None


def gluon_error() -> str | None:
    """None when the Gluon GEMM (``kernels/gluon_gemm.py``) can run in this process, else why not."""
    if os.environ.get(DISABLE_GLUON_ENV, "0") not in ("", "0"):
        return f"{DISABLE_GLUON_ENV} is set"
    return _gluon_import_error()


@functools.cache
def _gluon_import_error() -> str | None:
    if triton_version() < GLUON_MIN_TRITON:
        return (f"Triton {'.'.join(map(str, triton_version()))} is older than "
                f"{'.'.join(map(str, GLUON_MIN_TRITON))}, the Gluon GEMM's")
    try:
        from . import gluon_gemm  # noqa: F401
    except Exception as exc:  # an API this Gluon lacks: ImportError, AttributeError
        return f"Triton's Gluon is unavailable ({type(exc).__name__}: {exc})"
    return None


@functools.cache
def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton (call after ``triton_import_error`` returned None)."""
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _device_props(index: int) -> tuple[str, int]:
    """(name, opt-in shared memory per block in bytes) of CUDA device ``index``."""
    props = torch.cuda.get_device_properties(index)
    return props.name, int(props.shared_memory_per_block_optin)


@functools.cache
def _log_once(backend: Backend, device: str) -> None:
    logger.info("int8_w8a8: %s kernels on %s (%s)", backend.name, device, backend.reason)


def choose_backend(device: torch.device) -> Backend:
    """Apply the rules above to ``device`` and log the decision the first time it is made."""
    backend = _decide(device.type, device.index if device.index is not None else -1)
    _log_once(backend, str(device))
    return backend


def forced_arch() -> tuple[int, int] | None:
    """``INT8_W8A8_FORCE_ARCH`` as (major, minor), or None when unset; ValueError when malformed."""
    value = os.environ.get(FORCE_ARCH_ENV, "").strip()
    if not value:
        return None
    try:
        major, minor = (int(p) for p in value.split("."))
    except ValueError:
        raise ValueError(f"{FORCE_ARCH_ENV}={value!r}: expected a compute capability such as 8.6") from None
    return major, minor


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
    device_arch = _cuda_capability(idx)
    if torch.version.hip is not None:
        return Backend("triton", "ROCm: Triton pointer-load kernels, no TMA", device_arch, rocm=True,
                       table=configs.MMA_TABLE)
    gpu, smem = _device_props(idx)
    arch, what = device_arch, f"{gpu}, SM {device_arch[0]}.{device_arch[1]}"
    forced = forced_arch()
    if forced is not None:
        if forced > device_arch:
            raise ValueError(f"{FORCE_ARCH_ENV}={forced[0]}.{forced[1]}: {gpu} is SM {device_arch[0]}."
                             f"{device_arch[1]}; only an older generation's kernels run on it. Unset it or "
                             f"choose a capability <= {device_arch[0]}.{device_arch[1]}")
        arch, what = forced, f"{gpu}, SM {device_arch[0]}.{device_arch[1]} dispatched as SM {forced[0]}.{forced[1]} " \
                             f"by {FORCE_ARCH_ENV}"
        if forced < (9, 0) <= device_arch and os.environ.get("DISABLE_MMA_V3", "0") in ("", "0"):
            # Triton still compiles for the real GPU, and on sm_90 lowers the pointer-load kernel's dots with
            # BLOCK_M >= 64 to wgmma; its own switch DISABLE_MMA_V3=1 keeps them on sm_8x's mma.sync
            what += " (Triton still lowers dots for this GPU: DISABLE_MMA_V3=1 gives sm_8x's mma.sync)"
    gen = generation_for(arch)
    if gen is None:
        return _unknown_gpu(idx, arch, what)
    if gen.table is None:
        return Backend("reference", f"{what} ({gen.name}): {gen.path}", arch)
    if triton_version() < gen.min_triton:
        return Backend("reference", f"{what} ({gen.name}): Triton {'.'.join(map(str, triton_version()))} is older "
                                    f"than {'.'.join(map(str, gen.min_triton))}, the first checked for it; torch twin "
                                    "(upgrade torch and Triton to run the Triton kernels)", arch)
    if forced is not None:  # checked against the generation's limit, as on that GPU
        smem = min(smem, gen.smem_optin)
    table = gen.table
    if table.smem_bytes > smem:  # e.g. a Hopper with less shared memory exposed than sm_90 documents
        table = configs.MMA_TABLE
        note = (f"; {gen.table.name} configs need {gen.table.smem_bytes} bytes of shared memory per block, this "
                f"GPU allows {smem}: {table.name} table")
    else:
        note = f", {table.name} table ({table.smem_bytes} of {smem} bytes of shared memory per block)"
    table, why = runnable(table)
    if why is not None:
        note += f"; {why}: the {table.name} table instead"
    path = gen.path if table in (gen.table, gen.table.without_gluon, gen.table.narrow) else configs.MMA_TABLE.name
    return Backend("triton", f"{what} ({gen.name}): {path}{note}", arch, table=table)


def _unknown_gpu(idx: int, arch: tuple[int, int], what: str) -> Backend:
    """A capability without a ``GENERATIONS`` entry: the pointer-load kernels if a probe runs correctly."""
    if arch < (7, 5):
        return Backend("reference", f"{what}: no INT8 tensor cores; exact float32 GEMM in the torch twin", arch)
    error = _probe(torch.device("cuda", idx))
    if error is not None:
        return Backend("reference", f"{what}: no rule for this GPU, and the Triton probe failed ({error}); torch "
                                    "twin", arch)
    return Backend("triton", f"{what}: no rule for this GPU; Triton pointer-load kernels ({configs.MMA_TABLE.name} "
                             "table), a probe GEMM ran correctly", arch, table=configs.MMA_TABLE)


def _probe(device: torch.device) -> str | None:
    """Quantize and multiply a small problem with the Triton kernels a GPU without a rule would run and compare
    with the torch twin: None when equal, else what went wrong (compile errors included: a Triton that
    cannot target the GPU must not fail the first diffusion step)."""
    try:
        from . import reference, triton_gemm, triton_quant

        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(16, 64, generator=gen).to(device, torch.bfloat16)
        w = torch.randn(32, 64, generator=gen).to(device)
        q, s = reference.quantize_weight_unchecked(w, True, None, 0)
        xq, xs = triton_quant.quantize_rows(x)
        xq_ref, xs_ref = reference.quantize_rows_unchecked(x, None, 0)
        out = torch.empty((16, 32), dtype=torch.float32, device=device)
        triton_gemm.gemm(xq, xs.reshape(-1), q, s.reshape(-1), None, out, configs.MMA_TABLE.pick(16))
        want = reference.int8_linear_unchecked(x, q, s, None, torch.float32, None, 0)
        if not (torch.equal(xq, xq_ref) and torch.equal(xs, xs_ref) and torch.equal(out, want)):
            return "results differ from the torch twin"
    except Exception as exc:  # any failure means: do not run Triton here
        return f"{type(exc).__name__}: {exc}"
    return None


def reset() -> None:
    """Forget cached decisions (tests that change the environment or patch capabilities)."""
    _decide.cache_clear()
    _log_once.cache_clear()
    _cuda_capability.cache_clear()
    _device_props.cache_clear()
    triton_version.cache_clear()
    triton_import_error.cache_clear()
    _gluon_import_error.cache_clear()
