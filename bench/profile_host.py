"""Host (CPU) cost of one int8_linear call, split into its parts, on the GPU machine.

    python -m int8_w8a8.bench.profile_host [--out host.json]      (GPU; ComfyUI layers need COMFYUI_PATH)
    python -m int8_w8a8.bench.profile_host --cpu-proxy            (no GPU: the Python layers, CPU proxy)
    python -m int8_w8a8.bench.profile_host --cpu-proxy-step qwen-image [--layers 20] [--cprofile 60]
                                           [--compile inductor]
                                                                  (no GPU: a whole step's host time, eager or compiled)

Batch-1 layers run in tens of microseconds on the GPU, so Python and launch overhead decide
whether they beat BF16. Prints microseconds per call (median of several runs of many calls, no
synchronization inside the loop) and a cProfile of the full call.

Layer table (``layer_rows``): one layer as a ComfyUI model runs it, at M = 1, 256 and 4096 rows of K = N =
3072: ComfyUI's BF16 Linear (F.linear), the pack's Int8Linear resident (the LinearPlan path: hoisted
checks, replayed launches) and through ComfyUI's cast path (what offloaded layers run, and what every
layer ran before the plan), the public kernel API, and F.linear on an INT8 weight through the aten handlers
(native files on ComfyUI's stock loader). Host time per call: the GPU is synchronized before each call and
the clock stops when the call returns, so queued kernels do not count. ``--cpu-proxy`` runs the same
layers on CPU tensors at K = N = 64 with the torch-twin kernels: Python and dispatch costs of the layers
around the kernels; the twin's own time is its row, to subtract. Launch costs only exist on the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # --cpu-proxy records launches under Triton's interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .. import kernels
from ..kernels import _checks, dispatch, triton_gemm, triton_ops, triton_quant
from . import common


def _us_per_call(fn, calls: int = 300, runs: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def host_us(fn, calls: int = 300) -> float:
    """Median host time of one call of ``fn`` in us, the device idle at each call's start (synchronized
    before, not after: the kernels it queues run while the clock is stopped)."""
    fn()
    common.sync()
    times = []
    for _ in range(calls):
        common.sync()
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    common.sync()
    return statistics.median(times) / 1e3


def _comfyui() -> bool:
    """Import ComfyUI from COMFYUI_PATH for the layer table (False when it is not there)."""
    if not os.environ.get("COMFYUI_PATH"):
        return False
    from . import flux2_model

    flux2_model.setup_comfyui(cpu=not torch.cuda.is_available())
    return True


def layers(device: str, k: int, n: int):
    """(ComfyUI BF16 Linear, the pack's Int8Linear, the INT8 weight) with the same random weights on ``device``."""
    import comfy.ops

    from ..ops import layout
    from ..ops.comfy_ops import make_operations
    from ..ops.config import ConvertOptions, LoadConfig

    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * k ** -0.5
    bias = torch.randn(n, device=device, dtype=torch.bfloat16) * 0.02
    bf16 = comfy.ops.disable_weight_init.Linear(k, n, bias=True, device=device, dtype=torch.bfloat16)
    bf16.weight = torch.nn.Parameter(w, requires_grad=False)
    bf16.bias = torch.nn.Parameter(bias, requires_grad=False)
    ops = make_operations(LoadConfig(profile=None, convert=ConvertOptions(), source="profile_host"))
    int8 = ops.Linear(k, n, bias=True, device=device, dtype=torch.bfloat16)
    q, s = kernels.quantize_weight(w)
    weight = layout.make_weight(q, s, torch.bfloat16)
    int8.weight = torch.nn.Parameter(weight, requires_grad=False)
    int8.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return bf16, int8, weight


def _layer_parts(x, bf16, int8, weight, bias) -> dict:
    from ..kernels import reference

    plan = int8._resident_plan()
    parts = {
        "F.linear bf16": lambda: F.linear(x, bf16.weight, bf16.bias),
        "ComfyUI Linear bf16 (disable_weight_init)": lambda: bf16(x),
        "Int8Linear resident (plan)": lambda: int8(x),
        "LinearPlan alone (replay on the GPU)": lambda: plan(x),
        "torch.empty of the output (the plan's one allocation)": lambda: torch.empty(
            (*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device),
        # what offloaded layers run, and what every layer ran before the plan
        "Int8Linear through ComfyUI's cast path": lambda: int8._forward_cast(x),
        "kernels.int8_linear (public API)": lambda: kernels.int8_linear(x, weight._qdata, weight._params.scale, bias,
                                                                        validate=False),
        "F.linear on the INT8 weight (aten handlers)": lambda: F.linear(x, weight, bias),
    }
    if x.device.type == "cpu":
        parts["torch twin kernels alone (subtract)"] = lambda: reference.int8_linear_unchecked(
            x, weight._qdata, weight._params.scale, bias, torch.bfloat16, None, 0)
    return parts


def layer_rows(device: str, ms=(1, 256, 4096), k: int = 3072, n: int = 3072, calls: int = 300) -> list[dict]:
    """Host us per call of one linear layer the ways ComfyUI runs it (see the module docstring)."""
    bf16, int8, weight = layers(device, k, n)
    bias = int8.bias

    rows = []
    for m in ms:
        x = torch.randn(1, m, k, device=device, dtype=torch.bfloat16)
        with torch.inference_mode():
            for label, fn in _layer_parts(x, bf16, int8, weight, bias).items():
                rows.append({"m": m, "k": k, "n": n, "part": label, "us": host_us(fn, calls)})
    base = {r["m"]: r["us"] for r in rows if r["part"] == "F.linear bf16"}
    for r in rows:
        r["x_f_linear"] = r["us"] / base[r["m"]]
    return rows


def print_layer_rows(rows: list[dict], title: str) -> None:
    print(f"\n## {title}")
    print("| part | M | host us/call | x F.linear |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['m']} | {r['us']:.1f} | {r['x_f_linear']:.2f} |")


@contextlib.contextmanager
def _null_kernels():
    """CPU proxy only: the torch twin of int8_linear returns an empty output at once, so the layers above it
    (ComfyUI's cast path, the public API, the plan, the aten handlers) are timed alone."""
    from ..kernels import reference

    real = reference.int8_linear_unchecked

    def null(x, q, scale, bias, out_dtype, *args, **kwargs):
        return torch.empty((*x.shape[:-1], q.shape[0]), dtype=out_dtype)

    reference.int8_linear_unchecked = null
    try:
        yield
    finally:
        reference.int8_linear_unchecked = real


@contextlib.contextmanager
def _null_launches(replayed: list[float] | None = None):
    """CPU proxy only: a FastLauncher call does its Python (specialization key, cache lookup, argument list) and
    stops where the GPU path calls Triton's C launcher; a replayed launch stops at the same place. Inside
    ``launch.recording()`` the launches are recorded as compiled ones (a kernel, device 0), so replays substitute
    addresses, as on a GPU. ``replayed``: each replayed launch appends its ``perf_counter`` time there."""
    from ..kernels import launch

    call, replay = launch.FastLauncher.__call__, launch.Launch.replay

    def key_only(self, grid, *args, **kwargs):
        key = (0, tuple(launch._arg_key(a) for a in args), tuple(kwargs.items()))
        self.cache.get(key)
        full = list(args)
        full.extend(kwargs[name] for name in self.names[len(args):])
        records = launch._RECORDING.get()
        if records is not None:
            records.append(launch.Launch(self, grid, args, kwargs, object(), 0))

    def replay_stopped(self, args):
        if replayed is not None:
            replayed.append(time.perf_counter())

    launch.FastLauncher.__call__ = key_only
    launch.Launch.replay = replay_stopped
    try:
        yield
    finally:
        launch.FastLauncher.__call__, launch.Launch.replay = call, replay


def launch_rows(ms=(1, 256, 4096), k: int = 3072, n: int = 3072, calls: int = 2000) -> list[dict]:
    """CPU proxy of the launch side at the real widths: ``triton_ops.int8_linear`` (buffers, config choice, TMA
    descriptors, two FastLauncher keys) against a LinearPlan's replay (workspace, output, argument
    substitution), both stopping where Triton's C launcher would run. Allocations are CPU ones here."""
    from ..kernels import direct
    from ..kernels.dispatch import Backend

    hopper = Backend("triton", "cpu proxy", (9, 0))
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n, 1) * 0.01 + 1e-3
    bias = torch.randn(n, dtype=torch.bfloat16)
    rows = []
    for m in ms:
        x = torch.randn(1, m, k, dtype=torch.bfloat16)
        plan = direct.LinearPlan(q, scale, bias, backend=hopper)
        with _null_launches():
            plan.replays[(x.dtype, x.shape, x.stride(), True)] = _proxy_replay(plan, x, m, k)
            for label, fn in _launch_parts(x, q, scale, bias, plan, hopper).items():
                rows.append({"m": m, "k": k, "n": n, "part": label, "us": host_us(fn, calls)})
    return rows


def _launch_parts(x, q, scale, bias, plan, backend) -> dict:
    return {
        "triton_ops.int8_linear, launches stopped at the C launcher": lambda: triton_ops.int8_linear(
            x, q, scale, bias, torch.bfloat16, None, 0, backend),
        "LinearPlan replay, launches stopped at the C launcher": lambda: plan(x),
    }


def _proxy_replay(plan, x, m: int, k: int):
    """A replay of ``plan`` for ``x`` whose launches look compiled (addresses, not tensors, substituted): built
    from a recording with the launches stopped before the kernels (inside ``_null_launches``), so nothing runs in
    the interpreter."""
    from ..kernels import direct, launch, triton_ops

    off, nbytes = direct._regions(m, k)
    buf = direct.workspace(nbytes, x.device)
    xq = buf[: m * k].view(torch.int8).view(m, k)
    xs = buf[off: off + 4 * m].view(torch.float32)
    with launch.recording() as records:
        triton_quant.launch_quantize(x.view(m, k), xq, xs)
        out = triton_ops.int8_gemm(xq, xs, plan.q, plan.scale, plan.bias_for(x.dtype), x.dtype, plan.backend)
    return direct._Replay(direct._classify(records, x, xq, xs, out), m, k, plan.n,
                          (*x.shape[:-1], plan.n), x.dtype)


# ---------------------------------------------------------------- fused blocks (issue 13): per call and per block
# Real widths at 1024x1024: 4096 image tokens, hidden 3072 (Qwen-Image, FLUX.1/Chroma), 24 heads of 128, MLP 12288
# with GELU-tanh; Z-Image's post-norm width 3840. Text streams: 512 tokens.
WIDTH, HEADS, HEAD_DIM, MLP, IMG, TXT, ZWIDTH = 3072, 24, 128, 12288, 4096, 512, 3840


def _int8_layer(device: str, k: int, n: int):
    """An Int8Linear (resident, fusable) with random INT8 weights of [n, k], a per-row scale and a bf16 bias."""
    from ..ops import layout
    from ..ops.comfy_ops import make_operations
    from ..ops.config import ConvertOptions, LoadConfig

    ops = make_operations(LoadConfig(profile=None, convert=ConvertOptions(), source="profile_host"))
    layer = ops.Linear(k, n, bias=True, device=device, dtype=torch.bfloat16)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    scale = torch.rand(n, 1, device=device) * 1e-3 + 1e-4
    layer.weight = torch.nn.Parameter(layout.make_weight(q, scale, torch.bfloat16), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(n, device=device, dtype=torch.bfloat16) * 0.02, requires_grad=False)
    return layer


@contextlib.contextmanager
def _cast_path(*layers):
    """The layers as ComfyUI leaves an offloaded one (``comfy_cast_weights``): run_quantized's cast path, which
    every fused-block GEMM took before the resident plan."""
    for layer in layers:
        layer.comfy_cast_weights = True
    try:
        yield
    finally:
        for layer in layers:
            layer.comfy_cast_weights = False


@contextlib.contextmanager
def _replay(on: bool):
    """The eager replayers of kernels/fused.py and kernels.quantize_rows on (``on``) or off (the launch path on
    every call, checks included: what eager fused calls ran before)."""
    from ..kernels import api, fused

    reps = (*fused.REPLAYERS, api._rows_replayer())
    saved = [(r.enabled, r.table) for r in reps]
    for r in reps:
        r.enabled, r.table = on, {}
    try:
        yield
    finally:
        for r, (enabled, table) in zip(reps, saved, strict=True):
            r.enabled, r.table = enabled, table


def _fused_inputs(device: str) -> dict:
    bf16 = torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=bf16)

    mod = rnd(1, 6 * WIDTH)
    x = rnd(1, IMG, WIDTH)
    proj = tuple(rnd(1, IMG, WIDTH) for _ in range(3))
    bufs = tuple(torch.empty(1, IMG + TXT, HEADS, HEAD_DIM, device=device, dtype=bf16).transpose(1, 2)
                 for _ in range(3))
    ang = torch.randn(1, IMG + TXT, HEAD_DIM // 2, device=device)
    pe = torch.stack([ang.cos(), -ang.sin(), ang.sin(), ang.cos()], -1).reshape(1, 1, IMG + TXT, HEAD_DIM // 2, 2, 2)
    return {"x": x, "shift": mod[:, :WIDTH], "scale": mod[:, WIDTH:2 * WIDTH], "gate": mod[:, 2 * WIDTH:3 * WIDTH],
            "h": rnd(IMG, MLP), "proj": proj, "bufs": bufs, "pe": pe, "qw": rnd(HEAD_DIM), "kw": rnd(HEAD_DIM),
            "zx": rnd(1, IMG, ZWIDTH), "zy": rnd(IMG, ZWIDTH), "zw": rnd(ZWIDTH), "zg": rnd(1, 1, ZWIDTH),
            "attn": rnd(1, IMG, WIDTH)}


def _fused_parts(t: dict) -> dict:
    """label -> call, for each fused kernel call of a block, eager, at the real widths."""
    from ..kernels import fused

    x, sh, sc = t["x"], t["shift"], t["scale"]
    parts = {
        "norm_modulate_quantize": lambda: fused.norm_modulate_quantize(x, sh, sc, 1e-6),
        "glu_quantize (GELU-tanh, 12288)": lambda: fused.glu_quantize(None, t["h"], activation="gelu_tanh"),
        "qk_norm_rope (three projections)": lambda: fused.qk_norm_rope(
            t["proj"], t["qw"], t["kw"], t["pe"], *t["bufs"], seq_off=TXT, heads=HEADS, eps_q=1e-6, eps_k=1e-6),
        "rms_norm_gate_add (3840)": lambda: fused.rms_norm_gate_add(t["zx"], t["zy"], t["zw"], t["zg"], 1e-5),
        "quantize_rows (attention output)": lambda: kernels.quantize_rows(t["attn"]),
    }
    return parts


def fused_rows(device: str, calls: int = 300) -> list[dict]:
    """Host us per eager call of each fused kernel (replayed now, launch path as before) and of run_quantized
    (resident plan now, ComfyUI's cast path as before), at the real widths; then one Qwen-Image block and one
    FLUX/Chroma double block (both streams, attention excluded) both ways."""
    t = _fused_inputs(device)
    rows = []
    with torch.inference_mode():
        for label, fn in _fused_parts(t).items():
            for on, how in ((False, "launch path + checks (before)"), (True, "replayed (now)")):
                with _replay(on):
                    rows.append({"part": label, "how": how, "us": host_us(fn, calls)})
        up, down = _int8_layer(device, WIDTH, MLP), _int8_layer(device, MLP, WIDTH)
        xq, xs = kernels.fused.norm_modulate_quantize(t["x"], t["shift"], t["scale"], 1e-6)
        hq, hs = kernels.fused.glu_quantize(None, t["h"], activation="gelu_tanh")
        res = t["x"].clone()
        gate = t["gate"].reshape(1, 1, WIDTH)
        gemms = {
            "run_quantized (4096 x 3072 -> 12288)": lambda: up.run_quantized(xq, xs, torch.bfloat16),
            "run_quantized + residual (4096 x 12288 -> 3072)": lambda: down.run_quantized(
                hq, hs, torch.bfloat16, residual=res, gate=gate),
        }
        for label, fn in gemms.items():
            with _replay(False), _cast_path(up, down):
                rows.append({"part": label, "how": "ComfyUI cast path + launch path (before)",
                             "us": host_us(fn, calls)})
            with _replay(True):
                rows.append({"part": label, "how": "resident LinearPlan (now)", "us": host_us(fn, calls)})
        for label, block in _blocks(device, t).items():
            layers = block.layers
            with _replay(False), _cast_path(*layers):
                rows.append({"part": label, "how": "before (cast path, launch path)", "us": host_us(block, 30)})
            with _replay(True):
                rows.append({"part": label, "how": "now (plans, replays)", "us": host_us(block, 30)})
    return rows


class _Block:
    """One block's fused kernel sequence, both streams (image 4096 tokens, text 512), attention excluded (its
    output is a fixed tensor): the calls ``ops/blocks`` makes, with one set of layers serving both streams."""

    def __init__(self, run, layers):
        self.run, self.layers = run, layers

    def __call__(self):
        self.run()


def _blocks(device: str, t: dict) -> dict:
    from types import SimpleNamespace

    from ..ops.blocks import flux, qwen_image

    bf16 = torch.bfloat16
    norm = SimpleNamespace(eps=1e-6)
    rms = torch.nn.RMSNorm(HEAD_DIM, eps=1e-6, device=device, dtype=bf16)
    streams = []
    for s, off in ((IMG, TXT), (TXT, 0)):
        mod = torch.randn(1, 6 * WIDTH, device=device, dtype=bf16)
        streams.append((torch.randn(1, s, WIDTH, device=device, dtype=bf16), mod.chunk(6, dim=-1), off,
                        torch.randn(1, s, WIDTH, device=device, dtype=bf16)))
    bufs, pe = t["bufs"], t["pe"]
    blocks = {}
    # Qwen-Image: to_q/to_k/to_v, to_out, FFN up/down (GELU-tanh)
    q_l, k_l, v_l, o_l = (_int8_layer(device, WIDTH, WIDTH) for _ in range(4))
    up, down = _int8_layer(device, WIDTH, MLP), _int8_layer(device, MLP, WIDTH)
    ff = SimpleNamespace(net=[SimpleNamespace(proj=up), None, down])

    def qwen():
        for x, m, off, _ in streams:
            qwen_image._stream_qkv(x, m[0], m[1], norm, (q_l, k_l, v_l), rms, rms, pe, bufs, off, HEADS)
        for x, m, _, attn in streams:
            qwen_image._stream_out(x, attn, o_l, m[2], norm, m[3], m[4], ff, m[5])

    blocks["Qwen-Image block (2 streams, no attention)"] = _Block(qwen, (q_l, k_l, v_l, o_l, up, down))
    # FLUX.1 / Chroma double block: fused qkv, proj, MLP up/down (GELU-tanh)
    qkv_l, proj = _int8_layer(device, WIDTH, 3 * WIDTH), _int8_layer(device, WIDTH, WIDTH)
    mlp = [up, None, down]
    qk = SimpleNamespace(query_norm=rms, key_norm=rms)

    def double():
        for x, m, off, _ in streams:
            mod1 = SimpleNamespace(shift=m[0].unsqueeze(1), scale=m[1].unsqueeze(1), gate=m[2].unsqueeze(1))
            flux._stream_qkv(x, mod1, norm, qkv_l, qk, pe, bufs, off, HEADS)
        for x, m, _, attn in streams:
            mod1 = SimpleNamespace(shift=m[0].unsqueeze(1), scale=m[1].unsqueeze(1), gate=m[2].unsqueeze(1))
            mod2 = SimpleNamespace(shift=m[3].unsqueeze(1), scale=m[4].unsqueeze(1), gate=m[5].unsqueeze(1))
            flux._stream_out(x, attn, mod1, mod2, proj, norm, mlp, "gelu_tanh")

    blocks["FLUX/Chroma double block (2 streams, no attention)"] = _Block(double, (qkv_l, proj, up, down))
    return blocks


def print_fused_rows(rows: list[dict], title: str) -> None:
    print(f"\n## {title}")
    print("| call | path | host us/call |\n|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['how']} | {r['us']:.1f} |")


@contextlib.contextmanager
def _proxy_launches(replayed: list[float] | None = None):
    """CPU proxy of the fused path: Triton's path forced (the interpreter never runs: launches stop where Triton's
    C launcher would run and are recorded as compiled ones: ``_null_launches``, which appends each replay's time to
    ``replayed``)."""
    from ..kernels import api, direct, fused, triton_fused
    from ..kernels.dispatch import Backend

    hopper = Backend("triton", "cpu proxy", (9, 0))
    saved = fused._triton, fused.choose_backend, api.choose_backend, direct.choose_backend, triton_fused._resident
    # direct's too: a LinearPlan made on the CPU would otherwise take the twin's path (Int8Linear.forward's layers);
    # the persistent row kernels' occupancy query compiles for a GPU: unknown here (as offline), once per key anyway
    fused._triton, fused.choose_backend, api.choose_backend, direct.choose_backend, triton_fused._resident = (
        (lambda d: True), (lambda d: hopper), (lambda d: hopper), (lambda d: hopper), (lambda *a: 0))
    try:
        with _null_launches(replayed):
            yield
    finally:
        (fused._triton, fused.choose_backend, api.choose_backend, direct.choose_backend,
         triton_fused._resident) = saved


def cpu_proxy() -> int:
    """CPU-proxy numbers (no GPU): the layer table with null kernels, and the launch side with null launches."""
    if not _comfyui():
        print("--cpu-proxy needs COMFYUI_PATH (ComfyUI's Linear and cast path)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    with _null_kernels():
        rows = layer_rows("cpu", k=64, n=64, calls=3000)
    print_layer_rows([r for r in rows if "twin" not in r["part"]],
                     "CPU proxy, layer side (K = N = 64, the twin kernel returns at once; F.linear rows are real)")
    rows = launch_rows()
    print("\n## CPU proxy, launch side (K = N = 3072; both stop where Triton's C launcher would run)")
    print("| part | M | host us/call |\n|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r['m']} | {r['us']:.1f} |")
    with _proxy_launches():
        rows = fused_rows("cpu", calls=200)
    print_fused_rows(rows, "CPU proxy, fused blocks (real widths on CPU tensors; launches stop where Triton's C "
                           "launcher would run; no kernel runs)")
    return 0


@contextlib.contextmanager
def _null_attention():
    """ComfyUI's SDPA call returns an uninitialized output of its shape at once: its compute on the CPU (real,
    at the tiny configs' token counts) is not host cost a GPU step pays; the Python around it still runs."""
    import comfy.ops

    sdpa = comfy.ops.scaled_dot_product_attention
    comfy.ops.scaled_dot_product_attention = lambda q, k, v, *a, **kw: q.new_empty((*q.shape[:-1], v.shape[-1]))
    try:
        yield
    finally:
        comfy.ops.scaled_dot_product_attention = sdpa


def cpu_proxy_step(arch_key: str, layers: int, reps: int = 25, cprofile_rows: int = 0,
                   backend: str | None = None) -> dict:
    """CPU proxy of a whole step: the pack's load (converted on load, fused blocks) of ``arch_key``'s tiny
    config with ``layers`` blocks, one ``apply_model`` step as samplers call it (ComfyUI's model code, the block
    hooks, the fused-block glue, the replays, ComfyUI's attention function up to its SDPA call), launches stopped
    where Triton's C launcher would run and the SDPA call returning at once (``_null_attention``). What a GPU adds
    per block on top: the C launches (~5 us each) and cuDNN's attention call. Layers ComfyUI runs in float (Z-Image's
    refiners, embedders) compute for real on the CPU: compare a change's before and after, not architectures.
    Returns ``{"ms_min", "ms_median", "us_per_block", "launch_path_per_step", "first_launch_ms"}`` (host time of
    one step, per block including the step's fixed part, the minimum being the steadier number on a shared machine;
    INT8 linears a step runs through the launch path instead of a replay; the median time from the step's start to
    its first replayed pack launch, before which a GPU has none of the pack's kernels to run); ``cprofile_rows``:
    also print a cProfile of 5 steps. ``backend``: the step under the stock TorchCompileModel node with this
    torch.compile backend (None: eager); a compiled step's first launch waits for Dynamo's guards, the graph's input
    asserts and its wrapper (bench/NOTES.md item 87), and its float ops run as Inductor's CPU kernels."""
    from . import arch_models, bench_arch, flux2_model, guard_report

    flux2_model.setup_comfyui(cpu=True)
    torch.set_num_threads(1)
    arch = guard_report._arch(arch_key, True, layers)
    patcher, _ = bench_arch.build("pack-convert", arch, True, "auto")
    inputs = arch_models.step_inputs(patcher, arch.step_shape(True), "cpu")
    api = kernels.api
    linear_impl, launch_path = api.int8_linear_impl, []

    def counted(*args, **kwargs):  # an INT8 linear through the launch path (not replayed)
        launch_path.append(1)
        return linear_impl(*args, **kwargs)

    api.int8_linear_impl = counted
    replayed: list[float] = []
    try:
        with _proxy_launches(replayed), _replay(True), _null_attention():
            model = patcher
            if backend is not None:
                from . import bench_model

                torch._dynamo.reset()
                model = bench_model.compiled(patcher, backend)
            times, first = _proxy_steps(model, inputs, reps, cprofile_rows, replayed)
    finally:
        api.int8_linear_impl = linear_impl
    return {"ms_min": min(times), "ms_median": statistics.median(times), "us_per_block": min(times) / layers * 1e3,
            "launch_path_per_step": len(launch_path) / (reps + 3 + (5 if cprofile_rows else 0)),
            "first_launch_ms": statistics.median(first) if first else None}


def _proxy_steps(patcher, inputs, reps: int, cprofile_rows: int,
                 replayed: list[float]) -> tuple[list[float], list[float]]:
    """``reps`` timed steps after three untimed ones: each step's ms, and the ms from its start to its first
    replayed launch (``replayed``, filled by the null launcher) where it replayed any."""
    from . import bench_model

    for _ in range(3):
        bench_model.step(patcher, inputs)
    times, first = [], []
    for _ in range(reps):
        replayed.clear()
        t0 = time.perf_counter()
        bench_model.step(patcher, inputs)
        times.append((time.perf_counter() - t0) * 1e3)
        if replayed:
            first.append((replayed[0] - t0) * 1e3)
    if cprofile_rows:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            bench_model.step(patcher, inputs)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(cprofile_rows)
    return times, first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-proxy", action="store_true", help="CPU tensors, no GPU: the Python layers only")
    parser.add_argument("--cpu-proxy-step", metavar="ARCH", default=None,
                        help="CPU proxy of one step (eager, or compiled with --compile) of a tiny ARCH "
                             "(bench/arch_models.py) with --layers blocks")
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--cprofile", type=int, default=0, metavar="ROWS", help="with --cpu-proxy-step: a cProfile")
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="with --cpu-proxy-step: the step under TorchCompileModel with this backend (inductor)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.cpu_proxy_step:
        r = cpu_proxy_step(args.cpu_proxy_step, args.layers, cprofile_rows=args.cprofile, backend=args.compile)
        first = "no" if r["first_launch_ms"] is None else f"{r['first_launch_ms']:.2f} ms to the"
        print(f"{args.cpu_proxy_step}, {args.layers} blocks{f' ({args.compile})' if args.compile else ''}: "
              f"{first} first pack launch; step host {r['ms_min']:.2f} ms (min; median {r['ms_median']:.2f}), "
              f"{r['us_per_block']:.0f} us per block, {r['launch_path_per_step']:g} INT8 linears a step on the "
              "launch path")
        return 0
    if args.cpu_proxy:
        return cpu_proxy()
    if not torch.cuda.is_available():
        print("profile_host needs a CUDA GPU (or --cpu-proxy)", file=sys.stderr)
        return 2
    m, k, n = 1, 4096, 24576
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, s = kernels.quantize_weight(w)
    backend = dispatch.choose_backend(x.device)
    xq, xs = triton_quant.quantize_rows(x)
    xs = xs.reshape(-1)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    cfg = backend.table.pick(m, tma_ok=False)
    x3, mod = x.reshape(1, m, k), torch.zeros(1, 1, k, device="cuda", dtype=torch.bfloat16)
    parts = {
        "F.linear bf16": lambda: F.linear(x, w),
        "int8_linear (public)": lambda: kernels.int8_linear(x, q, s),
        "triton_ops.int8_linear (no checks)": lambda: triton_ops.int8_linear(
            x, q, s, None, torch.bfloat16, None, 0, backend),
        "checks only": lambda: _checks.check_linear_args(x, q, s, None, None, None, 0),
        "choose_backend": lambda: dispatch.choose_backend(x.device),
        "quantize launch": lambda: triton_quant.launch_quantize(x, xq, xs),
        "gemm launch": lambda: triton_gemm.gemm(xq, xs, q, s.reshape(-1), None, out, cfg),
        # the dispatcher's cost for a custom op (what compiled graphs call) next to the direct call
        "int8_gemm impl (direct)": lambda: kernels.api.int8_gemm_impl(xq, xs, q, s, None, torch.bfloat16, False),
        "int8_gemm op (torch.ops)": lambda: torch.ops.int8_w8a8.int8_gemm(xq, xs, q, s, None, torch.bfloat16, False,
                                                                          None, None),
        "norm_modulate_quantize impl": lambda: kernels.fused.norm_modulate_quantize_impl(x3, mod, mod, 1e-6),
        "norm_modulate_quantize op": lambda: torch.ops.int8_w8a8.norm_modulate_quantize(x3, mod, mod, 1e-6, 0),
        "3x torch.empty": lambda: (torch.empty((m, k), dtype=torch.int8, device="cuda"),
                                   torch.empty((m,), dtype=torch.float32, device="cuda"),
                                   torch.empty((m, n), dtype=torch.bfloat16, device="cuda")),
    }
    print(common.environment())
    for label, fn in parts.items():
        print(f"{label:<40} {_us_per_call(fn):8.1f} us/call")
    for label in ("int8_linear (public)", "F.linear bf16"):
        fn = parts[label]
        ms_events = common.bench_ms(fn)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms_graph = common.bench_ms(graph.replay)
        print(f"{label:<40} do_bench {ms_events * 1e3:7.1f} us   CUDA graph replay {ms_graph * 1e3:7.1f} us")
    prof = cProfile.Profile()
    fn = parts["int8_linear (public)"]
    prof.enable()
    for _ in range(500):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    if not _comfyui():
        print("COMFYUI_PATH not set: no layer table")
        return 0
    rows = layer_rows("cuda")
    print_layer_rows(rows, "One layer as ComfyUI runs it (K = N = 3072), host us per call")
    _, int8, _ = layers("cuda", 3072, 3072)
    x = torch.randn(1, 1, 3072, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        int8(x)
        int8(x)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            int8(x)
        prof.disable()
    torch.cuda.synchronize()
    print("\n## cProfile: Int8Linear resident (plan), M = 1")
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    frows = fused_rows("cuda")
    print_fused_rows(frows, "Fused blocks, eager (1024x1024 widths), host us per call (GPU idle at each start)")
    if args.out:
        common.write_json(args.out, {"env": common.environment(), "rows": rows, "fused_rows": frows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
