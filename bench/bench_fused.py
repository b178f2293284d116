"""The fused block kernels at FLUX.2 klein 9B shapes against the ops they replace (GPU).

    python -m int8_w8a8.bench.bench_fused [--out results.json]

Each fused kernel is timed (triton.testing.do_bench, median) next to ComfyUI's unfused sequence of
torch ops plus the pack's separate quantization, with the bytes it must move and the bandwidth that
implies. GLU (``[attention | SwiGLU]`` + quantization) is also timed over a few tile/warp choices, and the
same kernel with GELU-tanh (Chroma's, Qwen-Image's and Wan's MLPs), and the forms Qwen-Image, Z-Image and Wan
use (three q/k/v projections, RMSNorm modulation, post-norm gated adds, row-wide q/k norms) at their widths.
The two row-normalizing kernels are timed in every launch form of ``kernels/norm_configs.py`` at each
architecture's shapes (``NORM_SHAPES``), with the fastest form per shape: the result that sets that module's rule.
"""

from __future__ import annotations

import argparse
import functools

import torch

from . import common


def _rope_ref(x, pe):
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(*x.shape).to(x.dtype)


def _gemm_residual_ms(m: int, k: int, n: int, dev: str, dt: torch.dtype) -> tuple[float, float]:
    """(plain INT8 GEMM, the same with ``residual += gate * y`` in its epilogue) in ms."""
    from ..kernels import fused

    xq = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
    xs = torch.rand(m, device=dev) * 0.01
    wq = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8)
    ws = torch.rand(n, device=dev) * 0.01
    res = torch.randn(1, m, n, device=dev, dtype=dt)
    gate = torch.randn(1, 1, n, device=dev, dtype=dt)
    return (common.bench_ms(lambda: fused.int8_gemm(xq, xs, wq, ws, None, dt)),
            common.bench_ms(lambda: fused.int8_gemm_residual(xq, xs, wq, ws, None, res, gate)))


def _other_architectures(record, dev: str, dt: torch.dtype) -> None:
    """The kernels' forms for Qwen-Image, Z-Image and Wan at their real widths (1024x1024 images; Wan 14B at
    832x480 x 33 frames = 8 x 30 x 52 = 12480 tokens)."""
    from ..kernels import fused, triton_quant

    def pe_table(s, d, pe_dtype=torch.float32):
        return torch.randn(1, 1, s, d // 2, 2, 2, device=dev, dtype=pe_dtype)

    def bufs(s, heads, d):
        return tuple(torch.empty(1, s, heads, d, device=dev, dtype=dt).transpose(1, 2) for _ in range(3))

    # Qwen-Image: 24 heads of 128, 4096 image tokens; q/k/v from three projections, a bf16 RoPE table
    s, heads, d = 4096, 24, 128
    proj = tuple(torch.randn(1, s, heads * d, device=dev, dtype=dt) for _ in range(3))
    w = torch.ones(d, device=dev, dtype=dt)
    pe = pe_table(s, d, dt)
    record("qwen-image: q/k rms+rope from 3 projections, bf16 table [4096, 3x3072]", common.bench_ms(
        lambda: fused.qk_norm_rope(proj, w, w, pe, *bufs(s, heads, d), seq_off=0, heads=heads, eps_q=1e-6,
                                   eps_k=1e-6)), proj[0].numel() * 6 * 2 + pe.numel() * 2)
    # Z-Image: dim 3840, 30 heads, FFN 10240; 4096 image + 512 text tokens (padded)
    s, dim, f = 4608, 3840, 10240
    x = torch.randn(1, s, dim, device=dev, dtype=dt)
    scale = torch.randn(1, dim, device=dev, dtype=dt) * 0.1
    nw = torch.rand(dim, device=dev, dtype=dt) + 0.5
    record("z-image: rms+weight+scale+quant [4608, 3840]", common.bench_ms(
        lambda: fused.norm_modulate_quantize(x, None, scale, 1e-5, norm="rms", weight=nw)), x.numel() * 3)
    record("  unfused: rms_norm, mul, quantize_rows", common.bench_ms(lambda: triton_quant.quantize_rows(
        torch.nn.functional.rms_norm(x, (dim,), nw, 1e-5) * (1 + scale))), x.numel() * 9)
    y = torch.randn(s, dim, device=dev, dtype=dt)
    gate = torch.randn(1, dim, device=dev, dtype=dt).tanh()
    record("z-image: x + tanh(g) * rms_norm(y) * w [4608, 3840]", common.bench_ms(
        lambda: fused.rms_norm_gate_add(x, y, nw, gate, 1e-5)), x.numel() * 6)
    record("  unfused: rms_norm, mul, add", common.bench_ms(
        lambda: x + gate * torch.nn.functional.rms_norm(y.view(1, s, dim), (dim,), nw, 1e-5)), x.numel() * 10)
    g, u = (torch.randn(s, f, device=dev, dtype=dt) for _ in range(2))
    record("z-image: swiglu of (w1, w3) + quant [4608, 2 x 10240]", common.bench_ms(
        lambda: fused.glu_quantize(None, (g, u))), g.numel() * 5)
    # Wan 14B: dim 5120, 40 heads; q/k normalized over the whole row
    s, heads, d = 12480, 40, 128
    proj = tuple(torch.randn(1, s, heads * d, device=dev, dtype=dt) for _ in range(3))
    w = torch.ones(heads * d, device=dev, dtype=dt)
    pe = pe_table(s, d)
    record("wan: q/k row-rms+rope from 3 projections [12480, 3x5120]", common.bench_ms(
        lambda: fused.qk_norm_rope(proj, w, w, pe, *bufs(s, heads, d), seq_off=0, heads=heads, eps_q=1e-6,
                                   eps_k=1e-6, qk_norm="row")), proj[0].numel() * 6 * 2 + pe.numel() * 4)

    def unfused_wan():
        qq = torch.nn.functional.rms_norm(proj[0], (heads * d,), w, 1e-6).view(1, s, heads, d).transpose(1, 2)
        kk = torch.nn.functional.rms_norm(proj[1], (heads * d,), w, 1e-6).view(1, s, heads, d).transpose(1, 2)
        return _rope_ref(qq, pe), _rope_ref(kk, pe)
    record("  unfused: rms_norm x2, rope (torch) x2", common.bench_ms(unfused_wan), proj[0].numel() * 2 * 8)


# glu_quantize at each architecture's real shape: (name, rows, prefix width P, F, activation, (gate, up) pair)
GLU_SHAPES = (
    ("z-image swiglu (w1, w3) pair", 4608, 0, 10240, "swiglu", True),
    ("flux.2 single [attn | swiglu]", 4608, 4096, 12288, "swiglu", False),
    ("flux.2 double swiglu", 4096, 0, 12288, "swiglu", False),
    ("chroma/qwen gelu_tanh", 4096, 0, 12288, "gelu_tanh", False),
    ("chroma single [attn | gelu_tanh]", 4608, 3072, 12288, "gelu_tanh", False),
    ("wan gelu_tanh", 14040, 0, 13824, "gelu_tanh", False),
)


def glu_variants(record, dev: str, dt: torch.dtype) -> dict:
    """Every ``triton_fused.GLU_VARIANTS`` entry at every ``GLU_SHAPES`` shape: GB/s (input + int8 output bytes)
    and whether its codes and scales equal the "base" variant's; then each variant's summed time over the
    shapes, and per activation the fastest (``GLU_RULE``'s entries)."""
    from ..kernels import triton_fused

    by_act: dict[str, dict[str, float]] = {}  # activation -> variant -> summed ms
    for name, m, p, f, act, pair in GLU_SHAPES:
        width = 2 * f if act == "swiglu" and not pair else f
        wide = torch.randn(m, width + 64, device=dev, dtype=dt) * 2
        glu = wide[:, 64:]  # a column slice, as the blocks pass a projection's output
        up = torch.randn(m, f, device=dev, dtype=dt) if pair else None
        prefix = torch.randn(m, p, device=dev, dtype=dt) if p else None
        nbytes = (glu.numel() + (up.numel() if pair else 0) + (prefix.numel() if p else 0)) * 2 + m * (p + f)
        base = None
        for variant in triton_fused.GLU_VARIANTS:
            run = functools.partial(triton_fused.glu_quantize, prefix, glu, f, activation=act, up=up, variant=variant)
            out = run()
            base = base or out
            same = torch.equal(out[0], base[0]) and torch.equal(out[1].nan_to_num(-1), base[1].nan_to_num(-1))
            ms = common.bench_graph_ms(run)  # device time: the launch path's host cost (~100 us) hides small kernels
            by_act.setdefault(act, dict.fromkeys(triton_fused.GLU_VARIANTS, 0.0))[variant] += ms
            record(f"glu {name} [{m}, {p}+{f}] {variant}{'' if same else ' (DIFFERS from base)'}", ms, nbytes)
    total = {v: sum(times[v] for times in by_act.values()) for v in triton_fused.GLU_VARIANTS}
    best = min(total, key=total.get)
    print("glu variants, summed over the shapes: " + ", ".join(f"{v} {t * 1e3:.0f} us" for v, t in total.items())
          + f"; fastest: {best}", flush=True)
    fastest = {act: min(times, key=times.get) for act, times in by_act.items()}
    print(f"glu fastest per activation (summed over its shapes): {fastest} (GLU_RULE is {triton_fused.GLU_RULE!r})",
          flush=True)
    return {"total_ms": total, "fastest": best, "fastest_by_activation": fastest}


# quantize_rows at the shapes the fused blocks and unfused linears give it (attention outputs before ``o``):
# (name, rows, columns, dtype). Qwen-Image / Chroma 3072 wide (image + text tokens), FLUX.2 klein 9B 4096, Wan 5120
# (two passes).
ROW_SHAPES = (
    ("qwen-image / chroma attention output", 4608, 3072, torch.bfloat16),
    ("klein 9B attention output", 4608, 4096, torch.bfloat16),
    ("wan attention output (two passes)", 14040, 5120, torch.float16),
)


def _rows_forms(record, dev: str) -> None:
    """``quantize_rows``' launch in its general and LEAN single-pass forms (``launch_quantize(lean=...)``;
    bench/NOTES.md item 83) at ``ROW_SHAPES``, CUDA-graph replays; each LEAN row says whether its codes and scales
    equal the general form's."""
    from ..kernels import triton_quant

    for name, m, k, dtype in ROW_SHAPES:
        x = torch.randn(m, k, device=dev, dtype=dtype) * 3
        outs = {}
        for lean in (False, True):
            q = torch.empty((m, k), dtype=torch.int8, device=dev)
            scale = torch.empty((m,), dtype=torch.float32, device=dev)
            run = functools.partial(triton_quant.launch_quantize, x, q, scale, lean=lean)
            run()
            outs[lean] = (q.clone(), scale.clone())
            ms = common.bench_graph_ms(run)
            differs = lean and not (torch.equal(outs[True][0], outs[False][0])
                                    and torch.equal(outs[True][1].nan_to_num(-1), outs[False][1].nan_to_num(-1)))
            record(f"quantize_rows {name} [{m}, {k}] {'lean' if lean else 'general'}{' (DIFFERS)' if differs else ''}",
                   ms, x.numel() * 3)


# The row-normalizing kernels at each architecture's shapes: (name, rows, columns, dtype, norm, shift, weight).
# Wan 2.1 14B at 832x480x33 (14040 tokens with its padding, float16), Z-Image (RMSNorm with its weight, scale
# only), Qwen-Image's image and text streams and Chroma (3072), FLUX.2 klein 9B (4096).
NORM_SHAPES = (
    ("wan", 14040, 5120, torch.float16, "layer", True, False),
    ("z-image", 4608, 3840, torch.bfloat16, "rms", False, True),
    ("qwen-image/chroma", 4096, 3072, torch.bfloat16, "layer", True, False),
    ("qwen-image text", 512, 3072, torch.bfloat16, "layer", True, False),
    ("flux.2 klein 9B", 4608, 4096, torch.bfloat16, "layer", True, False),
)


def _sweep_forms(record, label: str, nbytes: int, run_rule, run_form) -> None:
    """The rule's call, then ``run_form(form)`` for each of ``norm_configs.CANDIDATES``, and the fastest form."""
    from ..kernels import launch, norm_configs
    from ..kernels.launch import TileTooLargeError

    # device time from CUDA graph replays: forms go through the launch path (~60 us of host per call) and the rule
    # through the replayed public function (~20-40 us), both above these kernels' time at most shapes
    misfits = len(launch._MISFITS)
    run_rule()  # eager first: a rule that falls back to the torch twin (a tile over shared memory) is not captured
    torch.cuda.synchronize()
    if len(launch._MISFITS) > misfits:
        print(f"{label} (rule): the torch twin (no form fits shared memory); not timed", flush=True)
        return
    record(f"{label} (rule)", common.bench_graph_ms(run_rule), nbytes)
    best = None
    for form in norm_configs.CANDIDATES:
        try:
            run_form(form)
        except TileTooLargeError:
            print(f"  {form.name:<56} does not fit: the torch twin", flush=True)
            continue
        ms = common.bench_graph_ms(lambda f=form: run_form(f))
        record(f"  {form.name}", ms, nbytes)
        if best is None or ms < best[0]:
            best = (ms, form)
    if best is not None:
        print(f"  best: {best[1]} {nbytes / best[0] / 1e6:.0f} GB/s", flush=True)


def _norm_mod_quant_forms(record, dev: str, name: str, m: int, k: int, dt: torch.dtype, norm: str, shifted: bool,
                          weighted: bool) -> None:
    from ..kernels import fused, triton_fused

    x = torch.randn(1, m, k, device=dev, dtype=dt)
    mscale = torch.randn(1, 1, k, device=dev, dtype=dt) * 0.1
    shift = torch.randn(1, 1, k, device=dev, dtype=dt) * 0.1 if shifted else None
    w = torch.rand(k, device=dev, dtype=dt) + 0.5 if weighted else None
    x2, sc2, sh2 = x.view(m, k), mscale.view(1, k), None if shift is None else shift.view(1, k)
    for group in (0, 128):
        _sweep_forms(
            record, f"norm_mod_quant {name} [{m}, {k}] {norm}{' +shift' if shifted else ''}"
            f"{' +weight' if weighted else ''} {str(dt)[6:]} G={group}", x.numel() * (x.element_size() + 1),
            lambda g=group: fused.norm_modulate_quantize(x, shift, mscale, 1e-6, rotate_group=g, norm=norm, weight=w),
            lambda f, g=group: triton_fused.norm_modulate_quantize(x2, sh2, sc2, m, 1e-6, g, norm, w, form=f))


def _norm_forms(record, dev: str) -> None:
    """``norm_modulate_quantize`` (rotate_group 0 and 128) and ``rms_norm_gate_add`` in every launch form of
    ``norm_configs.CANDIDATES``, at the architectures' shapes, next to the rule's choice; per shape the fastest form
    (the line that sets ``norm_configs.NORM_MOD_QUANT_RULE`` / ``NORM_GATE_ADD_RULE``)."""
    from ..kernels import fused, triton_fused

    for shape in NORM_SHAPES:
        _norm_mod_quant_forms(record, dev, *shape)
    m, n, dt = 4608, 3840, torch.bfloat16
    x, y = (torch.randn(1, m, n, device=dev, dtype=dt) for _ in range(2))
    w = torch.rand(n, device=dev, dtype=dt) + 0.5
    gate = torch.randn(1, n, device=dev, dtype=dt).tanh()
    _sweep_forms(record, f"rms_norm_gate_add z-image [{m}, {n}] bf16", x.numel() * 6,
                 lambda: fused.rms_norm_gate_add(x, y, w, gate, 1e-5),
                 lambda f: triton_fused.rms_norm_gate_add(x.view(m, n), y.view(m, n), w, gate, m, 1e-5, form=f))
    _gate_add_norm_quant_forms(record, dev)


def _gate_add_norm_quant_forms(record, dev: str) -> None:
    """Z-Image's post-norm add and its next RMSNorm + scale + quantization at [4608, 3840]: the two kernels in turn
    (what the block runs) against the one-pass kernel in every form (GATE_ADD_NORM_QUANT_RULE takes a form that
    wins)."""
    from ..kernels import fused, triton_fused

    m, n, dt = 4608, 3840, torch.bfloat16
    x, y = (torch.randn(1, m, n, device=dev, dtype=dt) for _ in range(2))
    w = torch.rand(n, device=dev, dtype=dt) + 0.5
    gate = torch.randn(1, n, device=dev, dtype=dt).tanh()
    scale, w2 = torch.randn(1, n, device=dev, dtype=dt) * 0.1, torch.rand(n, device=dev, dtype=dt) + 0.5

    def pair():
        new = fused.rms_norm_gate_add(x, y, w, gate, 1e-5)
        return fused.norm_modulate_quantize(new, None, scale, 1e-6, norm="rms", weight=w2)

    record(f"rms_norm_gate_add + norm_modulate_quantize z-image [{m}, {n}] bf16 (two kernels)",
           common.bench_graph_ms(pair), x.numel() * 9)
    _sweep_forms(record, f"rms_norm_gate_add_quantize z-image [{m}, {n}] bf16", x.numel() * 7,
                 lambda: fused.rms_norm_gate_add_quantize(x, y, w, gate, 1e-5, scale, 1e-6, weight=w2),
                 lambda f: triton_fused.rms_norm_gate_add_quantize(x.view(m, n), y.view(m, n), w, gate, scale, m,
                                                                   1e-5, 1e-6, 0, w2, form=f))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default="all", choices=("all", "norms", "gate-add-quant", "glu", "rows"),
                        help="one section: the row-normalizing kernels' forms, only the one-pass post-norm add, "
                             "glu_quantize's variants at every GLU shape, or quantize_rows' two forms")
    args = parser.parse_args()
    from ..kernels import fused, triton_fused, triton_quant

    dev, dt = "cuda", torch.bfloat16
    b, s, hidden, heads, f = 1, 4608, 4096, 32, 12288
    d = hidden // heads
    rows = []

    def record(name, ms, nbytes):
        rows.append({"name": name, "ms": ms, "GB/s": nbytes / ms / 1e6})
        print(f"{name:<58} {ms * 1e3:8.1f} us  {nbytes / ms / 1e6:7.0f} GB/s", flush=True)

    if args.only != "all":
        sections = {"norms": _norm_forms, "gate-add-quant": _gate_add_norm_quant_forms,
                    "glu": lambda rec, device: glu_variants(rec, device, dt), "rows": _rows_forms}
        summary = sections[args.only](record, dev)
        if args.out:
            common.write_json(args.out, {"env": common.environment(), "rows": rows,
                                         **({"glu_variants": summary} if args.only == "glu" else {})})
        return
    x = torch.randn(b, s, hidden, device=dev, dtype=dt)
    shift = torch.randn(b, 1, hidden, device=dev, dtype=dt) * 0.1
    scale = torch.randn(b, 1, hidden, device=dev, dtype=dt) * 0.1
    ln = torch.nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    record("norm+mod+quant fused [4608, 4096]", common.bench_ms(lambda: fused.norm_modulate_quantize(x, shift, scale)),
           x.numel() * 3)
    record("  unfused: layer_norm, addcmul, quantize_rows", common.bench_ms(
        lambda: triton_quant.quantize_rows(torch.addcmul(shift, ln(x), 1 + scale))), x.numel() * 11)

    h = torch.randn(b, s, 3 * hidden + 2 * f, device=dev, dtype=dt)
    attn = torch.randn(b, s, hidden, device=dev, dtype=dt)
    mlp = h[..., 3 * hidden:]
    nbytes = attn.numel() * 2 + mlp.numel() * 2 + s * (hidden + f)
    record("[attn | swiglu]+quant fused (rule)", common.bench_ms(lambda: fused.glu_quantize(attn, mlp)), nbytes)
    for block_k, warps, flight in ((4096, 8, 0), (2048, 4, 0), (4096, 8, 2000), (8192, 16, 0)):
        ms = common.bench_ms(lambda bk=block_k, w=warps, fl=flight: triton_fused.glu_quantize(
            attn.reshape(s, -1), mlp.reshape(s, -1), f, bk, w, fl))
        record(f"  glu block_k={block_k} warps={warps} rows_in_flight={flight or 'rule'}", ms, nbytes)
    img_mlp = torch.randn(b, 4096, 2 * f, device=dev, dtype=dt)
    record("swiglu+quant fused [4096, 2 x 12288] (double block, rule)",
           common.bench_ms(lambda: fused.glu_quantize(None, img_mlp)), img_mlp.numel() * 2 + 4096 * f)

    def unfused_glu():
        g, u = mlp.chunk(2, dim=-1)
        return triton_quant.quantize_rows(torch.cat((attn, torch.nn.functional.silu(g) * u), 2))
    record("  unfused: silu, mul, cat, quantize_rows", common.bench_ms(unfused_glu), nbytes * 3)
    # GELU-tanh (FLUX.1, Chroma, Qwen-Image, Wan MLPs): the same kernel with the activation as a meta-parameter
    gelu_in = torch.randn(b, 4096, f, device=dev, dtype=dt)
    record("gelu_tanh+quant fused [4096, 12288] (double block / FFN, rule)",
           common.bench_ms(lambda: fused.glu_quantize(None, gelu_in, activation="gelu_tanh")), gelu_in.numel() * 3)
    record("  unfused: gelu(tanh), quantize_rows", common.bench_ms(
        lambda: triton_quant.quantize_rows(torch.nn.functional.gelu(gelu_in, approximate="tanh"))),
        gelu_in.numel() * 7)
    gelu_single = h[..., 3 * hidden:3 * hidden + f]
    record("[attn | gelu_tanh]+quant fused (single block, rule)", common.bench_ms(
        lambda: fused.glu_quantize(attn, gelu_single, activation="gelu_tanh")),
        attn.numel() * 2 + gelu_single.numel() * 2 + s * (hidden + f))

    pe = torch.randn(1, 1, s, d // 2, 2, 2, device=dev, dtype=torch.float32)
    qw = torch.ones(d, device=dev, dtype=dt)
    q = torch.empty(b, heads, s, d, device=dev, dtype=dt)
    k, v = torch.empty_like(q), torch.empty_like(q)
    qkv = h[..., :3 * hidden]
    record("q/k rms+rope+split fused", common.bench_ms(lambda: fused.qk_norm_rope(
        qkv, qw, qw, pe, q, k, v, seq_off=0, heads=heads, eps_q=1e-6, eps_k=1e-6)), qkv.numel() * 4 + pe.numel() * 4)

    def unfused_qk():
        qq, kk, vv = qkv.view(b, s, 3, heads, d).permute(2, 0, 3, 1, 4)
        qq = torch.nn.functional.rms_norm(qq, (d,), qw, 1e-6)
        kk = torch.nn.functional.rms_norm(kk, (d,), qw, 1e-6)
        return _rope_ref(qq, pe), _rope_ref(kk, pe), vv
    record("  unfused: rms_norm x2, rope (torch) x2", common.bench_ms(unfused_qk), qkv.numel() * 8)
    _other_architectures(record, dev, dt)
    glu = glu_variants(record, dev, dt)
    _norm_forms(record, dev)
    _rows_forms(record, dev)
    # the gated residual add in the GEMM epilogue: its cost over the plain GEMM (reads the residual tile once)
    for m, k, n in ((4608, 16384, 4096), (4096, 4096, 4096), (4096, 12288, 4096)):
        plain, with_res = _gemm_residual_ms(m, k, n, dev, dt)
        record(f"int8 gemm {m}x{k}x{n}", plain, m * k + n * k + m * n * 2)
        record(f"  + gated residual in the epilogue (+{(with_res - plain) * 1e3:.1f} us)", with_res,
               m * k + n * k + m * n * 4)
    if args.out:
        common.write_json(args.out, {"env": common.environment(), "rows": rows, "glu_variants": glu})


if __name__ == "__main__":
    main()
