"""8-bit attention on the GPU against SDPA and the other 8-bit kernels for ComfyUI (issue 14).

    python -m int8_w8a8.bench.bench_attention [--out results.json] [--quick]

B = 1, D = 128, H in (24, 32), S in (4608, 16896) (FLUX.2 klein 9B at 1024x1024 and a 2048x2048 edit), bf16
Gaussian q, k, v. Timed with triton.testing.do_bench (median of ~20 runs, L2 flushed between runs):

* SDPA's default backend (cuDNN on sm_90) and its flash backend;
* comfy-kitchen ``int8_attention`` and ``sageattention.sageattn`` where they import and run;
* each config in ``attention_configs.VARIANTS``: the quantization pass + kernel ("total"), the kernel on
  pre-quantized inputs ("kernel"), and the pass alone ("quant"); the first config's pass also with
  ``split_quant_kv`` (K and V quantized in two launches; checked bit-identical);
* "queued": SDPA's default and each config's pass + kernel called ``QUEUED_CALLS`` times back to back between two
  events, per call: the host queues the next call while the GPU runs this one, as in a model's step, so the
  pack's Python around its launches (allocations, the quantization launches) is hidden as it is there. The
  flushed single-call "total" counts that host time whenever it outlasts the L2 flush before the call
  (bench/NOTES.md item 62: the pass measured 0.97 ms there and 0.65 ms of kernels in a profile).

``--profile-pass``: the default config's quantization pass per kernel (torch.profiler, device time per call and
the bytes each kernel must move, as TB/s), at every shape, in the layout the fused blocks pass ([B, S, H, D] seen
as [B, H, S, D]).

TFLOP/s = 4 * S^2 * D * H / time. Relative error against float32 attention on the first ``REF_ROWS`` query
rows of every head (the error is statistically the same on every row). The kernel compiles on first use;
compile time is reported apart from the timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from dataclasses import asdict

import torch

from . import common

SHAPES = ((24, 4608), (32, 4608), (24, 16896), (32, 16896))  # (H, S); B = 1, D = 128
HEAD_DIM = 128
REF_ROWS = 512
RUNS = 20
QUEUED_CALLS = 10  # back-to-back calls per "queued" timing
ERR_BOUND = 0.02  # issue 14's accuracy bound


def _ms(fn) -> float:
    """Median of ~RUNS timed runs (do_bench sizes its repetitions from a first estimate)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max(1e-3, (time.perf_counter() - start) * 1e3)
    return common.bench_ms(fn, warmup_ms=max(10.0, 3 * est), rep_ms=RUNS * est)


def _ms_queued(fn, calls: int = QUEUED_CALLS, reps: int = 5) -> float:
    """Median over ``reps`` of the time per call of ``calls`` back-to-back calls of ``fn`` (inputs not flushed
    from L2: at these sizes, 100+ MB per tensor, they do not fit the H200's 50 MB anyway)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[reps // 2]


# bytes each quantization kernel must move per element of one [B, H, S, D] tensor (2-byte inputs): the Q rows read
# Q and write int8; the statistics read K and V; the K/V blocks read K and V and write both in 8 bits. The 16-bit P V
# form's pass reads no V: its statistics read K, its K blocks read K and write int8.
PASS_BYTES_PER_ELEMENT = {"_quant_q_kernel": 3, "_kv_stats_kernel": 4, "_kv_finalize_kernel": 0, "_quant_kv_kernel": 6}
PASS_BYTES_NO_V = {**PASS_BYTES_PER_ELEMENT, "_kv_stats_kernel": 2, "_quant_kv_kernel": 3}


def profile_pass(h: int, s: int, cfg, dev: str, dt: torch.dtype, calls: int = 5, lean: bool = True) -> list[dict]:
    """Device time per call of each kernel of ``triton_attention.quantize`` at B = 1, ``h`` heads, ``s`` tokens
    (q, k, v views of [1, S, H, D] buffers, as the fused blocks pass them), with the TB/s its bytes imply;
    ``lean``: the Q and K kernels' lean forms (the default) or their general ones."""
    from torch.profiler import ProfilerActivity, profile

    from ..kernels import triton_attention

    q, k, v = (torch.randn(1, s, h, HEAD_DIM, device=dev, dtype=dt).transpose(1, 2) for _ in range(3))
    for _ in range(3):
        triton_attention.quantize(q, k, v, cfg, lean)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            triton_attention.quantize(q, k, v, cfg, lean)
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.time_range.elapsed_us() / calls
    elements = s * h * HEAD_DIM
    rows = []
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        nbytes = (PASS_BYTES_PER_ELEMENT if cfg.quantizes_v else PASS_BYTES_NO_V).get(name, 0) * elements
        rows.append({"H": h, "S": s, "kernel": name, "lean": lean, "us": round(us, 1),
                     "tb_s": round(nbytes / us / 1e6, 2) if nbytes and us else None})
        rate = f"  {nbytes / us / 1e6:5.2f} TB/s" if nbytes else ""
        print(f"H={h:<3} S={s:<6} pass{'' if lean else ' (general form)'}  {name:<24} {us:8.1f} us{rate}", flush=True)
    print(f"H={h:<3} S={s:<6} pass{'' if lean else ' (general form)'}  total                    "
          f"{sum(totals.values()):8.1f} us", flush=True)
    return rows


def _reference(q, k, v, sm_scale: float) -> torch.Tensor:
    """float32 attention of the first REF_ROWS queries, one head at a time (full-precision fp32 matmuls)."""
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        out = torch.empty(q.shape[0], q.shape[1], REF_ROWS, q.shape[3], device=q.device)
        for h in range(q.shape[1]):
            s = (q[:, h, :REF_ROWS].float() @ k[:, h].float().transpose(-1, -2)) * sm_scale
            out[:, h] = torch.softmax(s, dim=-1) @ v[:, h].float()
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow


def _others(q, k, v, sm_scale: float) -> tuple[dict, dict]:
    """name -> callable for SDPA and the third-party 8-bit kernels that import here (errors recorded)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fns, missing = {}, {}
    fns["sdpa default"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm_scale)

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm_scale)

    fns["sdpa flash"] = flash
    try:
        from comfy_kitchen import sage_attention

        if not sage_attention.is_available(q.device):
            raise RuntimeError("sage_attention.is_available() is False")
        fns["kitchen int8_attention"] = lambda: sage_attention.int8_attention(q, k, v, scale=sm_scale)
    except Exception as exc:
        missing["kitchen int8_attention"] = f"{type(exc).__name__}: {exc}"
    try:
        from sageattention import sageattn

        fns["sageattention"] = lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=sm_scale)
    except Exception as exc:
        missing["sageattention"] = f"{type(exc).__name__}: {exc}"
    return fns, missing


def _bench_shape(h: int, s: int, variants, sm_scale: float, dev: str, dt: torch.dtype,
                 gluon=()) -> tuple[list, dict]:
    """Every method at one (H, S): rows of results and the methods that could not run (with the reason); ``gluon``:
    ``GluonAttentionConfig``s of ``kernels/gluon_attention.py`` to time too."""
    from ..kernels import triton_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, s, HEAD_DIM, device=dev, dtype=dt) for _ in range(3))
    ref = _reference(q, k, v, sm_scale)
    flops = 4.0 * s * s * HEAD_DIM * h
    rows: list[dict] = []
    base: dict[str, float] = {}  # SDPA default's time per timing ("total": flushed single calls, "queued")

    def record(name, fn, out=None, kind="total", cfg=None):
        ms = _ms_queued(fn) if kind == "queued" else _ms(fn)
        y = fn() if out is None else out
        err = common.rel_err(y[:, :, :REF_ROWS].float(), ref) if kind == "total" else None
        timing = "queued" if kind == "queued" else "total"
        if name == "sdpa default":
            base[timing] = ms
        speedup = round(base[timing] / ms, 3) if timing in base and kind != "quant" else None
        rows.append({"H": h, "S": s, "method": name, "kind": kind, "ms": round(ms, 4),
                     "tflops": round(flops / ms / 1e9, 1), "rel_err": None if err is None else round(err, 5),
                     "vs_sdpa_default": speedup, "config": None if cfg is None else asdict(cfg)})
        e = "" if err is None else f"  rel.err {err:.4f}"
        x = "" if speedup is None else f"  {speedup:.2f}x cuDNN"
        print(f"H={h:<3} S={s:<6} {name:<34} {kind:<6} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TFLOP/s{x}{e}", flush=True)

    fns, skipped = _others(q, k, v, sm_scale)
    for name, fn in fns.items():
        try:
            record(name, fn)
        except Exception as exc:  # a third-party kernel that imports but fails on this GPU
            skipped[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: failed ({skipped[name]})", flush=True)
    if "sdpa default" in fns and "sdpa default" not in skipped:
        record("sdpa default", fns["sdpa default"], kind="queued")
    out = torch.empty_like(q)
    for cfg in variants:
        name = f"pack {cfg.name}"
        whole = functools.partial(triton_attention.attention, q, k, v, sm_scale, cfg, out=out)  # pass + kernel
        record(name, whole, out, "total", cfg)
        record(name, whole, out, "queued", cfg)
        qa = triton_attention.quantize(q, k, v, cfg)
        record(name, lambda cfg=cfg, qa=qa: triton_attention.attention_quantized(qa, sm_scale, out, cfg), out,
               "kernel", cfg)
        record(name, lambda cfg=cfg: triton_attention.quantize(q, k, v, cfg), None, "quant", cfg)
    from ..kernels.dispatch import gluon_error

    if dev == "cuda" and torch.cuda.get_device_capability()[0] == 9 and gluon_error() is None:
        # the warp-specialized Gluon kernel attention_8bit runs on Hopper (kernels/gluon_attention_ws.py, NOTES item 74)
        from ..kernels import gluon_attention_ws

        ws = gluon_attention_ws.DEFAULT
        name = f"pack {ws.name}"

        def whole(ws=ws):  # pass + kernel, as attention_8bit runs them
            qa = triton_attention.quantize(q, k, v, ws.quant_config())
            return gluon_attention_ws.launch(qa, sm_scale, out, ws)

        record(name, whole, out, "total")
        record(name, whole, out, "queued")
        qa = triton_attention.quantize(q, k, v, ws.quant_config())
        record(name, functools.partial(gluon_attention_ws.launch, qa, sm_scale, out, ws), out, "kernel")
    for gcfg in gluon:  # kernels/gluon_attention.py: the same numbers, FA3's schedule (bench/NOTES.md item 57)
        from ..kernels import gluon_attention

        name = f"gluon 64x{gcfg.block_n} s{gcfg.stages}"
        try:
            record(name, lambda g=gcfg: gluon_attention.attention_quantized(
                triton_attention.quantize(q, k, v, g.quant_config()), sm_scale, out, g), out, "total")
            qa = triton_attention.quantize(q, k, v, gcfg.quant_config())
            record(name, lambda g=gcfg, qa=qa: gluon_attention.attention_quantized(qa, sm_scale, out, g), out, "kernel")
            # the Triton kernel on the same quantized inputs (block_n = 64 is not the Triton default): bit identity
            # with the Gluon output the timed row left in ``out``
            tcfg = gcfg.quant_config()
            same = torch.equal(out, triton_attention.attention_quantized(qa, sm_scale, torch.empty_like(q), tcfg))
            print(f"H={h:<3} S={s:<6} {name}: {'bit-identical to' if same else 'DIFFERS from'} the Triton kernel "
                  f"{tcfg.name} on the same inputs", flush=True)
            triton_on_qa = functools.partial(triton_attention.attention_quantized, qa, sm_scale, out, tcfg)
            record(f"pack {tcfg.name}", triton_on_qa, out, "kernel", tcfg)
        except Exception as exc:  # a kernel that fails on this GPU must not cost the others their run
            skipped[name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: failed ({skipped[name]})", flush=True)
    # the quantization pass with K and V in one launch and in two (split_quant_kv): the same numbers (the first
    # variant whose pass quantizes V: the 16-bit P V form reads V as given)
    old = next((c for c in variants if c.quantizes_v), None)
    if old is not None:
        new = dataclasses.replace(old, split_quant_kv=not old.split_quant_kv)
        a, b = triton_attention.quantize(q, k, v, old), triton_attention.quantize(q, k, v, new)
        same = all(torch.equal(x.view(torch.int8), y.view(torch.int8))  # bits (V past S_kv is never written)
                   for x, y in zip((a.q, a.q_scale, a.k, a.k_scale, a.v[:, :s], a.v_scale),
                                   (b.q, b.q_scale, b.k, b.k_scale, b.v[:, :s], b.v_scale), strict=True))
        same = same and (a.v_colsum is None or torch.equal(a.v_colsum, b.v_colsum))
        print(f"H={h:<3} S={s:<6} quantization pass: split_quant_kv on and off give "
              f"{'identical' if same else 'DIFFERENT'} outputs", flush=True)
        record(f"pack {new.name}", lambda: triton_attention.quantize(q, k, v, new), None, "quant", new)
    return rows, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="S = 4608, H = 24 only")
    parser.add_argument("--shapes", default=None, help="H:S pairs, e.g. 24:4608,32:16896 (default: issue 14's four)")
    parser.add_argument("--device", default="cuda", help="cuda (a CPU run under TRITON_INTERPRET is a smoke test)")
    parser.add_argument("--default-only", action="store_true", help="of the Triton configs, the default only")
    parser.add_argument("--variants", default=None,
                        help="of the Triton configs, the default and those whose name starts with one of these "
                             "comma-separated prefixes (e.g. 16bit)")
    parser.add_argument("--profile-pass", action="store_true",
                        help="also the default config's quantization pass per kernel (torch.profiler)")
    args = parser.parse_args(argv)
    from ..kernels import attention_configs, triton_attention

    t_start = time.perf_counter()
    env = common.environment()
    print(env, flush=True)
    variants = (attention_configs.DEFAULT,) if args.default_only else attention_configs.VARIANTS
    if args.variants:
        prefixes = tuple(args.variants.split(","))
        variants = tuple(c for c in variants if c is attention_configs.DEFAULT or c.name.startswith(prefixes))
    gluon = ()
    if args.device == "cuda" and torch.cuda.get_device_capability()[0] == 9 and not args.variants:
        from ..kernels.gluon_attention import GluonAttentionConfig

        gluon = (GluonAttentionConfig(64, 3), GluonAttentionConfig(64, 4))
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(x) for x in pair.split(":")) for pair in args.shapes.split(","))
    dev, dt = args.device, torch.bfloat16
    sm_scale = 1.0 / math.sqrt(HEAD_DIM)
    # compile every variant once on a small problem, so compile time is not in the first timing
    compile_s, skipped = {}, {}
    qs, ks, vs = (torch.randn(1, 2, 300, HEAD_DIM, device=dev, dtype=dt) for _ in range(3))
    ok = []
    for cfg in variants:
        t0 = time.perf_counter()
        try:
            triton_attention.attention(qs, ks, vs, sm_scale, cfg)
            torch.cuda.synchronize()
        except Exception as exc:  # one variant that does not build must not cost the others their run
            skipped[f"pack {cfg.name}"] = f"{type(exc).__name__}: {exc}"
            print(f"pack {cfg.name}: failed ({skipped[f'pack {cfg.name}']})", flush=True)
            continue
        ok.append(cfg)
        compile_s[cfg.name] = round(time.perf_counter() - t0, 2)
        print(f"compiled {cfg.name} in {compile_s[cfg.name]} s", flush=True)
    variants = tuple(ok)
    rows = []
    for h, s in shapes:
        r, miss = _bench_shape(h, s, variants, sm_scale, dev, dt, gluon)
        rows += r
        skipped.update(miss)
        torch.cuda.empty_cache()
    pass_rows = []
    if args.profile_pass and attention_configs.DEFAULT in variants:
        for h, s in shapes:
            for lean in (False, True):
                pass_rows += profile_pass(h, s, attention_configs.DEFAULT, dev, dt, lean=lean)
    print(f"\nbest pack variant per shape (quantization counted) vs SDPA default; 'ok': rel.err <= {ERR_BOUND}:")
    for h, s in shapes:
        here = [r for r in rows if r["H"] == h and r["S"] == s and r["method"].startswith(("pack", "gluon"))]
        totals = [r for r in here if r["kind"] == "total"]
        for label, pool in (("any", totals), ("ok", [r for r in totals if r["rel_err"] <= ERR_BOUND])):
            if not pool:
                continue
            best = min(pool, key=lambda r: r["ms"])
            kern = next(r for r in here if r["method"] == best["method"] and r["kind"] == "kernel")
            queued = next((r for r in here if r["method"] == best["method"] and r["kind"] == "queued"), None)
            q_note = "" if queued is None else f", queued {queued['vs_sdpa_default']}x"
            print(f"H={h:<3} S={s:<6} {label:<3} {best['method']:<34} {best['ms']:.3f} ms {best['tflops']:.0f} TFLOP/s "
                  f"{best['vs_sdpa_default']}x (kernel alone {kern['tflops']:.0f} TFLOP/s, {kern['vs_sdpa_default']}x"
                  f"{q_note}) rel.err {best['rel_err']:.4f}")
    for name, why in skipped.items():
        print(f"not measured: {name}: {why}")
    total = time.perf_counter() - t_start
    print(f"bench_attention took {total:.0f} s (compile {sum(compile_s.values()):.0f} s)")
    if args.out:
        common.write_json(args.out, {"env": env, "rows": rows, "pass": pass_rows, "skipped": skipped,
                                     "compile_s": compile_s, "wall_s": round(total, 1), "ref_rows": REF_ROWS})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
