"""SDPA on the q/k/v layouts the fused blocks hand it: which backend kernel runs and how long it takes.

    python -m int8_w8a8.bench.sdpa_layouts [--out results.json]      (GPU)

The fused blocks write q and k (and v) into ``[B, S, H, D]`` buffers seen as ``[B, H, S, D]`` ("buffers"). Z-Image's
block instead normalizes q and k in place inside its packed qkv projection and leaves v there, so SDPA gets the
column thirds of one ``[B, S, 3 * H * D]`` tensor ("packed", cuDNN's packed-QKV layout); Wan's gives v as its own
projection's view ("v-view": the buffers' strides). For each layout and shape: the backend kernel's name (from
the profiler: a fallback from cuDNN to another backend shows here), the time (median of ROUNDS ``common.bench_ms``
runs, the layouts timed in turns) and whether the output equals the buffers' bit for bit. B = 1, bf16 Gaussian
inputs. H200 (2026-12-02, ``results/h200-sdpa-layouts-session6.txt``): cuDNN for every layout, equal outputs, times
within 1 %.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from . import common

SHAPES = (("Z-Image", 30, 4608), ("FLUX.2 klein 9B", 32, 4608), ("Wan 14B 832x480x33", 40, 14040))  # (H, S)
HEAD_DIM = 128
ROUNDS = 7


def layouts(heads: int, seq: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The same q, k, v values in each layout, ``[B, H, S, D]`` views."""
    shape = (1, seq, heads, HEAD_DIM)
    packed = torch.randn(1, seq, 3 * heads * HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    thirds = [p.view(shape).transpose(1, 2) for p in packed.split(heads * HEAD_DIM, dim=-1)]
    buffers = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in thirds]  # [B, S, H, D] buffers
    v_own = thirds[2].transpose(1, 2).contiguous().transpose(1, 2)
    return {"buffers": tuple(buffers), "packed": tuple(thirds), "v-view": (*buffers[:2], v_own)}


def kernel_names(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name[:90] for e in prof.events() if e.device_type.name == "CUDA" and e.name.lower() != "memset"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rows = []
    for name, heads, seq in SHAPES:
        runs, outs = {}, {}
        for layout, (q, k, v) in layouts(heads, seq).items():
            runs[layout] = lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v)
            outs[layout] = runs[layout]()
        # layouts timed in turns, ROUNDS times: the board's clock drifts more between runs than layouts differ
        times = {layout: [] for layout in runs}
        for _ in range(ROUNDS):
            for layout, run in runs.items():
                times[layout].append(common.bench_ms(run))
        for layout, run in runs.items():
            out = outs[layout]
            row = {"model": name, "heads": heads, "seq": seq, "layout": layout, "ms": common.median(times[layout]),
                   "runs_ms": times[layout], "kernels": kernel_names(run),
                   "equal_to_buffers": bool(torch.equal(out, outs["buffers"])), "out_strides": list(out.stride())}
            rows.append(row)
            print(f"{name:20s} H={heads} S={seq:5d} {layout:8s} {row['ms']:.3f} ms (median of {ROUNDS}: "
                  f"{' '.join(f'{t:.3f}' for t in times[layout])})  equal {row['equal_to_buffers']}  out strides "
                  f"{row['out_strides']}  {row['kernels']}", flush=True)
    if args.out:
        common.write_json(args.out, {"env": common.environment(), "rows": rows})


if __name__ == "__main__":
    main()
