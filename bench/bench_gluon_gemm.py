"""The Gluon INT8 GEMM (``kernels/gluon_gemm.py``, wgmma left in flight) against the pack's table and cuBLAS FP8.

    python -m int8_w8a8.bench.bench_gluon_gemm --check            # no GPU: compile every config for sm_90
    python -m int8_w8a8.bench.bench_gluon_gemm [--out gluon.json]  # H200: bit identity, then ms and TOPS
                                                                   # (plain, then the gated residual epilogue)
    python -m int8_w8a8.bench.bench_gluon_gemm --glu [--out glu.json]  # the SwiGLU GEMM against two GEMMs

``--check`` reports for each ``CONFIGS`` entry the wgmma instruction, the ``wgmma.wait_group`` arguments (1: a
product stays in flight while the next is issued; the pack's Triton kernels show only 0, bench/NOTES.md item 56),
registers, spills and shared memory, and fails on a config that spills, waits only with 0, or needs more than
sm_90's 227 KB. On a GPU each config's output must equal the torch twin's bit for bit (bf16 out, per-row scales)
before it is timed; the table's kernel without its Gluon row (``HOPPER_TABLE``, the reference) and as dispatched
(``triton_ops.int8_gemm``, the config the pack picks: the Gluon row at M > 1024 on Hopper) and cuBLAS FP8
(``torch._scaled_mm``, per-tensor scales) are timed alongside at the same shapes. The API calls include their host
work (checks, config pick, descriptors): at small shapes (M = 256) that, not the kernel, is what they time.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys

import torch

from ..kernels import gluon_gemm
from ..kernels.gluon_gemm import GluonGemmConfig

CONFIGS: dict[str, GluonGemmConfig] = {
    "gluon 128x128x128 s4 w8": GluonGemmConfig(128, 128, 128, 4, 8),
    "gluon 128x128x64 s6 w8": GluonGemmConfig(128, 128, 64, 6, 8),
    "gluon 64x128x128 s4 w4": GluonGemmConfig(64, 128, 128, 4, 4),
    "gluon persistent 128x128x128 s4 w8": GluonGemmConfig(128, 128, 128, 4, 8, persistent=True),
    "gluon persistent 64x128x128 s4 w4 2/SM": GluonGemmConfig(64, 128, 128, 4, 4, persistent=True, ctas_per_sm=2),
    "gluon persistent 128x128x64 s6 w8 2/SM": GluonGemmConfig(128, 128, 64, 6, 8, persistent=True, ctas_per_sm=2),
    # two programs per SM by capping registers at 128 (the epilogue spills, the K loop does not: item 59)
    "gluon 128x128x64 s4 w8 r128 2/SM": GluonGemmConfig(128, 128, 64, 4, 8, max_registers=128),
    "gluon 128x128x128 s3 w8 r128 2/SM": GluonGemmConfig(128, 128, 128, 3, 8, max_registers=128),
    # Hopper's Gluon row past 8192 rows (configs.HOPPER_GLUON_XL): one program an SM, 255 registers, the epilogue
    # spills (an 80-byte stack), the K loop does not (``k_loop_spills``)
    "gluon 128x256x128 s3 w8": GluonGemmConfig(128, 256, 128, 3, 8),
}  # 128 x 256 at 8 warps compiles with 255 registers and a 64-byte stack (spills): not a candidate
# the configs the SwiGLU GEMM (``_gluon_glu_kernel``) is compiled and timed with: the dispatched large-M row's form
GLU_CONFIGS = ("gluon 128x128x128 s3 w8 r128 2/SM",)
# SwiGLU up projections (M, K, F): Z-Image's w1/w3 pair, FLUX.2 klein 9B's and 4B's double-block MLP input
GLU_SHAPES = [(4608, 3840, 10240), (4096, 4096, 12288), (4096, 3072, 9216)]
# single-block linear1s [q/k/v | gate | up] (M, K = hidden, F): FLUX.2 klein 9B's and 4B's
SPLIT_SHAPES = [(4608, 4096, 12288), (4608, 3072, 9216)]
# the large-M GEMMs of Z-Image, FLUX.2 klein 9B and Qwen-Image (sweep_gemm.WS_SHAPES and Qwen-Image's widths),
# and one of each smaller M bucket
SHAPES = [(4608, 3840, 11520), (4608, 3840, 3840), (4608, 3840, 10240), (4608, 10240, 3840), (4608, 4096, 36864),
          (4608, 16384, 4096), (4096, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072), (1024, 3072, 27648),
          (256, 4096, 12288)]
SMEM_LIMIT = 232448  # bytes per block on sm_90


def compile_offline(cfg: GluonGemmConfig, arch: int = 90, out: str = "bf16", residual: bool = False,
                    glu: bool = False, head: bool = False) -> dict:
    """Compile the kernel of ``cfg`` for ``sm_<arch>`` without a GPU (per-row scales, a bias, and with ``residual``
    the gated residual epilogue; ``glu``: the SwiGLU GEMM, ``_gluon_glu_kernel``, with ``head`` its HEAD form: a
    plain GEMM's tiles first); its PTX/cubin summary."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from .check_ptx import _resource_usage, int8_desc_sig, ptxas_waits
    from .check_ptx_attention import _sass, innermost_loops, wgmma_overlap

    sizes = {"M": "i32", "N": "i32", "K": "i32", "stride_om": "i32"}
    if glu:
        half = int8_desc_sig(cfg.block_n // 2, cfg.block_k)
        sig = {"a_desc": int8_desc_sig(cfg.block_m, cfg.block_k), "g_desc": half, "u_desc": half,
               "out_ptr": f"*{out}", "xs_ptr": "*fp32", "gs_ptr": "*fp32", "us_ptr": "*fp32", "gb_ptr": f"*{out}",
               "ub_ptr": f"*{out}", "M": "i32", "F": "i32", "K": "i32", "stride_om": "i32", "G_ROW": "i32",
               "U_ROW": "i32", "head_ptr": f"*{out}", "hs_ptr": "*fp32", "hb_ptr": f"*{out}", "HEAD_N": "i32",
               "stride_hm": "i32"}
        consts = {"PER_ROW": True, "HAS_BIAS": True, "HEAD": head}
        kernel = gluon_gemm._gluon_glu_kernel
    else:
        sig = {"a_desc": int8_desc_sig(cfg.block_m, cfg.block_k), "b_desc": int8_desc_sig(cfg.block_n, cfg.block_k),
               "out_ptr": f"*{out}", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": f"*{out}",
               "gate_ptr": f"*{out}", **sizes, "stride_gb": "i32", "rows_per_batch": "i32"}
        consts = {"PER_ROW": True, "HAS_BIAS": True, "RESIDUAL": residual}
        kernel = gluon_gemm._gluon_gemm_persistent_kernel if cfg.persistent else gluon_gemm._gluon_gemm_kernel
    consts.update(STAGES=cfg.stages, GROUP_M=cfg.group_m, num_warps=cfg.num_warps)
    sig.update(dict.fromkeys(consts, "constexpr"))
    compiled = triton.compile(GluonASTSource(kernel, sig, consts, {}),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "enable_fp_fusion": gluon_gemm.FP_FUSION,
                                       **cfg.launch_options()})
    ptx = compiled.asm["ptx"]
    loops = innermost_loops(_sass(compiled.asm["cubin"]))
    # the K loop: the shortest SASS loop holding wgmma (a longer one spans the epilogue: the barrier-retry stubs
    # after it branch back); None where cuobjdump is missing
    k_loop_spills = sum(bool(re.search(r"\b(STL|LDL)\b", t)) for t in min(loops, key=len)) if loops else None
    return {"wgmma": sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", ptx))), **wgmma_overlap(ptx),
            "k_loop_spills": k_loop_spills,
            "fp32_fma": len(re.findall(r"\bfma\.rn\.f32\b", ptx)), "ptxas_waits": ptxas_waits(ptx, arch),
            "shared_bytes": compiled.metadata.shared, **_resource_usage(compiled.asm["cubin"])}


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled config (empty: it passes)."""
    bad = []
    if not any(".s32.s8.s8" in w for w in row["wgmma"]):
        bad.append("no wgmma s8")
    if max(row["wgmma_waits"], default=0) < 1:
        bad.append("every wgmma waited for at once (wait_group 0 only)")
    if row.get("k_loop_spills"):
        bad.append(f"{row['k_loop_spills']} spill instructions in the K loop")
    if (row["local"] > 0 or row["stack"] > 0) and not row.get("max_registers") and row.get("k_loop_spills") is None:
        # a register cap is chosen knowing the epilogue spills (GluonGemmConfig.max_registers); without one and
        # without the SASS to show a clean K loop, none
        bad.append(f"register spills: local {row['local']} B, stack {row['stack']} B")
    if row["ptxas_waits"]:  # ptxas waits for the wgmma itself: nothing stays in flight (bench/NOTES.md item 59)
        bad.append(f"ptxas: {row['ptxas_waits'][0][:160]}")
    if row["fp32_fma"]:  # the twin rounds each product and sum: a contracted epilogue is 1 ulp off (item 58)
        bad.append(f"{row['fp32_fma']} float32 FMAs in the epilogue")
    if row["shared_bytes"] > SMEM_LIMIT:
        bad.append(f"shared memory {row['shared_bytes']} B over {SMEM_LIMIT}")
    return bad


def check_launches(arch: int = 90) -> list[dict]:
    """``gluon_gemm.launch`` as the pack calls it (host TensorDescriptors, scales, bias, bf16/fp32 out), bound by
    Triton's JIT on CPU tensors and compiled for ``sm_<arch>`` instead of run (``check_ptx.emulated_gpu``): what a
    GPU's first call would compile. One row per call."""
    from .check_ptx import emulated_gpu

    rows = []
    xq, wq = torch.zeros(300, 256, dtype=torch.int8), torch.zeros(200, 256, dtype=torch.int8)
    xs, ws = torch.ones(300), torch.ones(200)
    calls = {"per-row scales, bf16 bias, bf16 out": (ws, torch.zeros(200, dtype=torch.bfloat16), torch.bfloat16),
             "per-tensor scale, no bias, fp32 out": (ws[0].clone().reshape(()), None, torch.float32)}
    for label, (w_scale, bias, dtype) in calls.items():
        with emulated_gpu(arch, SMEM_LIMIT) as attempts:
            try:
                gluon_gemm.launch(xq, xs, wq, w_scale, bias, torch.empty(300, 200, dtype=dtype))
                gluon_gemm.launch(xq, xs, wq, w_scale, bias, torch.empty(300, 200, dtype=dtype),
                                  GluonGemmConfig(persistent=True), gate=torch.zeros(3, 200, dtype=dtype))
                gluon_gemm.launch(xq, xs, wq, w_scale, bias, torch.empty(300, 200, dtype=dtype),
                                  GluonGemmConfig(128, 128, 64, 4, 8, max_registers=128))
                # the SwiGLU GEMM's launches (``glu_launch_args`` / ``split_glu_launch_args``, as
                # ``triton_gemm.gemm_glu`` binds them): two weights, then one weight [head | gate | up]
                row128 = GluonGemmConfig(128, 128, 128, 3, 8, max_registers=128)
                half, other = ((wq[cut], w_scale[cut] if w_scale.dim() else w_scale,
                                bias[cut] if bias is not None else None) for cut in (slice(0, 100), slice(100, 200)))
                kernel, grid, g_args, g_kwargs = gluon_gemm.glu_launch_args(
                    xq, xs, half, other, torch.empty(300, 100, dtype=dtype), row128)
                kernel[grid](*g_args, **g_kwargs)
                kernel, grid, g_args, g_kwargs = gluon_gemm.split_glu_launch_args(
                    xq, xs, (wq, w_scale, bias), 40, torch.empty(300, 40, dtype=dtype),
                    torch.empty(300, 80, dtype=dtype), row128)
                kernel[grid](*g_args, **g_kwargs)
                bad = [] if len(attempts) == 5 and all(a["fits"] for a in attempts) else [
                    f"compiled {[a['kernel'] for a in attempts]}, fits {[a['fits'] for a in attempts]}"]
                if attempts and attempts[-1]["regs"] > 128:  # the cap reached ptxas through Triton's launch
                    bad.append(f"max_registers 128 launched with {attempts[-1]['regs']} registers")
            except Exception as exc:  # a binding or compile failure is this call's result
                bad = [f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"]
        info = {k: attempts[-1].get(k) for k in ("shared_bytes", "regs", "local", "stack")} if attempts else {}
        rows.append({"name": f"launch: {label}", **info, "problems": bad})
    return rows


def check(arch: int = 90) -> list[dict]:
    rows = []
    for name, cfg in CONFIGS.items():
        for residual in (False, True):
            label = f"{name}{' +residual' if residual else ''}"
            try:
                row = {**compile_offline(cfg, arch, residual=residual), "max_registers": cfg.max_registers}
                rows.append({"name": label, **row, "problems": problems(row)})
            except Exception as exc:  # a compiler failure is this config's result
                rows.append({"name": label, "problems": [f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"]})
    for name in GLU_CONFIGS:
        cfg = CONFIGS[name]
        for head in (False, True):
            label = name.replace("gluon ", "glu ", 1) + (" +head" if head else "")
            try:
                row = {**compile_offline(cfg, arch, glu=True, head=head), "max_registers": cfg.max_registers}
                rows.append({"name": label, **row, "problems": problems(row)})
            except Exception as exc:  # a compiler failure is this config's result
                rows.append({"name": label, "problems": [f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"]})
    return rows + check_launches(arch)


def _checked_rows(calls: dict, run_once, want: torch.Tensor | None, against: str, mkn: tuple[int, int, int],
                  warmup_ms: int, rep_ms: int) -> list[dict]:
    """One result row per call (name -> fn): ``run_once(fn)`` gives its output, which must equal ``want`` bit for
    bit (None: the first call's output is the reference) before ``fn`` is timed; ms and TOPS, or the error."""
    from . import common

    rows = []
    for name, fn in calls.items():
        try:
            y = run_once(fn)
            torch.cuda.synchronize()
            if want is None:
                want = y
            elif not torch.equal(y, want):
                diff = (y.float() - want.float()).abs().nan_to_num(1e30)
                rows.append({"name": name, "error": f"not bit-identical to {against}",
                             "differing": int((diff > 0).sum()), "max_abs_diff": float(diff.max())})
                continue
            ms = common.bench_ms(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
            rows.append({"name": name, "ms": ms, "tops": common.tops(*mkn, ms)})
        except Exception as exc:  # out of resources, a compiler failure: record and go on
            rows.append({"name": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return rows


def run(shapes=SHAPES, warmup_ms: int = 10, rep_ms: int = 50) -> list[dict]:
    """Per shape: the table's kernel, every ``CONFIGS`` entry (not timed unless bit-identical to the twin), cuBLAS
    FP8; ms, TOPS and x the table's kernel."""
    from ..kernels import triton_ops
    from ..kernels.dispatch import Backend, choose_backend
    from .sweep_gemm import _operands, cublas_fp8_row, print_rows

    backend = choose_backend(torch.device("cuda"))
    # the reference: the table without its Gluon row (the warp-specialized one), as before the Gluon row
    before = Backend("triton", "reference", backend.arch, table=backend.table.without_gluon or backend.table)
    results = []
    for m, k, n in shapes:
        x, w, xq, xs, wq, ws, ref, _ = _operands(m, k, n)
        calls = {"table w/o Gluon (int8_gemm)": functools.partial(triton_ops.int8_gemm, xq, xs.reshape(-1, 1), wq,
                                                                    ws, None, torch.bfloat16, before),
                 "table dispatched (int8_gemm)": functools.partial(triton_ops.int8_gemm, xq, xs.reshape(-1, 1), wq,
                                                                    ws, None, torch.bfloat16, backend)}
        calls.update({name: functools.partial(gluon_gemm.gemm, xq, xs, wq, ws, None, torch.bfloat16, cfg)
                      for name, cfg in CONFIGS.items()})
        rows = _checked_rows(calls, lambda fn: fn(), ref, "the twin", (m, k, n), warmup_ms, rep_ms)
        rows.append(cublas_fp8_row(x, w, warmup_ms, rep_ms))
        print_rows(m, k, n, rows, "table")
        results.append({"M": m, "K": k, "N": n, "results": rows})
    return results


def run_residual(warmup_ms: int = 10, rep_ms: int = 50) -> list[dict]:
    """The gated residual epilogue (Z-Image's attention output and w2, klein's projections:
    ``sweep_gemm.WS_RESIDUAL_SHAPES``): the table's residual config (``configs.for_residual``, the reference for
    bit identity from one starting residual), every ``CONFIGS`` entry, cuBLAS FP8 without the epilogue (as the
    sweeps list it). Timed calls keep adding into the residual."""
    from ..kernels import configs, triton_gemm
    from .sweep_gemm import WS_RESIDUAL_SHAPES, _operands, cublas_fp8_row, print_rows

    table_cfg = configs.for_residual(configs.HOPPER_PLAIN_TABLE.rows[-1][1])
    results = []
    for m, k, n in WS_RESIDUAL_SHAPES:
        x, w, xq, xs, wq, ws, _, _ = _operands(m, k, n)
        gate = (torch.randn(1, n, device="cuda") * 0.01).to(torch.bfloat16)
        start = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        res = start.clone()
        calls = {"table residual (triton_gemm)": functools.partial(triton_gemm.gemm, xq, xs, wq, ws, None, res,
                                                                    table_cfg, gate=gate, rows_per_batch=m)}
        calls.update({name: functools.partial(gluon_gemm.gemm, xq, xs, wq, ws, None, torch.bfloat16, cfg,
                                              residual=res, gate=gate) for name, cfg in CONFIGS.items()})
        def from_start(fn, res=res, start=start):  # one call on the starting residual: the updated residual
            res.copy_(start)
            fn()
            return res.clone()

        rows = _checked_rows(calls, from_start, None, "the table's residual kernel", (m, k, n), warmup_ms, rep_ms)
        rows.append(cublas_fp8_row(x, w, warmup_ms, rep_ms))
        print_rows(m, k, n, rows, "table residual")
        results.append({"M": m, "K": k, "N": n, "results": rows})
    return results


def run_glu(shapes=GLU_SHAPES, warmup_ms: int = 10, rep_ms: int = 50) -> list[dict]:
    """The SwiGLU MLP input as a fused block runs it, per shape (M, K, F): the two GEMMs and ``glu_quantize`` (what
    runs without the GLU GEMM) against ``glu_gemm`` + ``quantize_rows`` (Hopper's Gluon row), both through the
    replayed eager functions; ms of the pair and of each part, and the int8 codes' agreement (h is rounded to bf16
    before its quantization in the GLU form: a code may differ by one). Then FLUX.2's single-block linear1 three
    ways (``_split_row``)."""
    return ([_glu_row(m, k, f, warmup_ms, rep_ms) for m, k, f in shapes]
            + [_split_row(m, k, f, warmup_ms, rep_ms) for m, k, f in SPLIT_SHAPES])


def _split_row(m: int, k: int, f: int, warmup_ms: int, rep_ms: int) -> dict:
    """A FLUX.2 single block's linear1 [q/k/v (3k) | gate | up] and the quantization of [attention | h] three ways:
    one GEMM and ``glu_quantize`` (the two-GEMM form's), q/k/v and the SwiGLU GEMM as two launches, and
    ``split_glu_gemm`` (one launch), each with its ``glu_quantize``; ms of each whole."""
    from ..kernels import fused
    from . import common
    from .sweep_gemm import _operands

    head = 3 * k
    _, _, xq, xs, wq, ws, _, _ = _operands(m, k, head + 2 * f)
    xs = xs.reshape(-1)
    attn = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    rows = [slice(0, head), slice(head, head + f), slice(head + f, head + 2 * f)]
    parts = [(wq[r], ws[r], None) for r in rows]

    def one_gemm():
        y = fused.int8_gemm(xq, xs, wq, ws, None, torch.bfloat16)
        return y[:, :head], fused.glu_quantize(attn, y[:, head:])

    def two_launches():
        y = fused.int8_gemm(xq, xs, *parts[0][:2], None, torch.bfloat16)
        return y, fused.glu_quantize(attn, fused.glu_gemm(xq, xs, parts[1], parts[2], torch.bfloat16),
                                     activation="identity")

    def one_launch():
        y, h = fused.split_glu_gemm(xq, xs, wq, ws, None, head, torch.bfloat16)
        return y, fused.glu_quantize(attn, h, activation="identity")

    row = {"M": m, "K": k, "head": head, "F": f, "rule": fused.split_glu_rule(xq, wq, head)}
    for name, fn in (("one GEMM + glu_quantize", one_gemm), ("q/k/v GEMM + glu_gemm + glu_quantize", two_launches),
                     ("split_glu_gemm + glu_quantize", one_launch)):
        row[name] = common.bench_ms(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
    print(f"single block M={m} K={k} head={head} F={f} rule={row['rule']}: "
          + ", ".join(f"{name} {row[name]:.4f} ms" for name in list(row)[5:]), flush=True)
    return row


def _glu_row(m: int, k: int, f: int, warmup_ms: int, rep_ms: int) -> dict:
    from ..kernels import fused, quantize_rows, reference_fused
    from . import common
    from .sweep_gemm import _operands

    _, _, xq, xs, wq, ws, _, _ = _operands(m, k, 2 * f)
    xs = xs.reshape(-1)
    gate, up = (wq[:f], ws[:f], None), (wq[f:], ws[f:], None)
    row = {"M": m, "K": k, "F": f, "rule": fused.glu_kernel_rule(xq, gate[0], up[0])}

    def two_gemms():
        g = fused.int8_gemm(xq, xs, *gate[:2], None, torch.bfloat16)
        u = fused.int8_gemm(xq, xs, *up[:2], None, torch.bfloat16)
        return fused.glu_quantize(None, (g, u))

    def glu():
        return fused.glu_gemm(xq, xs, gate, up, torch.bfloat16)

    def one_gemm():
        hq, hs = quantize_rows(glu())
        return hq, hs.reshape(-1)

    h, twin = glu(), reference_fused.glu_gemm(xq, xs, gate, up, torch.bfloat16)
    torch.cuda.synchronize()
    differ = h.float() != twin.float()
    rel = (h.float() - twin.float()).abs() / twin.float().abs().clamp_min(1e-30)
    row["h_vs_twin"] = {"differing": int(differ.sum()), "max_rel": float(rel[differ].max()) if differ.any() else 0.0}
    (q0, s0), (q1, s1) = two_gemms(), one_gemm()
    codes = (q0.int() - q1.int()).abs()
    row["codes_vs_two_gemms"] = {"max_abs": int(codes.max()), "differing": int((codes > 0).sum()),
                                 "sqnr_db": common.sqnr_db(q0.float() * s0[:, None], q1.float() * s1[:, None])}
    for name, fn in (("two GEMMs + glu_quantize", two_gemms), ("glu_gemm + quantize_rows", one_gemm),
                     ("glu_gemm", glu), ("glu_quantize", lambda: fused.glu_quantize(None, (h, h))),
                     ("quantize_rows of h", lambda: quantize_rows(h))):
        row[name] = common.bench_ms(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
    print(f"M={m} K={k} F={f} rule={row['rule']}: two GEMMs + glu_quantize {row['two GEMMs + glu_quantize']:.4f} ms, "
          f"glu_gemm + quantize_rows {row['glu_gemm + quantize_rows']:.4f} ms "
          f"(x{row['two GEMMs + glu_quantize'] / row['glu_gemm + quantize_rows']:.3f}); glu_gemm "
          f"{row['glu_gemm']:.4f}, quantize_rows {row['quantize_rows of h']:.4f}; h vs twin {row['h_vs_twin']}; "
          f"codes {row['codes_vs_two_gemms']}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compile every config for sm_90 (no GPU needed)")
    parser.add_argument("--out", default="bench_gluon_gemm.json")
    parser.add_argument("--glu", action="store_true", help="only the SwiGLU GEMM against two GEMMs + glu_quantize")
    args = parser.parse_args(argv)
    if args.check:
        rows = check()
        for r in rows:
            mma = ",".join(w.replace("wgmma.mma_async.sync.aligned.", "") for w in r.get("wgmma", []))
            print(f"{r['name']:<28} {mma} wait={r.get('wgmma_waits')} regs={r.get('regs')} local={r.get('local')} "
                  f"stack={r.get('stack')} smem={r.get('shared_bytes')} "
                  f"{'OK' if not r['problems'] else '; '.join(r['problems'])}")
        return 1 if any(r["problems"] for r in rows) else 0
    if not torch.cuda.is_available():
        print("bench_gluon_gemm needs a CUDA GPU (or --check)", file=sys.stderr)
        return 2
    from . import common

    if args.glu:
        common.write_json(args.out, {"env": common.environment(), "glu": run_glu()})
        return 0
    common.write_json(args.out, {"env": common.environment(), "shapes": run(), "residual": run_residual()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
