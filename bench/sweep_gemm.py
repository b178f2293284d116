"""Sweep GEMM tile configurations per M bucket on this GPU (GEMM + epilogue only, bf16 out).

    python -m int8_w8a8.bench.sweep_gemm [--out sweep.json] [--bucket large|m1024|m256|m64|small|all|ws|tail|lora]

The winners go into ``kernels/configs.py`` by hand, one per (GPU generation, M bucket): the pack
never autotunes at run time. Each candidate is checked against the twin before it is timed.

``--bucket ws`` (not part of "all"): the warp-specialized Hopper configs (``configs.HOPPER_WS_VARIANTS``, the
table's large-M row among them) against the plain table's large-M config, 128x256x128 at 8 warps without
specialization, and cuBLAS FP8 (``torch._scaled_mm``, per-tensor scales) at the Z-Image and FLUX.2 klein 9B GEMM
shapes; every INT8 result must be bit-identical to the plain config's (and the twin's) before it is timed.
``--bucket ws-residual`` (not part of "all"): the same with the gated residual epilogue (``WS_RESIDUAL_SHAPES``).
``--bucket lora`` (not part of "all"): 64-wide tiles for a rank-64 LoRA's down projection (N = 64) against the table's.
``--bucket wide`` (not part of "all"): Hopper's large-M rows (Gluon, warp-specialized, plain) at wide outputs
(``WIDE_SHAPES``), bit for bit against the Gluon row.
``--bucket tail`` (not part of "all"): the table's large-M config without and with ``GemmConfig.split_tail`` (the
table's parts, and parts of >= 16 and >= 1 K tiles) at the shapes whose last wave of tiles is at most half full
(``TAIL_SHAPES``), checked the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import sys

import torch

from ..kernels import configs, reference, triton_gemm, triton_quant
from ..kernels.configs import GemmConfig
from . import common

# Shapes per M bucket of kernels/configs.py (bucket upper bounds 16, 64, 256, 1024, unbounded).
BUCKETS: dict[str, list[tuple[int, int, int]]] = {
    "large": [(4608, 4096, 36864), (4608, 16384, 4096), (4096, 4096, 4096), (4096, 12288, 4096),
              (4096, 4096, 12288)],
    "m1024": [(512, 4096, 24576), (512, 16384, 4096), (512, 4096, 12288), (1024, 3072, 27648)],
    "m256": [(256, 4096, 12288), (128, 4096, 24576), (200, 16384, 4096)],
    "m64": [(64, 4096, 24576), (33, 4096, 12288), (64, 16384, 4096)],
    "small": [(16, 4096, 24576), (8, 16384, 4096), (5, 3072, 9216), (1, 4096, 24576)],
}


def _persistent_grid() -> list[GemmConfig]:
    out = []
    for bk, st, cps, w in itertools.product((64, 128), (3, 4, 5), (1, 2), (4, 8)):
        if bk == 128 and st == 5:
            continue
        out.append(GemmConfig("tma", 128, 128, bk, group_m=8, num_warps=w, num_stages=st, ctas_per_sm=cps))
    for (bm, bn), g in itertools.product(((128, 256), (256, 128)), (8, 16)):
        out.append(GemmConfig("tma", bm, bn, 128, group_m=g, num_warps=8, num_stages=3))
    out.append(GemmConfig("tma", 128, 128, 64, group_m=16, num_warps=4, num_stages=4, ctas_per_sm=2))
    out.append(GemmConfig("tma", 128, 128, 64, group_m=4, num_warps=4, num_stages=4, ctas_per_sm=2))
    return out


def candidates(bucket: str) -> list[GemmConfig]:
    if bucket in ("large", "m1024"):
        out = _persistent_grid()
        if bucket == "m1024":
            out += [GemmConfig("tma", 64, bn, 128, num_warps=4, num_stages=st, ctas_per_sm=c)
                    for bn, st, c in itertools.product((128, 256), (3, 4), (1, 2))]
        return out
    if bucket == "m256":
        tiles = ((64, 128), (128, 128), (128, 64))
        return [GemmConfig("tma", bm, bn, bk, num_warps=w, num_stages=4, ctas_per_sm=c)
                for (bm, bn), bk, w, c in itertools.product(tiles, (64, 128), (4, 8), (1, 2))
                if not (bm == 64 and w == 8)]
    if bucket == "m64":
        out = [GemmConfig("tma", 64, bn, bk, num_warps=4, num_stages=st, ctas_per_sm=c)
               for bn, bk, st, c in itertools.product((64, 128, 256), (128, 256), (3, 4), (1, 2))]
        out += [GemmConfig("generic", 64, bn, bk, num_warps=4, num_stages=4) for bn in (32, 64) for bk in (128, 256)]
        return out
    out = []
    for bn, bk, st, w in itertools.product((32, 64, 128), (128, 256, 512), (3, 4, 6), (2, 4)):
        if bn * bk * st <= 160 * 1024 and not (bn == 128 and w == 2):
            out.append(GemmConfig("generic", 16, bn, bk, group_m=1, num_warps=w, num_stages=st))
    return out


def _one(cfg: GemmConfig, x, xq, xs, wq, ws, out, gate=None):
    """The timed call: GEMM and epilogue on pre-quantized x (with ``gate`` [1, N]: the gated residual epilogue,
    ``out += gate * y`` in place, as a fused block's attention output and down projection run it)."""
    return lambda: triton_gemm.gemm(xq, xs, wq, ws, None, out, cfg, gate=gate, rows_per_batch=out.shape[0],
                                    ws_rules=False)


def _operands(m: int, k: int, n: int):
    """Random bf16 x [M, K] and w [N, K] quantized per row: (x, w, xq, xs [M], wq, ws [N], the torch twin's
    output in bf16 (what every config must match bit for bit), an output buffer [M, N] bf16)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    xq, xs = triton_quant.quantize_rows(x)
    xs = xs.reshape(-1)
    wq, ws = triton_quant.quantize_weight(w)
    ws = ws.reshape(-1)
    ref = reference.epilogue(reference.int8_matmul(xq, wq), xs, ws, None, torch.bfloat16)
    return x, w, xq, xs, wq, ws, ref, torch.empty(m, n, device="cuda", dtype=torch.bfloat16)


def run_bucket(bucket: str) -> list[dict]:
    results = []
    for m, k, n in BUCKETS[bucket]:
        x, _, xq, xs, wq, ws, ref, out = _operands(m, k, n)
        rows = []
        for cfg in candidates(bucket):
            fn = _one(cfg, x, xq, xs, wq, ws, out)
            try:
                out.fill_(float("nan"))
                fn()
                torch.cuda.synchronize()
                if not torch.equal(out, ref):
                    rows.append({"config": cfg.__dict__, "error": "wrong result"})
                    continue
                ms = common.bench_ms(fn, warmup_ms=10, rep_ms=50)
                rows.append({"config": cfg.__dict__, "ms": ms, "tops": common.tops(m, k, n, ms)})
            except Exception as exc:  # out of shared memory etc.: record and go on
                rows.append({"config": cfg.__dict__, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
        best = ok[0] if ok else None
        print(f"[{bucket}] M={m} K={k} N={n}: {len(ok)}/{len(rows)} ran;"
              + (f" best {best['tops']:.0f} TOPS {best['ms']:.4f} ms {best['config']}" if best else " none ran"))
        for r in ok[1:4]:
            print(f"      next {r['tops']:.0f} TOPS {r['config']}")
        results.append({"M": m, "K": k, "N": n, "results": rows})
    return results


# Z-Image (dim 3840: qkv, out, w1/w3 pair, w2) and FLUX.2 klein 9B (linear1, linear2, img qkv) at 1024x1024
WS_SHAPES = [(4608, 3840, 11520), (4608, 3840, 3840), (4608, 3840, 10240), (4608, 10240, 3840),
             (4608, 4096, 36864), (4608, 16384, 4096), (4096, 4096, 12288)]


def ws_candidates() -> list[tuple[str, GemmConfig]]:
    """(name, config): the plain table's large-M config first (the reference for bit identity; what LoRA terms run),
    then the others; ``HOPPER_TABLE``'s large-M row is one of the warp-specialized ones."""
    table = configs.HOPPER_PLAIN_TABLE.rows[-1][1]
    out = [("plain 128x128x64 s4 2/SM", table),
           ("tma 128x256x128 w8 s3", GemmConfig("tma", 128, 256, 128, num_warps=8, num_stages=3))]
    out += [(f"ws {c.block_m}x{c.block_n}x{c.block_k} s{c.num_stages}", c) for c in configs.HOPPER_WS_VARIANTS]
    return out


# Shapes whose last wave of 128 x 128 tiles on 264 programs is at most half full (GemmConfig.split_tail): Z-Image's
# attention output and w2 (1080 tiles: 4 waves + 24), FLUX.2 klein 9B's and Chroma's single-block linear2 (1152: 4 +
# 96; 864: 3 + 72), klein 4B's linear2; Z-Image's qkv (3240: 12 + 72) and a full-wave shape as controls; and the
# down projections of a rank-64 dynamic LoRA (N = 64: 36 tiles, all in one wave) at Z-Image's and Chroma's K
TAIL_SHAPES = [(4608, 3840, 3840), (4608, 10240, 3840), (4608, 16384, 4096), (4608, 15360, 3072),
               (4608, 12288, 3072), (4608, 3840, 11520), (4608, 4096, 36864),
               (4608, 3840, 64), (4608, 10240, 64), (4608, 3072, 64), (4608, 12288, 64), (4608, 15360, 64),
               (512, 3072, 64), (512, 12288, 64)]


def tail_candidates() -> list[tuple[str, GemmConfig]]:
    """(name, config): the table's large-M config without the split first (the reference), then the table's (parts
    of >= ``split_tail`` K tiles), parts of >= 16 K tiles, and the split into as many parts as there are idle
    programs."""
    table = configs.HOPPER_PLAIN_TABLE.rows[-1][1]  # the split tail is the plain kernel's
    return [("128x128x64 s4 2/SM, no split", dataclasses.replace(table, split_tail=0)),
            (f"table (split_tail={table.split_tail})", table),
            ("128x128x64, split_tail=16", dataclasses.replace(table, split_tail=16)),
            ("128x128x64, split_tail=1", dataclasses.replace(table, split_tail=1))]


# The down projection of a rank-64 dynamic LoRA (``kernels.fused.lora_down``: the INT8 GEMM with N = 64) at the
# text and image rows of FLUX-type blocks (512, 4096-4608) and Wan's 14040, K of the layers' inputs: the table's
# 128 x 128 tiles leave 36-110 programs for 132 SMs and measured 36-120 us at M = 4608 against cuBLAS FP8's 11-30
# (bench/NOTES.md item 34)
LORA_SHAPES = [(m, k, 64) for m in (512, 4608, 14040) for k in (3072, 3840, 10240, 15360)]


def lora_candidates() -> list[tuple[str, GemmConfig]]:
    """(name, config): the table's large-M config (the reference), then tiles 64 wide, TMA and pointer loads."""
    table = dataclasses.replace(configs.HOPPER_PLAIN_TABLE.rows[-1][1], split_tail=0)  # N = 64: the plain table
    return [("table 128x128x64 s4 2/SM", table),
            ("tma 128x64x128 s4 2/SM", GemmConfig("tma", 128, 64, 128, num_stages=4, ctas_per_sm=2)),
            ("tma 64x64x128 s4 2/SM", GemmConfig("tma", 64, 64, 128, num_stages=4, ctas_per_sm=2)),
            ("tma 64x64x256 s3 2/SM", GemmConfig("tma", 64, 64, 256, num_stages=3, ctas_per_sm=2)),
            ("generic 64x64x128 s3", GemmConfig("generic", 64, 64, 128, num_warps=4, num_stages=3)),
            ("generic 32x64x256 s3", GemmConfig("generic", 32, 64, 256, num_warps=4, num_stages=3))]


def _difference(out: torch.Tensor, expect: torch.Tensor, again) -> dict:
    """How a candidate's output ``out`` differs from ``expect``: how many values, how far apart at most, in how
    many 128 x 128 blocks of the output, and whether ``again()`` (the candidate run once more from the same start,
    its output returned) gives the same bits (a race or an unordered sum would not)."""
    diff = out != expect
    rows, cols = diff.nonzero(as_tuple=True)
    first = out.clone()
    return {"differing": int(diff.sum()), "max_abs_diff": float((first.float() - expect.float()).abs().max()),
            "tiles": len(set(((rows // 128) * 65536 + cols // 128).tolist())),
            "deterministic": bool(torch.equal(first, again()))}


def _again(fn, out: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """``fn`` run once more from the same start (``start`` for a residual, NaNs otherwise); its output."""
    if start is not None:
        out.copy_(start)
    else:
        out.fill_(float("nan"))
    fn()
    torch.cuda.synchronize()
    return out.clone()


# Wide outputs at large M (bench/NOTES.md item 71): klein 9B's single-block linear1 at 1024x1024 and 2048x2048 (where
# item 60 measured the Gluon row at 0.95x the warp-specialized one), klein 4B's, Chroma's single-block linear1, klein
# 9B's double-block mlp0, Z-Image's w1/w3 pair, Qwen-Image's mlp0 and Wan's FFN up projection
WIDE_SHAPES = [(4608, 4096, 36864), (16896, 4096, 36864), (4608, 3072, 27648), (4608, 3072, 21504),
               (4096, 4096, 24576), (4608, 3840, 20480), (4096, 3072, 12288), (14040, 5120, 13824)]


def wide_candidates() -> list[tuple[str, GemmConfig]]:
    """(name, config): Hopper's large-M row (Gluon: the reference), the warp-specialized row it replaced
    (``HOPPER_TABLE``'s, the row without Gluon) and the plain table's."""
    return [("gluon 128x128x128 s3 w8 r128", configs.HOPPER_GLUON_LARGE),
            ("ws 128x256x64 s4", configs.HOPPER_WS_LARGE),
            ("plain 128x128x64 s4 2/SM", configs.HOPPER_PLAIN_TABLE.rows[-1][1])]


def run_ws() -> list[dict]:
    """Each ``ws_candidates`` config and cuBLAS FP8 at ``WS_SHAPES``: ms, TOPS, and x the table config."""
    return run_variants(WS_SHAPES, ws_candidates())


# The GEMMs with the gated residual epilogue (Z-Image's attention output and w2, klein 9B's single-block linear2 and
# double-block projections): ``triton_ops`` runs the plain table's config with its output tile in halves there
# (``configs.for_residual``); the warp-specialized configs run as given (``ws_rules=False``), to re-check item 47's
# rule (at these shapes they differed from the plain kernel in 0.02-0.04 % of the values, 5-6 stages from call to
# call)
WS_RESIDUAL_SHAPES = [(4608, 3840, 3840), (4608, 10240, 3840), (4608, 16384, 4096), (4096, 4096, 4096),
                      (4096, 12288, 4096)]


def ws_residual_candidates() -> list[tuple[str, GemmConfig]]:
    """(name, config): the plain table's large-M residual config (the reference), the warp-specialized 128 x 256
    ones, and unspecialized tiles with the output in halves that fit sm_90 offline (``check_ptx``, Triton 3.6:
    163,888 / 163,872 / 114,720 / 98,336 bytes, no spills): candidates for a faster residual row."""
    plain = configs.for_residual(configs.HOPPER_PLAIN_TABLE.rows[-1][1])
    return [("plain 128x128x64 s4 2/SM sub", plain),
            *((name, c) for name, c in ws_candidates() if c.warp_spec and c.block_n == 256),
            ("tma 128x256x64 w8 s4 sub", GemmConfig("tma", 128, 256, 64, num_warps=8, num_stages=4,
                                                    epilogue_subtile=True)),
            ("tma 128x256x128 w8 s2 sub", GemmConfig("tma", 128, 256, 128, num_warps=8, num_stages=2,
                                                     epilogue_subtile=True)),
            ("tma 64x256x128 s2 2/SM sub", GemmConfig("tma", 64, 256, 128, num_stages=2, ctas_per_sm=2,
                                                      epilogue_subtile=True)),
            ("tma 128x128x128 s2 2/SM sub", GemmConfig("tma", 128, 128, 128, num_stages=2, ctas_per_sm=2,
                                                       epilogue_subtile=True))]


def run_variants(shapes, candidates: list[tuple[str, GemmConfig]], warmup_ms: int = 10, rep_ms: int = 50,
                 residual: bool = False) -> list[dict]:
    """Each candidate (the first is the reference for bit identity) and cuBLAS FP8 at ``shapes``: ms, TOPS, and x
    the first candidate; a candidate whose output differs from the first's or the torch twin's is not timed.
    ``residual``: the gated residual epilogue (checked against the first candidate from one starting residual;
    timed calls keep adding into it)."""
    results = []
    for m, k, n in shapes:
        x, w, xq, xs, wq, ws, ref, out = _operands(m, k, n)
        gate = (torch.randn(1, n, device="cuda") * 0.01).to(torch.bfloat16) if residual else None
        start = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) if residual else None
        rows, base_out = [], None
        for name, cfg in candidates:
            fn = _one(cfg, x, xq, xs, wq, ws, out, gate)
            try:
                if residual:
                    out.copy_(start)
                else:
                    out.fill_(float("nan"))
                fn()
                torch.cuda.synchronize()
                if base_out is None:
                    base_out = out.clone()
                same = torch.equal(out, base_out) and (residual or torch.equal(out, ref))
                if not same:
                    how = _difference(out, base_out if residual else ref, functools.partial(_again, fn, out, start))
                    rows.append({"name": name, "config": cfg.__dict__, "error": "not bit-identical", **how})
                    print(f"  {name:<28} NOT BIT-IDENTICAL: {how['differing']} of {out.numel()} values, at most "
                          f"{how['max_abs_diff']:.3g} apart, in {how['tiles']} tiles; deterministic "
                          f"{how['deterministic']}", flush=True)
                    continue
                ms = common.bench_ms(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
                rows.append({"name": name, "config": cfg.__dict__, "ms": ms, "tops": common.tops(m, k, n, ms)})
            except Exception as exc:  # out of resources, a compiler failure: record and go on
                rows.append({"name": name, "config": cfg.__dict__, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
        rows.append(cublas_fp8_row(x, w, warmup_ms, rep_ms))
        print_rows(m, k, n, rows, "first")
        results.append({"M": m, "K": k, "N": n, "results": rows})
    return results


def cublas_fp8_row(x: torch.Tensor, w: torch.Tensor, warmup_ms: int, rep_ms: int) -> dict:
    """cuBLAS FP8 (``torch._scaled_mm``, per-tensor scales, bf16 out) on x [M, K] and w [N, K]: a result row."""
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    sa = x.abs().amax().float().clamp(min=1e-12) / fp8_max
    sb = w.abs().amax().float().clamp(min=1e-12) / fp8_max
    x8, w8 = (x.float() / sa).to(torch.float8_e4m3fn), (w.float() / sb).to(torch.float8_e4m3fn)
    ms = common.bench_ms(functools.partial(torch._scaled_mm, x8, w8.t(), scale_a=sa, scale_b=sb,
                                           out_dtype=torch.bfloat16), warmup_ms=warmup_ms, rep_ms=rep_ms)
    return {"name": "cuBLAS fp8 per-tensor", "ms": ms, "tops": common.tops(x.shape[0], x.shape[1], w.shape[0], ms)}


def print_rows(m: int, k: int, n: int, rows: list[dict], base: str) -> None:
    """One shape's rows: ms, TOPS and the speed-up over the first timed row (called ``base``), or the error."""
    first = next((r["ms"] for r in rows if "ms" in r), None)
    print(f"M={m} K={k} N={n}", flush=True)
    for r in rows:
        if "ms" in r:
            print(f"  {r['name']:<30} {r['ms']:8.4f} ms {r['tops']:6.0f} TOPS  x{first / r['ms']:.3f} vs {base}",
                  flush=True)
        else:
            print(f"  {r['name']:<30} {r['error']} {r.get('differing', '')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="sweep_gemm.json")
    parser.add_argument("--bucket", default="all",
                        choices=["all", *BUCKETS, "ws", "ws-residual", "tail", "lora", "wide"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_gemm needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.bucket == "ws":
        common.write_json(args.out, {"env": common.environment(), "ws": run_ws()})
        return 0
    if args.bucket == "ws-residual":
        common.write_json(args.out, {"env": common.environment(), "ws_residual": run_variants(
            WS_RESIDUAL_SHAPES, ws_residual_candidates(), residual=True)})
        return 0
    if args.bucket == "tail":
        common.write_json(args.out, {"env": common.environment(), "tail": run_variants(TAIL_SHAPES, tail_candidates())})
        return 0
    if args.bucket == "lora":  # kernels of 10-120 us: longer warm-up (the clock ramps up from idle) and repetitions
        common.write_json(args.out, {"env": common.environment(),
                                     "lora": run_variants(LORA_SHAPES, lora_candidates(), warmup_ms=100, rep_ms=200)})
        return 0
    if args.bucket == "wide":  # long runs at the power cap's clocks, as in a step
        common.write_json(args.out, {"env": common.environment(),
                                     "wide": run_variants(WIDE_SHAPES, wide_candidates(), warmup_ms=100, rep_ms=200)})
        return 0
    buckets = list(BUCKETS) if args.bucket == "all" else [args.bucket]
    payload = {"env": common.environment(), "buckets": {b: run_bucket(b) for b in buckets}}
    common.write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
