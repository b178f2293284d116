"""Sustained 8-bit GEMM throughput with the GPU's clocks and power read alongside (GPU machine).

    python -m int8_w8a8.bench.sustained_gemm [--seconds 3] [--out sustained.json]

Short ``do_bench`` runs measure a GPU that is still at its boost clock; a diffusion step keeps the tensor
cores busy for tens of milliseconds per layer and hundreds of milliseconds per step. Here each GEMM of
the 9B step's largest shapes runs back to back for ``--seconds`` while ``nvidia-smi`` samples the SM
clock, the board power and the active clock-event (throttle) reasons every 50 ms. Methods, all on the
same operands: the pack's INT8 GEMM (quantized activations in, bf16 out, dequantization in the
epilogue), cuBLAS FP8 (``torch._scaled_mm``, row-wise scales), cuBLAS INT8 (``torch._int_mm``, int32
out) and cuBLAS BF16. The table gives TOPS, the median clock and power while it ran, and TOPS as a
fraction of the dense peak at that clock (1979 TOPS at 1980 MHz on an H200), which separates "the
kernel leaves tensor-core cycles idle" from "the board lowered the clock".
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .. import kernels
from ..kernels import configs, dispatch, triton_gemm, triton_quant
from . import common

# --shapes: the FLUX.2 klein 9B step's largest GEMMs, or Z-Image Turbo's main-layer GEMMs at 1024x1024 (M = 4096
# image + 512 caption tokens; qkv, attention out, w1 (w3 the same), w2), where the compiled step is GPU-bound and on
# the H100 the pack's GEMMs took 0.272 ms a call against cuBLAS FP8's ~0.23 (bench/NOTES.md item 88)
SHAPE_SETS = {
    "9b": (("9B single.linear1", 4608, 4096, 36864), ("9B single.linear2", 4608, 16384, 4096),
           ("9B img.mlp0", 4096, 4096, 24576)),
    "zimage": (("Z-Image qkv", 4608, 3840, 11520), ("Z-Image out", 4608, 3840, 3840),
               ("Z-Image w1", 4608, 3840, 10240), ("Z-Image w2", 4608, 10240, 3840)),
    # Wan 2.1/2.2 14B at 832x480x33 (M = 9 x 30 x 52 = 14040 video tokens): self-attention q/k/v/o and the cross
    # attention's q/o (5120 -> 5120), the FFN's up (5120 -> 13824) and down projections; on the H100 the pack's
    # GEMMs took 302 ms of the eager step against cuBLAS FP8's 244 (H200: 265 against 235; bench/NOTES.md item 92)
    "wan": (("Wan q/k/v/o", 14040, 5120, 5120), ("Wan ffn up", 14040, 5120, 13824),
            ("Wan ffn down", 14040, 13824, 5120)),
}
PEAK_TOPS, PEAK_MHZ = 1979.0, 1980.0  # H200 dense INT8/FP8 peak at its maximum boost clock (datasheet)
# Tile configs tried besides the table's: at the power cap, bigger tiles move fewer operand bytes from L2 and
# shared memory per multiply-add (12 KB per 1M MACs at 128x256 vs 16 KB at 128x128), which may buy clock.
EXTRA_CONFIGS = {
    "128x256x128 w8 s3": configs.GemmConfig("tma", 128, 256, 128, group_m=8, num_warps=8, num_stages=3),
    "ws 128x256x64 s4 (HOPPER_TABLE)": configs.HOPPER_WS_LARGE,
    # the 128-wide Gluon row (the table's up to 8192 rows) and its forms, and the 256-wide Gluon tiles (one program
    # an SM: the int32 accumulator alone takes 128 registers a thread), which read 25 % fewer operand bytes per
    # multiply-add; session 31 also timed 256x128x128 s4 (TMA, subtiled epilogue), 128x256x64 s4 (TMA), Gluon
    # 128x128x128 s4 r128 and 128x256x128 s2, none faster than the 256-wide Gluon tile at 3 stages (results/
    # h100-sustained-gemm-wan-session31.txt)
    "gluon 128x128x128 s3 r128 (HOPPER_GLUON_LARGE)": configs.HOPPER_GLUON_LARGE,
    "gluon 128x128x128 s3 r128 g16": configs.GemmConfig("gluon", 128, 128, 128, group_m=16, num_warps=8,
                                                        num_stages=3, max_registers=128),
    "gluon 128x256x64 s4": configs.GemmConfig("gluon", 128, 256, 64, group_m=8, num_warps=8, num_stages=4),
    "gluon 128x256x128 s3 (HOPPER_GLUON_XL)": configs.HOPPER_GLUON_XL,
}


def sustained(fn, seconds: float) -> tuple[float, dict | None]:
    """ms per call of ``fn`` run back to back for ``seconds`` (after a 1 s warm-up), and the clock/power record."""
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        fn()
    torch.cuda.synchronize()
    sampler = common.PowerSampler()
    time.sleep(0.2)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls = 0
    start.record()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            fn()
        calls += 10
        if calls % 50 == 0:
            torch.cuda.synchronize()  # keep the host within a few calls of the GPU
    stop.record()
    torch.cuda.synchronize()
    samples = sampler.stop()
    return start.elapsed_time(stop) / calls, samples


def run_shape(name: str, m: int, k: int, n: int, seconds: float, extra: bool = True,
              only: tuple[str, ...] = ()) -> list[dict]:
    """Each method at one shape for ``seconds``: ms, TOPS, clock, power. ``extra``: also ``EXTRA_CONFIGS`` (and on
    a Gluon row the gated residual epilogues); ``only``: just the methods whose label holds one of these."""
    gen = torch.Generator(device="cuda").manual_seed(m + k + n)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    xq, xs = triton_quant.quantize_rows(x)
    xs = xs.reshape(-1)
    q, s = kernels.quantize_weight(w)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    backend = dispatch.choose_backend(x.device)
    cfg = backend.table.pick(m, triton_gemm.tma_compatible(xq, q, out))
    fp8 = torch.finfo(torch.float8_e4m3fn).max
    x8s = x.abs().amax(1, keepdim=True).float() / fp8
    w8s = w.abs().amax(1, keepdim=True).float() / fp8
    x8, w8 = (x.float() / x8s).to(torch.float8_e4m3fn), (w.float() / w8s).to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda", dtype=torch.float32)
    methods = {
        "pack int8": lambda: triton_gemm.gemm(xq, xs, q, s.reshape(-1), None, out, cfg),
        **{f"pack {name}": (lambda c=c: triton_gemm.gemm(xq, xs, q, s.reshape(-1), None, out, c))
           for name, c in (EXTRA_CONFIGS.items() if extra else ())},
        "cuBLAS fp8": lambda: torch._scaled_mm(x8, w8.t(), scale_a=x8s, scale_b=w8s.t(), out_dtype=torch.bfloat16),
        # ComfyUI's FP8 fast path (fp8_linear) runs cuBLAS's per-tensor kernel: timed here with scales of 1 on the
        # row-scaled operands (same kernel and bytes; its output is not checked, as no row here checks one)
        "cuBLAS fp8 per-tensor": lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                          out_dtype=torch.bfloat16),
        "cuBLAS int8": lambda: torch._int_mm(xq, q.t()),
        "cuBLAS bf16": lambda: torch.mm(x, w.t()),
    }
    # the gated residual epilogue (Wan's o, cross-attention o and FFN down projections) of the 128- and 256-wide
    # Gluon rows, into a residual updated in place (gate 1/64: the values stay finite; not checked here)
    if extra and cfg.kernel == "gluon":
        res = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=gen)
        gate = torch.full((1, n), 1 / 64, device="cuda", dtype=torch.bfloat16)
        for label, c in (("gluon 128 +residual", configs.HOPPER_GLUON_LARGE),
                         ("gluon XL +residual", configs.HOPPER_GLUON_XL)):
            methods[f"residual {label}"] = (lambda c=c: triton_gemm.gemm(xq, xs, q, s.reshape(-1), None, res, c,
                                                                         gate=gate, rows_per_batch=m))
    methods["pack int8"]()
    want = out.clone()  # every other pack config must write the table's bits (checked once after its timing)
    rows = []
    for label, fn in methods.items():
        if only and not any(word in label for word in only):
            continue
        ms, power = sustained(fn, seconds)
        same = None
        if label.startswith("pack "):
            out.zero_()
            fn()
            same = bool(torch.equal(out, want))
        power = power or {"sm_mhz": None, "watts": None, "clock_event_reasons": "-", "samples": 0}
        tops = common.tops(m, k, n, ms)
        mhz = power["sm_mhz"]
        peak = PEAK_TOPS * (mhz / PEAK_MHZ) if mhz else None
        if label == "cuBLAS bf16" and peak:
            peak /= 2  # dense BF16 runs at half the 8-bit rate
        rows.append({"shape": name, "M": m, "K": k, "N": n, "method": label, "ms": ms, "tops": tops, **power,
                     "of_peak_at_clock": tops / peak if peak else None, "same_bits_as_table": same})
        print(f"{name:18s} {label:34s} {ms:7.3f} ms {tops:6.0f} TOPS  SM {mhz or 0:5.0f} MHz  "
              f"{power['watts'] or 0:5.0f} W  reasons {power['clock_event_reasons']:>6s}  "
              f"{100 * rows[-1]['of_peak_at_clock'] if peak else 0:4.1f}% of peak at that clock"
              f"{'' if same is None else '  bits ' + ('same' if same else 'DIFFER')}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="9b")
    parser.add_argument("--no-extra", action="store_true", help="only the dispatched config and cuBLAS")
    parser.add_argument("--only", nargs="*", default=(), help="only the methods whose label holds one of these")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for shape in SHAPE_SETS[args.shapes]:
        rows += run_shape(*shape, seconds=args.seconds, extra=not args.no_extra, only=tuple(args.only))
    print("clock_event_reasons bits (nvidia-smi): 0x1 idle, 0x4 SW power cap, 0x8 HW slowdown, "
          "0x20 SW thermal, 0x40 HW thermal, 0x80 HW power brake")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": common.environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
