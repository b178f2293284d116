"""Compile every Triton kernel the dispatch can choose for a GPU target, without a GPU, and check what it
needs (shared memory per block) and what it runs on (INT8 tensor-core instructions, TMA).

    python -m int8_w8a8.bench.check_ptx                    # sm_90 (Hopper), a table
    python -m int8_w8a8.bench.check_ptx --arch 120 --json  # consumer Blackwell
    python -m int8_w8a8.bench.check_ptx --all --json       # every claimed target (tests/test_targets.py)

How: each kernel is launched by its real launcher (``triton_gemm.gemm``, ``triton_quant.launch_quantize``,
``triton_fused.*``) on meta tensors at FLUX.2 klein widths. The launch is intercepted and compiled for
``sm_<arch>`` with Triton's own argument specialization (what ``kernel[grid](...)`` would compile on that
GPU), and a kernel needing more shared or tensor memory than the generation allows raises OutOfResources
there, as it does on the GPU, so the launchers' resource fallback (smaller tile, else the torch twin) runs
as it would. Per kernel: the INT8 tensor-core instructions (mma.sync, wgmma, tcgen05), TMA loads and
stores, shared memory, registers and spills. Must run without TRITON_INTERPRET (the interpreter replaces
@triton.jit functions).

What is compiled is data: the GEMM configs of the target's generation (``dispatch.GENERATIONS``), each with
the plain, LoRA, residual and residual + LoRA epilogues, and ``KERNEL_SPECS`` for the quantizers and fused kernels.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import JITFunction, create_function_from_signature

from ..kernels import configs, dispatch, launch, triton_fused, triton_gemm, triton_quant
from ..kernels.launch import TileTooLargeError

META = torch.device("meta")  # shapes and dtypes only: nothing is allocated or computed
TMEM_COLUMNS = 512  # tensor memory per SM on sm_100 (Triton checks the same at load time)

# The INT8 tensor-core instruction families (dispatch.MMA_SYNC, WGMMA, TCGEN05) as they appear in the PTX.
INT8_MMA = {
    dispatch.MMA_SYNC: re.compile(r"mma\.sync\.aligned\.m16n8k32\.row\.col\.satfinite\.s32\.s8\.s8\.s32"),
    dispatch.WGMMA: re.compile(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k32\.s32\.s8\.s8"),
    dispatch.TCGEN05: re.compile(r"tcgen05\.mma\.cta_group::\d\.kind::i8"),
}


def _t(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def _quant(k: int, group: int, dtype: torch.dtype, m: int = 4608, **kw) -> None:
    triton_quant.launch_quantize(_t(m, k, dtype=dtype), _t(m, k, dtype=torch.int8), _t(m, dtype=torch.float32),
                                 rotate_group=group, **kw)


def _norm(k: int, group: int, norm: str = "layer", shift: bool = True, weight: bool = False,
          dtype: torch.dtype = torch.bfloat16, form=None, m: int = 4608) -> None:
    triton_fused.norm_modulate_quantize(_t(m, k, dtype=dtype), _t(1, k, dtype=dtype) if shift else None,
                                        _t(1, k, dtype=dtype), m, 1e-6, group, norm=norm,
                                        weight=_t(k, dtype=dtype) if weight else None, form=form)


def _norm_gate_add(n: int, form=None) -> None:
    triton_fused.rms_norm_gate_add(_t(4608, n), _t(4608, n), _t(n), _t(1, n), 4608, 1e-6, form=form)


def _gate_add_quant(n: int, group: int = 0, form=None) -> None:
    triton_fused.rms_norm_gate_add_quantize(_t(4608, n), _t(4608, n), _t(n), _t(1, n), _t(1, n), 4608, 1e-6, 1e-6,
                                            group, _t(n), form=form)


def _norm_form_specs() -> tuple[KernelSpec, ...]:
    """Every launch form of the row-normalizing kernels (``norm_configs.CANDIDATES``) at the widest rows the pack
    normalizes (Wan 14B: 5120 float16, split 4096 + 1024 or one 8192 tile; with ConvRot group 256) and at Z-Image's
    post-norm gated add (3840): each must fit every target as launched, without spills (with group 256: the split
    forms)."""
    from ..kernels import norm_configs

    specs = []
    for form in norm_configs.CANDIDATES:
        specs.append(KernelSpec(f"norm_modulate_quantize K=5120 fp16 [{form.name}]",
                                lambda f=form: _norm(5120, 0, dtype=torch.float16, form=f, m=14040)))
        # with group 256 one padded 8192-column tile needs 132 KB of shared memory (over the 99 KB of sm_86/89/120:
        # the torch twin there); the split rows' parts 59-80 KB
        specs.append(KernelSpec(f"norm_modulate_quantize K=5120 G=256 fp16 [{form.name}]",
                                lambda f=form: _norm(5120, 256, dtype=torch.float16, form=f, m=14040),
                                must_fit=form.split))
        specs.append(KernelSpec(f"rms_norm_gate_add N=3840 [{form.name}]", lambda f=form: _norm_gate_add(3840, f)))
        specs.append(KernelSpec(f"rms_norm_gate_add_quantize N=3840 [{form.name}]",
                                lambda f=form: _gate_add_quant(3840, form=f)))
    return tuple(specs)


def _glu(p: int, f: int, group: int, activation: str = "swiglu", pair: bool = False, variant: str = "") -> None:
    width = f if activation != "swiglu" or pair else 2 * f
    triton_fused.glu_quantize(_t(4608, p) if p else None, _t(4608, width), f, rotate_group=group,
                              activation=activation, up=_t(4608, f) if pair else None, variant=variant)


def _qk_norm_rope(heads: int, d: int, separate: bool = False, row_norm: bool = False,
                  pe_dtype: torch.dtype = torch.float32) -> None:
    """Fused [B, S, 3HD] projection (FLUX) or three [B, S, HD] ones (Qwen-Image, Wan with ``row_norm``)."""
    s, hd = 4608, heads * d
    out = [_t(1, heads, s, d) for _ in range(3)]
    if separate:
        xq, xk, xv = (_t(1, s, hd) for _ in range(3))
    else:
        qkv = _t(1, s, 3 * hd)
        xq, xk, xv = qkv[..., :hd], qkv[..., hd:2 * hd], qkv[..., 2 * hd:]
    w = hd if row_norm else d
    triton_fused.qk_norm_rope(xq, xk, xv, _t(w), _t(w), _t(1, 1, s, d // 2, 2, 2, dtype=pe_dtype), *out, 0, heads,
                              1e-6, 1e-6, row_norm=row_norm)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One quantizer or fused-kernel specialization, launched as the pack launches it.

    must_fit: it must fit every target's shared memory as it is; otherwise a smaller tile or the torch
    twin (the launchers' resource rule, ``launch.first_fit``) is an accepted outcome, reported.
    """

    what: str
    launch: Callable[[], None]
    must_fit: bool = True


# Every quantizer and fused-kernel specialization the pack launches at FLUX.2 klein widths (M = 4608 tokens),
# one line each. ConvRot groups 64/128 rotate with a full 64/128-wide matrix in shared memory (67-197 KB):
# on 99-KB GPUs those take a smaller tile or the torch twin; group 256 (the default, H16 (x) H16) must fit.
KERNEL_SPECS: tuple[KernelSpec, ...] = (
    KernelSpec("quantize_rows K=4096 bf16", lambda: _quant(4096, 0, torch.bfloat16)),
    KernelSpec("quantize_rows K=16384 bf16 (two passes)", lambda: _quant(16384, 0, torch.bfloat16)),
    KernelSpec("quantize_weight K=4096 fp32 stochastic", lambda: _quant(4096, 0, torch.float32, seed=7)),
    KernelSpec("quantize_rows K=4096 G=256 bf16", lambda: _quant(4096, 256, torch.bfloat16)),
    KernelSpec("quantize_rows K=4096 G=256 fp32", lambda: _quant(4096, 256, torch.float32)),
    KernelSpec("quantize_rows K=3072 G=128 bf16", lambda: _quant(3072, 128, torch.bfloat16), must_fit=False),
    KernelSpec("quantize_rows K=3072 G=128 fp32", lambda: _quant(3072, 128, torch.float32), must_fit=False),
    # the specs above compile the LEAN single-pass form (triton_quant.LEAN_ROWS, the default since session 25); the
    # general one, which `lean=False` launches, plain and rotated
    KernelSpec("quantize_rows general K=3072 bf16", lambda: _quant(3072, 0, torch.bfloat16, lean=False)),
    KernelSpec("quantize_rows general K=4096 G=256 bf16", lambda: _quant(4096, 256, torch.bfloat16, lean=False)),
    KernelSpec("quantize_rows K=3072 G=64 fp16", lambda: _quant(3072, 64, torch.float16), must_fit=False),
    KernelSpec("dequantize 3072x12288 bf16", lambda: triton_quant.dequantize(_t(3072, 12288, dtype=torch.int8),
                                                                            _t(3072, dtype=torch.float32),
                                                                            torch.bfloat16)),
    KernelSpec("norm_modulate_quantize K=4096", lambda: _norm(4096, 0)),
    KernelSpec("norm_modulate_quantize K=4096 G=256", lambda: _norm(4096, 256)),
    KernelSpec("norm_modulate_quantize K=3072 G=128", lambda: _norm(3072, 128), must_fit=False),
    KernelSpec("glu_quantize P=4096 F=12288", lambda: _glu(4096, 12288, 0)),
    KernelSpec("glu_quantize P=4096 F=12288 G=256", lambda: _glu(4096, 12288, 256)),
    KernelSpec("glu_quantize P=3072 F=9216 G=128", lambda: _glu(3072, 9216, 128), must_fit=False),
    KernelSpec("qk_norm_rope H=32 D=128", lambda: _qk_norm_rope(32, 128)),
    # the other architectures' block forms (ops/blocks): GELU-tanh MLPs (Chroma, Qwen-Image, Wan), Z-Image's
    # RMSNorm + scale, SwiGLU from its (w1, w3) pair and post-norm gated add, separate q/k/v projections
    KernelSpec("glu_quantize GELU-tanh P=3072 F=12288", lambda: _glu(3072, 12288, 0, "gelu_tanh")),
    KernelSpec("glu_quantize GELU-tanh F=12288 G=256", lambda: _glu(0, 12288, 256, "gelu_tanh")),
    KernelSpec("glu_quantize SwiGLU pair F=10240", lambda: _glu(0, 10240, 0, "swiglu", pair=True)),
    # glu_quantize's other launch variants (triton_fused.GLU_VARIANTS): the fast sigmoid and per-lane absmax
    # ("lean"), with the rotation's dots, and with the 2048-column tile
    KernelSpec("glu_quantize lean SwiGLU pair F=10240", lambda: _glu(0, 10240, 0, "swiglu", True, "lean")),
    KernelSpec("glu_quantize lean P=4096 F=12288 G=256", lambda: _glu(4096, 12288, 256, variant="lean")),
    KernelSpec("glu_quantize lean GELU-tanh F=13824", lambda: _glu(0, 13824, 0, "gelu_tanh", variant="lean")),
    KernelSpec("glu_quantize lean-w4 SwiGLU pair F=10240", lambda: _glu(0, 10240, 0, "swiglu", True, "lean-w4")),
    # the split store ("-ss") and GELU-tanh's max statistics ("-mx"), with a prefix (Chroma's single blocks) and Wan's
    # width; SwiGLU with "-mx" takes its lane statistics
    KernelSpec("glu_quantize lean-w4-fs-ss-mx GELU-tanh P=3072 F=12288",
               lambda: _glu(3072, 12288, 0, "gelu_tanh", variant="lean-w4-fs-ss-mx")),
    KernelSpec("glu_quantize lean-fs-ss-mx GELU-tanh F=13824", lambda: _glu(0, 13824, 0, "gelu_tanh",
                                                                              variant="lean-fs-ss-mx")),
    KernelSpec("glu_quantize lean-fs-ss P=4096 F=12288", lambda: _glu(4096, 12288, 0, variant="lean-fs-ss")),
    # FLUX.2 9B's single block in the SwiGLU GEMM form: the attention output and the rows glu_gemm activated
    KernelSpec("glu_quantize identity P=4096 F=12288", lambda: _glu(4096, 12288, 0, "identity")),
    KernelSpec("glu_quantize identity P=4096 F=12288 G=256", lambda: _glu(4096, 12288, 256, "identity")),
    KernelSpec("norm_modulate_quantize RMS+weight K=3840", lambda: _norm(3840, 0, "rms", shift=False, weight=True)),
    KernelSpec("qk_norm_rope separate H=24 D=128 bf16 table", lambda: _qk_norm_rope(24, 128, True,
                                                                                    pe_dtype=torch.bfloat16)),
    KernelSpec("qk_norm_rope row norm H=40 D=128", lambda: _qk_norm_rope(40, 128, True, row_norm=True)),
    KernelSpec("rms_norm_gate_add N=3840", lambda: _norm_gate_add(3840)),
    KernelSpec("rms_norm_gate_add_quantize N=3840", lambda: _gate_add_quant(3840)),
    # with group 256 the 3840-column row needs 115 KB on the 99-KB GPUs (sm_86/89/120): the two kernels run there
    KernelSpec("rms_norm_gate_add_quantize N=3840 G=256", lambda: _gate_add_quant(3840, 256), must_fit=False),
    KernelSpec("norm_modulate_quantize K=3072 G=256", lambda: _norm(3072, 256)),
    KernelSpec("norm_modulate_quantize K=5120 fp16", lambda: _norm(5120, 0, dtype=torch.float16, m=14040)),
    KernelSpec("norm_modulate_quantize K=5120 G=128 fp16", lambda: _norm(5120, 128, dtype=torch.float16, m=14040),
               must_fit=False),
    *_norm_form_specs(),
)

# LoRA ranks compiled into every GEMM config: the smallest chunk (ranks <= 16) and the most chunks stacked
# LoRAs are likely to reach (8 chunks of 64).
LORA_RANKS = (16, 512)


def gemm_specs(table: configs.GemmTable) -> list[KernelSpec]:
    """Every config of ``table`` (and of its table for unaligned operands) with each epilogue, launched through
    ``triton_gemm.gemm`` at M = 4608, K = 4096, N = 12288, bf16 out."""
    m, k, n = 4608, 4096, 12288

    def run(cfg, rank=0, residual=False):
        xq, wq = _t(m, k, dtype=torch.int8), _t(n, k, dtype=torch.int8)
        xs, ws = _t(m, dtype=torch.float32), _t(n, dtype=torch.float32)
        lora = (_t(m, rank), _t(n, rank)) if rank else (None, None)
        gate = _t(1, n) if residual else None
        triton_gemm.gemm(xq, xs, wq, ws, None, _t(m, n), cfg, *lora, gate, m)

    specs = []
    for cfg in dict.fromkeys(table.configs()):
        name = (f"gemm {cfg.kernel}{' ws' if cfg.warp_spec else ''} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} "
                f"w{cfg.num_warps} s{cfg.num_stages}"
                f"{' sub' if cfg.epilogue_subtile else ''}{f' {cfg.ctas_per_sm}/SM' if cfg.ctas_per_sm > 1 else ''}"
                f"{f' r{cfg.max_registers}' if cfg.max_registers else ''}")
        specs.append(KernelSpec(name, lambda cfg=cfg: run(cfg)))
        specs += [KernelSpec(f"{name} +LoRA{r}", lambda cfg=cfg, r=r: run(cfg, r)) for r in LORA_RANKS]
        res = configs.for_residual(cfg)  # as triton_ops runs it
        specs.append(KernelSpec(f"{name} +residual", lambda res=res: run(res, residual=True)))
        # a fused block's gated residual add with a dynamic LoRA term (Int8Linear.run_quantized): the most
        # chunks, the worst case for shared memory and registers
        specs.append(KernelSpec(f"{name} +residual +LoRA{LORA_RANKS[-1]}",
                                lambda res=res: run(res, LORA_RANKS[-1], residual=True)))
    return specs


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory (spills) per thread, read from the cubin by cuobjdump."""
    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=False).stdout
    found = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    return {"regs": int(found.get("REG", -1)), "local": int(found.get("LOCAL", -1)),
            "stack": int(found.get("STACK", -1))}


def int8_desc_sig(rows: int, cols: int) -> str:
    """The signature type of a Gluon kernel's int8 TMA descriptor argument with a ``[rows, cols]`` block in its
    default shared layout (what ``kernels/gluon_*.py``'s host code builds), for offline compiles."""
    from triton.experimental.gluon import language as gl

    return f"tensordesc<i8[{rows}, {cols}],{gl.NVMMASharedLayout.get_default_for([rows, cols], gl.int8)}>"


def ptxas_waits(ptx: str, arch: int = 90) -> list[str]:
    """ptxas's notes that it serialized wgmma or injected a ``warpgroup.wait`` into the kernel (C7510, C7517, ...:
    a register an in-flight wgmma defines or reads is touched by another instruction, as a loop-carried
    accumulator merged with other values at a branch can be), from Triton's bundled ptxas run with ``-v`` on the
    PTX for ``sm_<arch>a``. Triton does not show these; each costs a product in flight. Empty: none."""
    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([tool, f"-arch=sm_{arch}a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=False)
    return [line.split(":", 1)[1].strip() for line in (run.stdout + run.stderr).splitlines()
            if re.search(r"wgmma|warpgroup\.wait|GMMA", line) and "ptxas" in line]


def global_access(ptx: str) -> dict[str, int]:
    """Per-thread global loads and stores of a kernel by width (``ld.global.b16``: one 2-byte load, ``.v4.b32`` 16
    bytes), as PTX instructions in program order (a loop body counts once). Scalar 1-2 byte accesses to a tile
    mean the tile's register layout is not the memory's (bench/NOTES.md item 63: the attention's quantization
    pass stored V's transposed tile a byte at a time)."""
    counts: dict[str, int] = {}
    for op in re.findall(r"\b((?:ld|st)\.global(?:\.[\w]+)*)", ptx):
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def summarize(compiled) -> dict:
    """What one compiled kernel uses: INT8 tensor-core instruction families, every MMA instruction, TMA,
    cp.async, shared and tensor memory, registers and spills; ``trap_only``: the body compiled to a trap."""
    ptx = compiled.asm["ptx"]
    meta = compiled.metadata
    return {
        "int8_mma": sorted(name for name, pattern in INT8_MMA.items() if pattern.search(ptx)),
        "mma": sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync|tcgen05\.mma)[\w.:]*", ptx))),
        # Triton 3.6 writes loads as shared::cluster, 3.9 as shared::cta
        "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global", ptx)),
        "tma_stores": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared::\w+", ptx)),
        "cp_async": len(re.findall(r"cp\.async\.cg|cp\.async\.ca", ptx)),
        "global_access": global_access(ptx),
        "shared_bytes": meta.shared,
        "tmem_columns": getattr(meta, "tmem_size", None) or 0,
        "num_warps": meta.num_warps,
        # warp specialization (Hopper): the register split of producer and consumer warpgroups
        "setmaxnreg": sorted({f"{k}{n}" for k, n in re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)", ptx)}),
        "wgmma_count": len(re.findall(r"wgmma\.mma_async", ptx)),
        "trap_only": "trap;" in ptx and not re.search(r"\bld\.|\bst\.|mma", ptx),
        # only Hopper's wgmma can be serialized this way (sm_90a PTX)
        "ptxas_waits": ptxas_waits(ptx) if "wgmma.mma_async" in ptx and ".target sm_90a" in ptx else [],
        **_resource_usage(compiled.asm["cubin"]),
    }


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict, arch: int):
    """What ``fn[grid](*args, **kwargs)`` compiles on an ``sm_<arch>`` GPU: Triton's JIT binder and argument
    specialization (alignment, divisibility by 16, ints equal to 1), compiled for that target."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {"debug": False, **kwargs}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel (kernels/gluon_*.py) compiles from its own source
        from triton.experimental.gluon._runtime import GluonASTSource

        source = GluonASTSource
    return triton.compile(source(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


@contextlib.contextmanager
def emulated_gpu(arch: int, smem_limit: int, keep_cubin: bool = False):
    """Within the block, Triton launches compile for ``sm_<arch>`` instead of running, and one needing more
    than ``smem_limit`` bytes of shared memory (or more tensor memory than the SM has) raises OutOfResources
    as on that GPU. Yields the list of attempts: (kernel name, key meta-parameters, summary, fits; with
    ``keep_cubin`` also the binary under "cubin", for SASS checks)."""
    attempts = []

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:  # a launcher asking for the compiled kernel's registers first: the launch compiles it below
            return None
        compiled = compile_launch(self, args, kwargs, arch)
        info = summarize(compiled)
        params = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        fits = info["shared_bytes"] <= smem_limit and info["tmem_columns"] <= TMEM_COLUMNS
        attempts.append({"kernel": self.__name__, "params": params, "fits": fits, **info,
                         **({"cubin": compiled.asm["cubin"]} if keep_cubin else {})})
        if info["tmem_columns"] > TMEM_COLUMNS:
            raise OutOfResources(info["tmem_columns"], TMEM_COLUMNS, "tensor memory")
        if not fits:
            raise OutOfResources(info["shared_bytes"], smem_limit, "shared memory")

    def direct(self, grid, *args, **kwargs):
        self.fn[grid](*args, **kwargs)

    with mock.patch.object(JITFunction, "run", run), mock.patch.object(launch.FastLauncher, "__call__", direct), \
            mock.patch.object(launch, "_MISFITS", set()):
        yield attempts


def _params(attempt: dict) -> str:
    p = attempt["params"]
    return " ".join(f"{k}={p[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages", "EPILOGUE_SUBTILE")
                    if k in p)


def check_target(arch: int) -> dict:
    """Compile everything the dispatch can choose on ``sm_<arch>`` (a ``GENERATIONS`` target) and report it."""
    gen = next(g for g in dispatch.GENERATIONS if g.target == arch)
    start = time.perf_counter()
    result = {"arch": arch, "generation": gen.name, "path": gen.path, "smem_limit": gen.smem_optin,
              "triton": triton.__version__, "table": gen.table.name if gen.table else None,
              "table_smem_bytes": gen.table.smem_bytes if gen.table else None, "rows": []}
    if gen.table is None:
        # not dispatched here (the torch twin runs); record why: Triton's int8 dot does not compile for it
        try:
            with emulated_gpu(arch, gen.smem_optin):
                gemm_specs(configs.MMA_TABLE)[0].launch()
            result["int8_dot_compiles"] = True
        except Exception as exc:
            result["int8_dot_compiles"] = False
            result["int8_dot_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        result["seconds"] = round(time.perf_counter() - start, 1)
        return result
    for kind, specs in (("gemm", gemm_specs(gen.table)), ("kernel", KERNEL_SPECS)):
        for spec in specs:
            with emulated_gpu(arch, gen.smem_optin) as attempts:
                try:
                    spec.launch()
                    outcome = "fits" if len(attempts) == 1 else f"smaller config ({_params(attempts[-1])})"
                except TileTooLargeError:
                    outcome = "torch twin"
            first = attempts[0]
            result["rows"].append({"what": spec.what, "kind": kind, "must_fit": spec.must_fit, "outcome": outcome,
                                   "attempts": len(attempts), **first,
                                   "final_shared_bytes": attempts[-1]["shared_bytes"]})
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def check_ws(arch: int = 90) -> dict:
    """Compile the warp-specialized Hopper configs (``configs.HOPPER_WS_VARIANTS``) with every epilogue (a LoRA
    term, bfloat16 or float32, and a gated residual run without warp specialization) as ``triton_gemm.gemm``
    launches them; each
    row carries ``split``: the producer / consumer partition appeared (12 warps, setmaxnreg) and ``problems``
    (empty when it passes)."""
    start = time.perf_counter()
    gen = next(g for g in dispatch.GENERATIONS if g.target == arch)
    table = configs.GemmTable("hopper warp-specialized variants", tuple(enumerate(configs.HOPPER_WS_VARIANTS)), 0)
    m, k, n = 4608, 4096, 12288

    def fp32_lora(cfg: configs.GemmConfig) -> None:
        xq, wq = _t(m, k, dtype=torch.int8), _t(n, k, dtype=torch.int8)
        xs, ws = _t(m, dtype=torch.float32), _t(n, dtype=torch.float32)
        triton_gemm.gemm(xq, xs, wq, ws, None, _t(m, n), cfg, _t(m, 64, dtype=torch.float32),
                         _t(n, 64, dtype=torch.float32))

    specs = gemm_specs(table)
    specs += [KernelSpec(f"gemm tma {c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages} +LoRA64 fp32",
                         lambda c=c: fp32_lora(c)) for c in configs.HOPPER_WS_VARIANTS]
    rows = []
    for spec in specs:
        with emulated_gpu(arch, gen.smem_optin) as attempts:
            try:
                spec.launch()
                outcome = "fits" if len(attempts) == 1 else f"smaller config ({_params(attempts[-1])})"
                error = None
            except TileTooLargeError:
                outcome, error = "torch twin", None
            except Exception as exc:  # a compiler failure: recorded with its first line
                outcome, error = "error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        if not attempts:  # failed before compiling
            rows.append({"what": spec.what, "kind": "gemm", "outcome": outcome, "split": False,
                         "problems": [error or outcome]})
            continue
        first = attempts[0]
        split = first.get("num_warps") == 12 and bool(first.get("setmaxnreg"))
        bad = [] if outcome == "fits" else [f"{outcome}{f' ({error})' if error else ''}"]
        # a LoRA term or a gated residual runs the config without warp specialization (triton_gemm.gemm's rule)
        if not split and "LoRA" not in spec.what and "residual" not in spec.what:
            bad.append(f"not warp-specialized ({first['num_warps']} warps, setmaxnreg {first['setmaxnreg']})")
        if first.get("local", 0) > 0:
            bad.append(f"register spills: local {first['local']} B")
        if first.get("ptxas_waits"):
            bad.append(f"ptxas: {first['ptxas_waits'][0][:160]}")
        rows.append({"what": spec.what, "kind": "gemm", "outcome": outcome,
                     "split": split, "problems": bad, **first})
    return {"arch": arch, "generation": gen.name, "path": "warp-specialized variants",
            "smem_limit": gen.smem_optin, "triton": triton.__version__, "table": table.name, "table_smem_bytes": None,
            "rows": rows, "seconds": round(time.perf_counter() - start, 1)}


def _table(result: dict) -> str:
    lines = [f"sm_{result['arch']} {result['generation']}: {result['path']}; limit {result['smem_limit']} bytes per "
             f"block; table {result['table']} (records {result['table_smem_bytes']}); Triton {result['triton']}; "
             f"{result['seconds']} s"]
    if "int8_dot_compiles" in result:
        lines.append(f"  int8 tl.dot compiles: {result['int8_dot_compiles']} {result.get('int8_dot_error', '')}")
    for r in result["rows"]:
        if "int8_mma" not in r:  # failed before compiling
            lines.append(f"  {r['what']:<52} {r['outcome']:<40} PROBLEMS: {'; '.join(r['problems'])}")
            continue
        mma = ",".join(r["int8_mma"]) or "-"
        lines.append(f"  {r['what']:<52} {r['outcome']:<40} int8={mma:<16} smem={r['shared_bytes']:>6} "
                     f"tmem={r['tmem_columns']:>4} tma={r['tma_loads']}/{r['tma_stores']} cp.async={r['cp_async']:>3} "
                     f"regs={r['regs']:>3} local={r['local']}{' TRAP' if r['trap_only'] else ''}"
                     + (f" warps={r['num_warps']} wgmma={r['wgmma_count']} "
                        f"setmaxnreg={','.join(r['setmaxnreg']) or '-'}" if "split" in r else "")
                     + (f" PROBLEMS: {'; '.join(r['problems'])}" if r.get("problems") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="target as an int (90 = sm_90)")
    parser.add_argument("--all", action="store_true", help="every target in dispatch.GENERATIONS")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="targets compiled in parallel")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--ws", action="store_true", help="the warp-specialized Hopper configs (sm_90)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
    if args.ws:
        result = check_ws(90)
        print(json.dumps([result], indent=1) if args.json else _table(result))
        return 1 if any(r["problems"] for r in result["rows"]) else 0
    targets = [g.target for g in dispatch.GENERATIONS] if args.all else [args.arch]
    if len(targets) > 1 and args.jobs > 1:
        # a process per target, the largest tables first so the workers end together
        gens = {g.target: g for g in dispatch.GENERATIONS}
        order = sorted(targets, key=lambda a: -len(gens[a].table.configs()) if gens[a].table else 0)
        with concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(targets))) as pool:
            done = dict(zip(order, pool.map(check_target, order), strict=True))
        results = [done[a] for a in targets]
    else:
        results = [check_target(a) for a in targets]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print("\n\n".join(_table(r) for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
