"""Compile the pack's Triton kernels for a GPU target without a GPU and report what the PTX uses.

    python -m int8_w8a8.bench.check_ptx            # sm_90 (Hopper), table of every GEMM config
    python -m int8_w8a8.bench.check_ptx --arch 80  # sm_80 (Ampere)

For each kernel: the tensor-core instruction (wgmma for Hopper, mma.sync before), whether loads
go through TMA (cp.async.bulk.tensor) or cp.async, shared memory, registers and spills. Must
run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..kernels import configs, triton_gemm, triton_quant


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory (spills) per thread, read from the cubin by cuobjdump."""
    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=False).stdout
    found = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", text))
    return {key.lower(): int(found.get(key, -1)) for key in ("REG", "STACK", "LOCAL")} | {
        "regs": int(found.get("REG", -1))}


def _summarize(compiled) -> dict:
    ptx = compiled.asm["ptx"]
    meta = compiled.metadata
    return {
        "wgmma": sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", ptx))),
        "mma_sync": sorted(set(re.findall(r"mma\.sync[\w.]*", ptx)))[:3],
        # Triton 3.6 writes loads as shared::cluster, 3.9 as shared::cta
        "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global", ptx)),
        "tma_stores": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared::\w+", ptx)),
        "cp_async": len(re.findall(r"cp\.async\.cg|cp\.async\.ca", ptx)),
        "widest_global_load": max(re.findall(r"ld\.global(?:\.\w+)*?\.(v[248])?\.?b(\d+)", ptx) or [("", "0")],
                                  key=lambda t: int(t[0][1:] or 1) * int(t[1])),
        "shared_bytes": meta.shared,
        "num_warps": meta.num_warps,
        **_resource_usage(compiled.asm["cubin"]),
    }


def _compile(fn, sig: dict, consts: dict, divisible: tuple[str, ...], arch: int, options: dict):
    """triton.compile with the specializations the JIT applies at run time on aligned shapes:
    pointers and ints divisible by 16 (``tt.divisibility``) and unit strides folded to constants."""
    for name in consts:
        sig[name] = "constexpr"
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible if n in sig}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=options)


def compile_gemm(cfg: configs.GemmConfig, arch: int, out: str = "bf16", per_row: bool = True, lora_r: int = 0,
                 residual: bool = False) -> dict:
    """Compile one GEMM config for ``sm_<arch>`` and summarize its PTX."""
    consts = {
        "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
        "PER_ROW_W": per_row, "HAS_BIAS": False,
    }
    if cfg.kernel == "tma":
        sub = 2 if cfg.epilogue_subtile else 1
        sig = {
            "a_desc": f"tensordesc<i8[{cfg.block_m}, {cfg.block_k}]>",
            "b_desc": f"tensordesc<i8[{cfg.block_n}, {cfg.block_k}]>",
            "c_desc": f"tensordesc<{out}[{cfg.block_m}, {cfg.block_n // sub}]>",
            "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*fp32", "h_ptr": "*bf16", "lb_ptr": "*bf16",
            "gate_ptr": "*bf16",
            "M": "i32", "N": "i32", "K": "i32", "stride_hm": "i32", "stride_lbn": "i32",
            "stride_gb": "i32", "rows_per_batch": "i32",
        }
        consts.update(NUM_PROGRAMS=132 * cfg.ctas_per_sm, EPILOGUE_SUBTILE=cfg.epilogue_subtile, LORA_R=lora_r,
                      LORA_FP32=False, RESIDUAL=residual)
        fn = triton_gemm._gemm_tma_kernel
    else:
        sig = {
            "a_ptr": "*i8", "b_ptr": "*i8", "c_ptr": f"*{out}", "xs_ptr": "*fp32", "ws_ptr": "*fp32",
            "bias_ptr": "*fp32", "h_ptr": "*bf16", "lb_ptr": "*bf16", "gate_ptr": "*bf16", "M": "i32", "N": "i32",
            "K": "i32", "stride_am": "i32", "stride_bn": "i32", "stride_bk": "i32", "stride_cm": "i32",
            "stride_hm": "i32", "stride_lbn": "i32", "stride_gb": "i32", "rows_per_batch": "i32",
        }
        consts.update(EVEN_K=True, stride_bk=1, LORA_R=lora_r, LORA_FP32=False, RESIDUAL=residual)
        fn = triton_gemm._gemm_kernel
    divisible = ("a_ptr", "b_ptr", "c_ptr", "xs_ptr", "ws_ptr", "bias_ptr", "h_ptr", "lb_ptr", "gate_ptr",
                 "N", "K", "stride_am", "stride_bn", "stride_cm", "stride_hm", "stride_lbn", "stride_gb")
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": False}
    return _summarize(_compile(fn, sig, consts, divisible, arch, options))


def compile_quant(k: int, group: int, arch: int, dtype: str = "bf16") -> dict:
    """Compile the row-quantization kernel for rows of length ``k``."""
    block_m, block_k, single, warps = triton_quant.quant_blocks(k, group)
    consts = {
        "BLOCK_M": block_m, "BLOCK_K": block_k, "SINGLE_PASS": single, "HAS_SMOOTH": False,
        "GROUP": group, "INV_SQRT_G": 1.0 / group**0.5 if group else 1.0, "KRON": group == 256,
        "DOT_FP32": dtype == "fp32", "FIXED_SCALE": False, "STOCHASTIC": False, "FAST_ROUND": True,
        "FIXED_PER_ROW": False,
    }
    sig = {
        "x_ptr": f"*{dtype}", "q_ptr": "*i8", "scale_ptr": "*fp32", "smooth_ptr": "*fp32",
        "h_ptr": f"*{dtype}", "fixed_scale_ptr": "*fp32", "M": "i32", "K": "i32",
        "stride_xm": "i32", "stride_xk": "i32", "stride_qm": "i32", "seed": "i32",
    }
    consts["stride_xk"] = 1
    del sig["stride_xk"]
    divisible = ("x_ptr", "q_ptr", "scale_ptr", "smooth_ptr", "h_ptr", "K", "stride_xm", "stride_qm")
    options = {"num_warps": warps, "enable_fp_fusion": False}
    return _summarize(_compile(triton_quant._quantize_rows_kernel, sig, consts, divisible, arch, options))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = sm_90)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    table = configs.HOPPER_TABLE if args.arch >= 90 else configs.AMPERE_TABLE
    rows = []
    for max_m, cfg in table:
        label = f"gemm M<={max_m}" if max_m < 1 << 40 else "gemm large M"
        rows.append({"what": label, "config": asdict(cfg), **compile_gemm(cfg, args.arch)})
        for rank in (64, 512):  # one chunk, and the most stacked LoRAs are likely to reach
            rows.append({"what": f"{label} +LoRA{rank}", "config": asdict(cfg),
                         **compile_gemm(cfg, args.arch, lora_r=rank)})
        res_cfg = configs.for_residual(cfg)  # as triton_ops runs it
        rows.append({"what": f"{label} +residual", "config": asdict(res_cfg),
                     **compile_gemm(res_cfg, args.arch, residual=True)})
    for k, g, dt in ((4096, 0, "bf16"), (16384, 0, "bf16"), (65600, 0, "bf16"), (4096, 256, "bf16"),
                     (4096, 256, "fp32"), (3072, 128, "bf16"), (3072, 128, "fp32"), (3072, 64, "fp16")):
        rows.append({"what": f"quant K={k} G={g} {dt}", **compile_quant(k, g, args.arch, dt)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        tc = ",".join(r["wgmma"]) or ",".join(r["mma_sync"]) or "-"
        print(f"{r['what']:<26} tc={tc:<55} tma_ld={r['tma_loads']} tma_st={r['tma_stores']} "
              f"cp.async={r['cp_async']} ld={''.join(r['widest_global_load'])} smem={r['shared_bytes']} "
              f"regs={r['regs']} local={r['local']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
