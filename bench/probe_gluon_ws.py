"""The warp-specialized Gluon attention (``kernels/gluon_attention_ws.py``) against the Triton kernel and cuDNN.

    python -m int8_w8a8.bench.probe_gluon_ws [--shapes 40:14040,32:16896,24:4608] [--configs 4dp,4dprs8]

Per shape: the Triton default's output and the Gluon kernel's on the same quantized inputs (max abs difference,
bit identity), then the kernel alone of each (CUDA events, L2 flushed, median) and cuDNN's SDPA. Also an odd shape
(S_q 300, S_kv 1000) against the twin. Needs an SM 9.x GPU.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
import sys

import torch

from ..kernels import attention_configs, gluon_attention_ws, reference_attention, triton_attention
from . import common


def _ms(fn) -> float:
    return common.bench_ms(fn, warmup_ms=50, rep_ms=300)


def parse_config(text: str) -> gluon_attention_ws.GluonWsAttentionConfig:
    """``--configs``' item: stages, then 'd' (defer), 'p' (pingpong), 'rsN' (row_sum_parts N), in that order
    ("4dp": DEFAULT, "4dprs8": it with 8 partial row sums)."""
    m = re.fullmatch(r"(\d)(d?)(p?)(?:rs(\d+))?", text)
    if m is None:
        raise ValueError(f"probe_gluon_ws: config {text!r} is not STAGES[d][p][rsN]")
    return gluon_attention_ws.GluonWsAttentionConfig(stages=int(m.group(1)), defer=bool(m.group(2)),
                                                     pingpong=bool(m.group(3)), row_sum_parts=int(m.group(4) or 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="40:14040,32:16896,24:4608")
    parser.add_argument("--configs", default="3d,4d,4dp",
                        help="stages per config, 'd': defer, 'p': pingpong, 'rsN': row_sum_parts N (4dp: DEFAULT)")
    parser.add_argument("--ncu", action="store_true",
                        help="only launch each config twice at the first shape (for Nsight Compute)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("probe_gluon_ws needs an SM 9.x GPU", file=sys.stderr)
        return 2
    base = attention_configs.DEFAULT
    torch.manual_seed(0)
    cfgs = [parse_config(x) for x in args.configs.split(",")]
    if args.ncu:
        h, s = (int(x) for x in args.shapes.split(",")[0].split(":"))
        q, k, v = (torch.randn(1, h, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qa = triton_attention.quantize(q, k, v, base)
        for cfg in cfgs:
            for _ in range(2):  # the first compiles
                gluon_attention_ws.attention_quantized(qa, 1 / math.sqrt(128), torch.empty_like(q), cfg)
        torch.cuda.synchronize()
        return 0
    # an odd shape against the twin (keys not a multiple of the block, S_q not of 128)
    q, k, v = (torch.randn(2, 3, s, 128, device="cuda", dtype=torch.bfloat16) for s in (300, 1000, 1000))
    qa = triton_attention.quantize(q, k, v, base)
    twin = reference_attention.attention_quantized(qa, 1 / math.sqrt(128), torch.float32)
    for cfg in cfgs:
        got = gluon_attention_ws.attention_quantized(qa, 1 / math.sqrt(128), torch.empty(q.shape, device="cuda"), cfg)
        tri = triton_attention.attention_quantized(qa, 1 / math.sqrt(128), torch.empty(q.shape, device="cuda"), base)
        print(f"odd shape {cfg.name}: rel. err vs twin {common.rel_err(got.cpu(), twin.reshape(got.shape).cpu()):.2e}, "
              f"max |gluon - triton| {float((got - tri).abs().max()):.3g}, identical {torch.equal(got, tri)}",
              flush=True)
    for shape in args.shapes.split(","):
        h, s = (int(x) for x in shape.split(":"))
        q, k, v = (torch.randn(1, h, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        sm = 1 / math.sqrt(128)
        qa = triton_attention.quantize(q, k, v, base)
        out_t, out_g = torch.empty_like(q), torch.empty_like(q)
        t_tri = _ms(functools.partial(triton_attention.attention_quantized, qa, sm, out_t, base))
        t_sdpa = _ms(functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v))
        print(f"H={h} S={s}: cuDNN {t_sdpa:.3f} ms, Triton {base.name} kernel {t_tri:.3f} ms", flush=True)
        for cfg in cfgs:
            try:
                gluon_attention_ws.attention_quantized(qa, sm, out_g, cfg)
                torch.cuda.synchronize()
                same = torch.equal(out_g, out_t)
                diff = float((out_g.float() - out_t.float()).abs().max())
                t = _ms(functools.partial(gluon_attention_ws.attention_quantized, qa, sm, out_g, cfg))
                print(f"H={h} S={s}: {cfg.name} kernel {t:.3f} ms = {t_tri / t:.3f}x Triton, {t_sdpa / t:.3f}x cuDNN; "
                      f"identical to Triton {same} (max diff {diff:.3g})", flush=True)
            except Exception as exc:  # a kernel that fails must not cost the other rows
                print(f"H={h} S={s}: {cfg.name} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
