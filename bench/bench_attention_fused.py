"""The fused blocks' attention segment on the GPU: q/k norm + RoPE and attention, three ways (issue 14's fused item).

    python -m int8_w8a8.bench.bench_attention_fused [--shapes 40:14040:row,32:16896:head] [--out results.json]

Per shape (B = 1, D = 128, H heads, S tokens, one stream of separate q/k/v projections ``[1, S, H * D]`` bf16 with
random values, norm weights, a RoPE table; "row": Wan's RMS over the whole row, "head": per head), what a fused
block runs between its q/k/v GEMMs and its output projection:

* ``bf16``: ``fused.qk_norm_rope`` into [B, S, H, D] buffers, then SDPA's default backend (cuDNN on sm_90: what
  ComfyUI's attention runs on these tensors);
* ``8-bit``: ``fused.qk_norm_rope``, then ``attention_8bit`` (its own quantization pass reads Q, K and V);
* ``8-bit fused``: ``fused.qk_norm_rope_8bit`` (int8 Q and the K/V statistics written by the RoPE kernel), then
  ``attention_8bit_parts`` (K and V quantized in blocks, the attention kernel).

Timed "queued" (``QUEUED_CALLS`` segments back to back between two events, per segment: the host queues ahead as in
a model's step), plus each RoPE kernel alone, and one profile of the fused segment per kernel (device us). Relative
error against float32 attention of the first rows, on the q/k/v the bf16 segment wrote.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from . import common
from .bench_attention import HEAD_DIM, _ms_queued, _reference

SHAPES = ((40, 14040, "row"), (32, 16896, "head"), (24, 4608, "head"))


def _segment_inputs(h: int, s: int, norm: str, dev: str, dt: torch.dtype):
    width = h * HEAD_DIM
    proj = tuple(torch.randn(1, s, width, device=dev, dtype=dt) for _ in range(3))
    n = width if norm == "row" else HEAD_DIM
    w = tuple((torch.rand(n, device=dev) + 0.5).to(dt) for _ in range(2))
    ang = torch.rand(1, 1, s, HEAD_DIM // 2, device=dev) * 6.3
    c, sn = torch.cos(ang), torch.sin(ang)
    pe = torch.stack((torch.stack((c, -sn), -1), torch.stack((sn, c), -1)), -2)
    return proj, w, pe


def bench_shape(h: int, s: int, norm: str, dev: str, dt: torch.dtype) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    from .. import kernels
    from ..kernels import attention, fused, reference_fused

    proj, w, pe = _segment_inputs(h, s, norm, dev, dt)
    bufs = tuple(torch.empty(1, s, h, HEAD_DIM, device=dev, dtype=dt).transpose(1, 2) for _ in range(3))
    if norm == "row":  # Wan's blocks read v where its projection wrote it
        bufs = (*bufs[:2], proj[2].view(1, s, h, HEAD_DIM).transpose(1, 2))
    kw = {"seq_off": 0, "heads": h, "eps_q": 1e-6, "eps_k": 1e-6, "qk_norm": norm}
    sm = 1.0 / math.sqrt(HEAD_DIM)

    def rope():
        fused.qk_norm_rope(proj, *w, pe, *bufs, **kw)

    def rope_8bit():
        parts = attention.parts_buffers(1, h, s, HEAD_DIM, reference_fused.qk_parts(s), torch.device(dev))
        fused.qk_norm_rope_8bit(proj, *w, pe, bufs[1], bufs[2], *parts, part_off=0, **kw)
        return parts

    segments = {
        "bf16": lambda: (rope(), torch.nn.functional.scaled_dot_product_attention(*bufs, scale=sm))[1],
        "8-bit": lambda: (rope(), kernels.attention_8bit(*bufs))[1],
        "8-bit fused": lambda: kernels.attention_8bit_parts(*rope_8bit(), bufs[1], bufs[2]),
    }
    rows = []
    rope()
    ref = _reference(*bufs, sm)
    for name, fn in segments.items():
        out = fn()
        torch.cuda.synchronize()
        err = common.rel_err(out[:, :, :ref.shape[2]].float(), ref)
        ms = _ms_queued(fn)
        rows.append({"H": h, "S": s, "norm": norm, "method": name, "kind": "segment", "ms": round(ms, 4),
                     "rel_err": round(err, 5)})
    for name, fn in (("qk_norm_rope", rope), ("qk_norm_rope_8bit", rope_8bit)):
        rows.append({"H": h, "S": s, "norm": norm, "method": name, "kind": "rope", "ms": round(_ms_queued(fn), 4)})
    base = rows[0]["ms"]
    for r in rows:
        r["x_bf16_segment"] = round(base / r["ms"], 3) if r["kind"] == "segment" else None
        print(f"H={h:<3} S={s:<6} {norm:<4} {r['method']:<18} {r['kind']:<8} {r['ms']:8.3f} ms"
              + (f"  {r['x_bf16_segment']:.3f}x bf16  rel.err {r['rel_err']:.4f}" if r["kind"] == "segment" else ""),
              flush=True)
    # the fused segment per kernel
    fn = segments["8-bit fused"]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    calls = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.time_range.elapsed_us() / calls
    for kname, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        rows.append({"H": h, "S": s, "norm": norm, "method": "8-bit fused", "kind": "profile", "kernel": kname,
                     "us": round(us, 1)})
        print(f"H={h:<3} S={s:<6} {norm:<4} profile  {kname:<28} {us:9.1f} us", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--shapes", default=None, help="H:S:norm triples (norm: row or head), e.g. 40:14040:row")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    shapes = SHAPES
    if args.shapes:
        shapes = tuple((int(a), int(b), c) for a, b, c in (t.split(":") for t in args.shapes.split(",")))
    env = common.environment()
    print(env, flush=True)
    t0 = time.perf_counter()
    rows = []
    for h, s, norm in shapes:
        rows += bench_shape(h, s, norm, args.device, torch.bfloat16)
        torch.cuda.empty_cache()
    if args.out:
        common.write_json(args.out, {"env": env, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
