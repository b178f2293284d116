"""One FLUX.2 klein linear layer, every way it can run on this GPU.

    python -m int8_w8a8.bench.bench_linear [--out results.json] [--quick]

Methods (all take bf16 x [M, K] and produce bf16 y [M, N]; INT8/FP8 include quantizing x per token):
  bf16         F.linear
  fp8_rowwise  per-token e4m3 activation quantization (eager torch) + torch._scaled_mm, per-row W
  int_mm       per-token int8 quantization (eager torch) + torch._int_mm + eager dequantization
  kitchen      comfy_kitchen.int8_linear (its best backend here), per-row W
  pack_row     int8_w8a8.kernels.int8_linear, per-row W
  pack_tensor  int8_w8a8.kernels.int8_linear, per-tensor W
  pack_gemm    the pack's GEMM + epilogue alone (x already quantized), per-row W
  fp8_gemm     torch._scaled_mm alone (x already quantized)
Reports median ms, TOPS (2MNK/t), speed-up over bf16, and relative error vs the bf16 output on
Gaussian data (x ~ N(0, 1), w ~ N(0, 0.02)).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels import dispatch, triton_gemm, triton_quant
from . import common

FP8_MAX = 448.0
# also timed as CUDA-graph replays (device time alone, no host overhead)
GRAPH_TIMED = ("bf16", "kitchen", "pack_row", "pack_tensor", "fp8_rowwise", "quant")


def _fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization in eager torch: (fp8 [R, C], float32 scale [R, 1])."""
    amax = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _int8_rows_eager(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    amax = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / 127.0
    return (t.float() / scale).round().clamp(-128, 127).to(torch.int8), scale


def _kitchen():
    try:
        import comfy_kitchen

        return comfy_kitchen
    except ImportError:
        return None


def bench_shape(name: str, m: int, k: int, n: int, quick: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(m * 7 + k * 13 + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(n, k, device="cuda", dtype=torch.float32, generator=gen) * 0.02).to(torch.bfloat16)
    q_row, s_row = kernels.quantize_weight(w)
    q_ten, s_ten = kernels.quantize_weight(w, per_row=False)
    w8, w8s = _fp8_rows(w)
    methods: dict[str, callable] = {
        "bf16": lambda: F.linear(x, w),
        "fp8_rowwise": lambda: _fp8_linear(x, w8, w8s),
        "int_mm": lambda: _int_mm_linear(x, q_row, s_row) if m > 16 else None,
        "pack_row": lambda: kernels.int8_linear(x, q_row, s_row),
        "pack_tensor": lambda: kernels.int8_linear(x, q_ten, s_ten),
    }
    ck = _kitchen()
    kitchen_backend = None
    if ck is not None:
        methods["kitchen"] = lambda: ck.int8_linear(x, q_row, s_row, None, torch.bfloat16)
        try:
            kitchen_backend = ck.registry.get_capable_backend(
                "int8_linear", {"x": x, "weight": q_row, "weight_scale": s_row, "bias": None,
                                "out_dtype": torch.bfloat16})
        except Exception as exc:
            kitchen_backend = f"unknown ({type(exc).__name__})"
    # GEMM-only timings: x quantized once outside the timed region
    xq, xs = triton_quant.quantize_rows(x)
    xs = xs.reshape(-1)
    backend = dispatch.choose_backend(x.device)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    tma_ok = backend.table.tma and triton_gemm.tma_compatible(xq, q_row, out)
    cfg = backend.table.pick(m, tma_ok)
    methods["pack_gemm"] = lambda: triton_gemm.gemm(xq, xs, q_row, s_row.reshape(-1), None, out, cfg)
    methods["quant"] = lambda: triton_quant.quantize_rows(x)
    x8, x8s = _fp8_rows(x)
    methods["fp8_gemm"] = lambda: torch._scaled_mm(x8, w8.t(), scale_a=x8s, scale_b=w8s.t(), out_dtype=torch.bfloat16)

    ref = F.linear(x, w)
    row = {"name": name, "M": m, "K": k, "N": n, "config": cfg.__dict__, "kitchen_backend": kitchen_backend,
           "ms": {}, "ms_graph": {}, "tops": {}, "rel_err": {}}
    for label, fn in methods.items():
        try:
            y = fn()
            if y is None:
                continue
            torch.cuda.synchronize()
            ms = common.bench_ms(fn, warmup_ms=10 if quick else 25, rep_ms=40 if quick else 100)
        except Exception as exc:  # a method that does not run here is reported, not fatal
            row["ms"][label] = None
            row.setdefault("errors", {})[label] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        row["ms"][label] = ms
        if label in GRAPH_TIMED:
            try:
                row["ms_graph"][label] = common.bench_graph_ms(fn)
            except Exception as exc:  # not capturable (e.g. host syncs inside)
                row.setdefault("errors", {})[f"{label}_graph"] = f"{type(exc).__name__}: {exc}"[:300]
        if label == "quant":
            q_ms = row["ms_graph"].get("quant", ms)
            row["quant_gbps"] = m * k * (x.element_size() + 1) / (q_ms * 1e-3) / 1e9
            continue
        row["tops"][label] = common.tops(m, k, n, ms)
        if label not in ("pack_gemm",):
            row["rel_err"][label] = common.rel_err(y if not isinstance(y, tuple) else y[0], ref)
    row["rel_err"]["pack_gemm"] = common.rel_err(out, ref)
    base = row["ms"]["bf16"]
    row["speedup_vs_bf16"] = {lab: base / v for lab, v in row["ms"].items() if v and lab != "quant"}
    gbase = row["ms_graph"].get("bf16")
    if gbase:
        row["speedup_vs_bf16_graph"] = {lab: gbase / v for lab, v in row["ms_graph"].items() if v}
    return row


def _fp8_linear(x, w8, w8s):
    x8, x8s = _fp8_rows(x)
    return torch._scaled_mm(x8, w8.t(), scale_a=x8s, scale_b=w8s.t(), out_dtype=torch.bfloat16)


def _int_mm_linear(x, q, s):
    xq, xs = _int8_rows_eager(x)
    return (torch._int_mm(xq, q.t()).float() * xs * s.reshape(1, -1)).to(torch.bfloat16)


def format_table(rows: list[dict]) -> str:
    cols = ["bf16", "fp8_rowwise", "int_mm", "kitchen", "pack_row", "pack_tensor", "pack_gemm", "fp8_gemm"]
    head = f"{'layer':<30} {'M':>5} {'K':>6} {'N':>6} | " + " | ".join(f"{c:>17}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for c in cols:
            ms = r["ms"].get(c)
            cells.append(f"{ms:7.3f} ({r['tops'][c]:5.0f})" if ms else f"{'-':>17}")
        lines.append(f"{r['name']:<30} {r['M']:>5} {r['K']:>6} {r['N']:>6} | " + " | ".join(f"{c:>17}" for c in cells))
    lines.append("")
    lines.append(f"{'layer':<30} " + " ".join(f"{c + ' x':>13}" for c in cols[1:6])
                 + "  row/kitchen  quant GB/s  graph: bf16 ms  row ms  row x  kitchen x   err: row  kitchen   fp8")
    for r in rows:
        sp, e, g = r["speedup_vs_bf16"], r["rel_err"], r["ms_graph"]
        gx = r.get("speedup_vs_bf16_graph", {})
        vs_ck = r["ms"]["kitchen"] / r["ms"]["pack_row"] if r["ms"].get("kitchen") else float("nan")
        lines.append(f"{r['name']:<30} " + " ".join(f"{sp.get(c, 0):13.2f}" for c in cols[1:6])
                     + f"  {vs_ck:11.2f}  {r.get('quant_gbps', 0):10.0f}  {g.get('bf16', 0):14.4f}"
                     f"  {g.get('pack_row', 0):6.4f}  {gx.get('pack_row', 0):5.2f}  {gx.get('kitchen', 0):9.2f}"
                     f"   {e.get('pack_row', float('nan')):.4f}   {e.get('kitchen', float('nan')):.4f}"
                     f"  {e.get('fp8_rowwise', float('nan')):.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_linear.json", help="where to write the JSON results")
    parser.add_argument("--quick", action="store_true", help="shorter timing runs")
    parser.add_argument("--only", default="", help="substring filter on the layer names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if not torch.cuda.is_available():
        print("bench_linear needs a CUDA GPU", file=sys.stderr)
        return 2
    ck = _kitchen()
    if ck is not None:
        with contextlib.suppress(Exception):
            ck.registry.disable("triton")  # ComfyUI keeps kitchen's Triton backend off by default too
    rows = [bench_shape(*s, quick=args.quick) for s in common.all_shapes() if args.only in s[0]]
    table = format_table(rows)
    print(table)
    common.write_json(args.out, {"env": common.environment(), "rows": rows, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
