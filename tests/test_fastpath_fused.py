"""The eager hot path of fused blocks: ``direct.Replayer`` for kernels/fused.py's public functions and the
``LinearPlan`` GEMMs ``Int8Linear.run_quantized`` runs for a resident layer.

Kernel tier (Triton under TRITON_INTERPRET=1 on the CPU, compiled on a GPU): the first call of a specialization
checks and records, later calls replay with this call's tensors; every result must equal the launch path's
(``*_impl``, what the custom ops run) bit for bit on fresh inputs, for views into an argument (SwiGLU's up half,
a fused qkv split), rotations, broadcast gates and both GEMM kernels. Bad input still raises the checks'
ValueErrors; copies the launch path makes are never replayed; nothing of a call is kept alive.
Integration tier (a real ComfyUI): which path ``run_quantized`` takes and that both paths agree.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from int8_w8a8.kernels import api, direct, fused
from int8_w8a8.kernels import reference as ref
from int8_w8a8.kernels.dispatch import Backend

from .conftest import KERNEL_DEVICE

DEV = KERNEL_DEVICE
HOPPER = Backend("triton", "test", (9, 0))
BF16 = torch.bfloat16


@pytest.fixture
def replay(monkeypatch, triton_gemms):
    """The Triton kernels (``triton_gemms``) with replay on and empty tables for fused.py's replayers."""
    for rep in (*fused.REPLAYERS, api._rows_replayer()):
        monkeypatch.setattr(rep, "enabled", True)
        monkeypatch.setattr(rep, "table", {})
    return fused


def _recorded(rep: direct.Replayer) -> list:
    return [type(v).__name__ for v in rep.table.values()]


def _equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _equal(x, y)


def _pe(b: int, s: int, d: int) -> torch.Tensor:
    ang = torch.randn(b, s, d // 2, dtype=torch.float64) * 3
    c, sn = torch.cos(ang), torch.sin(ang)
    return torch.stack([c, -sn, sn, c], dim=-1).reshape(b, 1, s, d // 2, 2, 2).float().to(DEV)


# ---------------------------------------------------------------------------------------------------- kernels
@pytest.mark.kernels
@pytest.mark.parametrize("norm,shift,weight,group", [("layer", True, False, 0), ("rms", False, True, 64),
                                                      ("layer", True, True, 0)])
def test_norm_modulate_quantize_replays_bit_identical(seed, replay, norm, shift, weight, group):
    b, s, k = 2, 5, 128
    w = torch.rand(k, device=DEV, dtype=BF16) + 0.5 if weight else None
    for call in range(3):
        x = torch.randn(b, s, k, device=DEV, dtype=BF16) * 3
        x[0, 1] = 0  # an all-zero row
        mod = torch.randn(b, 1, 2 * k, device=DEV, dtype=BF16)  # shift and scale: views into one tensor
        sh, sc = (mod[..., :k], mod[..., k:]) if shift else (None, mod[..., k:])
        got = fused.norm_modulate_quantize(x, sh, sc, 1e-6, rotate_group=group, norm=norm, weight=w)
        _equal(got, fused.norm_modulate_quantize_impl(x, sh, sc, 1e-6, group, norm, w))
        assert _recorded(fused._NORM_MODULATE) == ["_Recorded"], call


@pytest.mark.kernels
@pytest.mark.parametrize("form", ["swiglu", "pair", "gelu_prefix"])
def test_glu_quantize_replays_bit_identical(seed, replay, form):
    m, f, p = 9, 128, 64
    for _ in range(3):
        if form == "swiglu":  # the up half is a view into the argument at an offset
            wide = torch.randn(m, 2 * f + 16, device=DEV, dtype=BF16)
            args, kw = (None, wide[:, :2 * f]), {"rotate_group": 64}
        elif form == "pair":
            pair = (torch.randn(m, f, device=DEV, dtype=BF16), torch.randn(m, f, device=DEV, dtype=BF16))
            args, kw = (None, pair), {}
        else:
            args = (torch.randn(m, p, device=DEV, dtype=BF16), torch.randn(m, f, device=DEV, dtype=BF16))
            kw = {"activation": "gelu_tanh"}
        got = fused.glu_quantize(*args, **kw)
        glu, up = args[1] if isinstance(args[1], tuple) else (args[1], None)
        _equal(got, fused.glu_quantize_impl(args[0], glu, kw.get("rotate_group", 0), kw.get("activation", "swiglu"),
                                            up))
    assert _recorded(fused._GLU) == ["_Recorded"]


@pytest.mark.kernels
@pytest.mark.parametrize("fused_qkv", [True, False])
def test_qk_norm_rope_replays_bit_identical(seed, replay, fused_qkv):
    b, heads, d, s_txt, s_img = 2, 2, 16, 3, 8
    total = s_txt + s_img
    for _ in range(2):
        pe = _pe(b, total, d)
        bufs = [tuple(torch.empty(b, total, heads, d, device=DEV, dtype=BF16).transpose(1, 2) for _ in range(3))
                for _ in range(2)]
        for off, s in ((0, s_txt), (s_txt, s_img)):
            if fused_qkv:
                qkv = torch.randn(b, s, 3 * heads * d + 8, device=DEV, dtype=BF16)[..., :3 * heads * d]
            else:
                qkv = tuple(torch.randn(b, s, heads * d, device=DEV, dtype=BF16) for _ in range(3))
            qw, kw = (torch.rand(d, device=DEV, dtype=BF16) + 0.5 for _ in range(2))
            fused.qk_norm_rope(qkv, qw, kw, pe, *bufs[0], seq_off=off, heads=heads, eps_q=1e-6, eps_k=1e-5)
            fused.qk_norm_rope_impl(*fused.split_qkv(qkv), qw, kw, pe, *bufs[1], off, heads, 1e-6, 1e-5)
        for got, want in zip(*bufs, strict=True):
            _equal(got, want)
    assert _recorded(fused._QK_NORM_ROPE) == ["_Recorded", "_Recorded"]  # one per stream length


@pytest.mark.kernels
def test_qk_norm_rope_in_place_replays(seed, replay):
    """In place (q, k, v the packed projection's own views: Z-Image) replays with each call's address, and is
    its own specialization: the same views of another packed buffer (not the projection) still get v copied."""
    b, heads, d, s = 2, 2, 16, 9
    pe = _pe(b, s, d)
    qw, kw = (torch.rand(d, device=DEV, dtype=BF16) + 0.5 for _ in range(2))

    def heads_views(t):
        return [x.view(b, s, heads, d).transpose(1, 2) for x in fused.split_qkv(t)]

    for _ in range(3):
        qkv = torch.randn(b, s, 3 * heads * d, device=DEV, dtype=BF16)
        source = qkv.clone()
        want = [torch.empty_like(t) for t in heads_views(qkv)]
        fused.qk_norm_rope_impl(*fused.split_qkv(source), qw, kw, pe, *want, 0, heads, 1e-6, 1e-5)
        fused.qk_norm_rope(qkv, qw, kw, pe, *heads_views(qkv), seq_off=0, heads=heads, eps_q=1e-6, eps_k=1e-5)
        for got, ref_ in zip(heads_views(qkv), want, strict=True):
            assert torch.equal(got, ref_)
        other = torch.zeros_like(qkv)  # same strides, another address: v must be copied
        fused.qk_norm_rope(source, qw, kw, pe, *heads_views(other), seq_off=0, heads=heads, eps_q=1e-6, eps_k=1e-5)
        for got, ref_ in zip(heads_views(other), want, strict=True):
            assert torch.equal(got, ref_)
    assert _recorded(fused._QK_NORM_ROPE) == ["_Recorded", "_Recorded"]  # in place, and not


@pytest.mark.kernels
def test_rms_norm_gate_add_replays_bit_identical(seed, replay):
    b, s, n = 2, 6, 96
    for _ in range(3):
        x, y = torch.randn(b, s, n, device=DEV, dtype=BF16), torch.randn(b * s, n, device=DEV, dtype=BF16)
        w, gate = torch.rand(n, device=DEV, dtype=BF16), torch.randn(1, 1, n, device=DEV, dtype=BF16)  # broadcast
        _equal(fused.rms_norm_gate_add(x, y, w, gate, 1e-5), fused.rms_norm_gate_add_impl(x, y, w, gate, 1e-5))
    assert _recorded(fused._NORM_GATE_ADD) == ["_Recorded"]


@pytest.mark.kernels
@pytest.mark.parametrize("group", [0, 64])
def test_rms_norm_gate_add_quantize_replays_bit_identical(seed, replay, group):
    b, s, n = 2, 6, 128
    for _ in range(3):
        x, y = torch.randn(b, s, n, device=DEV, dtype=BF16), torch.randn(b * s, n, device=DEV, dtype=BF16)
        pw, w = (torch.rand(n, device=DEV, dtype=BF16) + 0.5 for _ in range(2))
        gate, sc = torch.randn(b, 1, n, device=DEV, dtype=BF16).tanh(), torch.randn(b, n, device=DEV, dtype=BF16)
        _equal(fused.rms_norm_gate_add_quantize(x, y, pw, gate, 1e-5, sc, 1e-6, weight=w, rotate_group=group),
               fused.rms_norm_gate_add_quantize_impl(x, y, pw, gate, 1e-5, sc, 1e-6, w, group))
    assert _recorded(fused._NORM_GATE_ADD_QUANT) == ["_Recorded"]


@pytest.mark.kernels
@pytest.mark.parametrize("group", [0, 128])
def test_quantize_rows_replays_bit_identical(seed, replay, group):
    """The public quantizer (a fused block's attention output rows) replays without smoothing."""
    import int8_w8a8.kernels as kernels

    before = direct.counts()
    for _ in range(3):
        x = torch.randn(2, 7, 256, device=DEV, dtype=BF16)
        _equal(kernels.quantize_rows(x, rotate_group=group), api.quantize_rows_impl(x, None, group))
    assert _recorded(api._rows_replayer()) == ["_Recorded"]
    # one recording, two replays: what a benchmark reads around each step (bench_model.measure)
    assert {k: v - before[k] for k, v in direct.counts().items()} == {"recorded": 1, "cleared": 0, "unreplayed": 0}
    with pytest.raises(ValueError, match="rotate_group"):
        kernels.quantize_rows(x, rotate_group=96)


def _rows_and_weight(m: int, k: int, n: int):
    q, scale = ref.quantize_weight(torch.randn(n, k, device=DEV) * 0.05)
    x = torch.randn(1, m, k, device=DEV, dtype=BF16)
    xq, xs = fused.norm_modulate_quantize_impl(x, None, torch.zeros(1, 1, k, device=DEV, dtype=BF16), 1e-6)
    return xq, xs, q, scale


@pytest.mark.kernels
@pytest.mark.parametrize("m", [5, 40], ids=["generic", "tma"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_plan_gemms_on_quantized_rows_replay_bit_identical(seed, replay, m, with_bias):
    """``LinearPlan.gemm`` / ``gemm_residual`` (run_quantized's resident path) and the public fused GEMMs they
    call (also run_quantized's cast path), replayed, against the launch path."""
    k, n = 96, 48
    _, _, q, scale = _rows_and_weight(1, k, n)
    bias = torch.randn(n, device=DEV, dtype=BF16) if with_bias else None
    plan = direct.LinearPlan(q, scale, bias, backend=HOPPER)
    for _ in range(3):
        xq, xs, _, _ = _rows_and_weight(m, k, n)
        want = api.int8_gemm_impl(xq, xs.reshape(-1, 1), q, scale, bias, BF16, False)
        _equal(plan.gemm(xq, xs, BF16), want)
        _equal(fused.int8_gemm(xq, xs, q, scale, bias, BF16), want)
        res = torch.randn(2, m // 2 + 0, n, device=DEV, dtype=BF16) if m % 2 == 0 else None
        if res is not None:
            gate = torch.randn(2, 1, n, device=DEV, dtype=BF16)
            a, c, d = res.clone(), res.clone(), res.clone()
            fused.int8_gemm_residual_impl(xq, xs, q, scale, bias, a, gate)
            assert plan.gemm_residual(xq, xs, BF16, c, gate) is c
            fused.int8_gemm_residual(xq, xs, q, scale, bias, d, gate)
            _equal(c, a)
            _equal(d, a)
    assert _recorded(fused._GEMM) == ["_Recorded"]
    assert _recorded(fused._GEMM_RESIDUAL) == (["_Recorded"] if m % 2 == 0 else [])


@pytest.mark.kernels
def test_bad_input_raises_after_a_recorded_call(seed, replay):
    """The checks are skipped only for a specialization that passed them: bad input still raises their errors."""
    x, mod = torch.randn(1, 4, 128, device=DEV, dtype=BF16), torch.randn(1, 1, 128, device=DEV, dtype=BF16)
    fused.norm_modulate_quantize(x, mod, mod.clone())
    fused.norm_modulate_quantize(x, mod, mod.clone())
    with pytest.raises(ValueError, match="scale: expected"):
        fused.norm_modulate_quantize(x, mod, mod[..., :64])
    with pytest.raises(ValueError, match="rotate_group"):
        fused.norm_modulate_quantize(x, mod, mod.clone(), rotate_group=96)
    glu = torch.randn(4, 64, device=DEV, dtype=BF16)
    fused.glu_quantize(None, glu)
    with pytest.raises(ValueError, match="last dim must be even"):
        fused.glu_quantize(None, glu[:, :63])
    _, _, q, scale = _rows_and_weight(1, 64, 32)
    xq, xs, _, _ = _rows_and_weight(6, 64, 32)
    res, gate = torch.zeros(2, 3, 32, device=DEV, dtype=BF16), torch.ones(2, 1, 32, device=DEV, dtype=BF16)
    plan = direct.LinearPlan(q, scale, None, backend=HOPPER)
    plan.gemm_residual(xq, xs, BF16, res, gate)
    with pytest.raises(ValueError, match="residual: expected a contiguous"):
        plan.gemm_residual(xq, xs, BF16, res.transpose(1, 2), gate)
    with pytest.raises(ValueError, match="gate: expected"):
        plan.gemm_residual(xq, xs, BF16, res, gate[..., :16])


@pytest.mark.kernels
def test_copies_are_not_replayed_and_shared_addresses_are_keyed(seed, replay):
    """A launch that reads a copy the launch path made (modulation rows with different strides: made contiguous)
    runs through the launch path on every call, still correct. Two arguments at one address (shift and scale one
    tensor) replay, as a specialization of their own: the same call with two tensors records another."""
    b, s, k = 2, 3, 64
    for _ in range(2):
        x = torch.randn(b, s, k, device=DEV, dtype=BF16)
        sh = torch.randn(b, 1, k, device=DEV, dtype=BF16)
        sc = torch.randn(b, 2 * k, device=DEV, dtype=BF16)[:, :k]  # another row stride than sh: both copied
        _equal(fused.norm_modulate_quantize(x, sh, sc), fused.norm_modulate_quantize_impl(x, sh, sc, 1e-6))
        mod = torch.randn(b, 1, k, device=DEV, dtype=BF16)
        _equal(fused.norm_modulate_quantize(x, mod, mod), fused.norm_modulate_quantize_impl(x, mod, mod, 1e-6))
    assert _recorded(fused._NORM_MODULATE) == ["NoneType", "_Recorded"]
    for _ in range(2):
        x = torch.randn(b, s, k, device=DEV, dtype=BF16)
        sh, sc = (torch.randn(b, 1, k, device=DEV, dtype=BF16) for _ in range(2))
        _equal(fused.norm_modulate_quantize(x, sh, sc), fused.norm_modulate_quantize_impl(x, sh, sc, 1e-6))
    assert _recorded(fused._NORM_MODULATE) == ["NoneType", "_Recorded", "_Recorded"]


@pytest.mark.kernels
def test_replays_keep_no_call_tensor_alive(seed, replay):
    """Recorded launches must not hold a call's inputs or outputs (activations: hundreds of MB at video sizes)."""
    k, n = 64, 32
    _, _, q, scale = _rows_and_weight(1, k, n)
    plan = direct.LinearPlan(q, scale, None, backend=HOPPER)
    for _ in range(3):
        x = torch.randn(1, 8, k, device=DEV, dtype=BF16)
        mod = torch.randn(1, 1, k, device=DEV, dtype=BF16)
        xq, xs = fused.norm_modulate_quantize(x, None, mod)
        y = plan.gemm(xq, xs, BF16)
        refs = [weakref.ref(t) for t in (x, mod, xq, xs, y)]
        del x, mod, xq, xs, y
        gc.collect()
        assert [r() for r in refs] == [None] * 5


@pytest.fixture
def own_ops():
    """``torch.ops.int8_w8a8`` bound to this copy of the package. A test that loads the repository as a ComfyUI
    custom node imports a second copy, whose ``kernels/library.py`` registers the same op names again: the last
    registration wins, and its bodies would run that copy's (unpatched) dispatch."""
    import importlib

    from torch._library.custom_ops import OPDEFS

    from int8_w8a8.kernels import library

    if OPDEFS.get("int8_w8a8::int8_gemm") is not library.int8_gemm_op:
        importlib.reload(library)
    return torch.ops.int8_w8a8


@pytest.mark.kernels
def test_custom_ops_replay_like_eager_calls(seed, replay, own_ops):
    """A compiled graph runs the ``int8_w8a8::*`` ops' bodies: they take the same replayed path as eager calls
    (the launch path cost ~100 us of host per op, enough to make a compiled Qwen-Image step host-bound), with
    results equal to the launch path's and the op's own mutation semantics."""
    ops = own_ops
    b, s, k, n = 1, 6, 64, 32
    _, _, q, scale = _rows_and_weight(1, k, n)
    w = torch.rand(k, device=DEV, dtype=BF16) + 0.5
    for _ in range(2):
        x = torch.randn(b, s, k, device=DEV, dtype=BF16)
        mod = torch.randn(b, 1, 2 * k, device=DEV, dtype=BF16)
        xq, xs = ops.norm_modulate_quantize(x, mod[..., :k], mod[..., k:], 1e-6, 0, "rms", w)
        _equal((xq, xs), fused.norm_modulate_quantize_impl(x, mod[..., :k], mod[..., k:], 1e-6, 0, "rms", w))
        y = ops.int8_gemm(xq, xs.reshape(-1, 1), q, scale, None, BF16, False, None, None)
        _equal(y, api.int8_gemm_impl(xq, xs.reshape(-1, 1), q, scale, None, BF16, False))
        g = torch.randn(b, s, 2 * k, device=DEV, dtype=BF16)
        _equal(ops.glu_quantize(None, g, 0, "swiglu", None), fused.glu_quantize_impl(None, g, 0, "swiglu"))
        gate = torch.randn(b, 1, k, device=DEV, dtype=BF16)
        _equal(ops.rms_norm_gate_add(x, g[..., :k], w, gate, 1e-6),
               fused.rms_norm_gate_add_impl(x, g[..., :k], w, gate, 1e-6))
        res = torch.randn(b, s, n, device=DEV, dtype=BF16)
        expect = res.clone()
        fused.int8_gemm_residual_impl(xq, xs, q, scale, None, expect, gate[..., :n])
        ops.int8_gemm_residual(xq, xs, q, scale, None, res, gate[..., :n], None, None)
        _equal(res, expect)
        # an unfused INT8 linear in a compiled graph (Qwen-Image's modulation): its rows' quantization and GEMM
        # replayed, with and without a dynamic LoRA term (rank 16: padded as lora/dynamic.py pads it; an unpadded
        # rank makes the launch path pad a copy, which is not replayed)
        bias = torch.randn(n, device=DEV, dtype=BF16)
        a, bb = torch.randn(16, k, device=DEV, dtype=BF16) * 0.1, torch.randn(n, 16, device=DEV, dtype=BF16) * 0.1
        _equal(ops.int8_linear(x, q, scale, bias, BF16, None, 0, False, None, None),
               api.int8_linear_impl(x, q, scale, bias, BF16, None, 0, False))
        _equal(ops.int8_linear(x, q, scale, None, BF16, None, 0, False, a, bb),
               api.int8_linear_impl(x, q, scale, None, BF16, None, 0, False, a, bb))
    for rep in (fused._NORM_MODULATE, fused._GLU, fused._NORM_GATE_ADD, fused._GEMM_RESIDUAL, api._rows_replayer()):
        assert _recorded(rep) == ["_Recorded"], rep.name
    assert _recorded(fused._GEMM) == ["_Recorded"] * 3, "int8_gemm: the fused GEMM and int8_linear's two"


@pytest.mark.unit
def test_alias_pattern_of_a_call():
    """The key part for arguments at one address: None when all addresses differ (absent arguments aside), else
    each argument's first index at its address."""
    assert direct._aliases([16, 32, None, None, 48]) is None
    assert direct._aliases([None, None]) is None
    assert direct._aliases([16, None, 16, 32, None]) == (0, None, 0, 3, None)
    assert direct._aliases([16, 32, 32, 16]) == (0, 1, 1, 0)


@pytest.mark.unit
def test_module_replayers_are_off_under_the_interpreter():
    """The module-level tables would outlive tests that patch the launch path: recorded only on a GPU (or where
    a test switches them on)."""
    import os

    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    assert all(rep.enabled is not interpreted for rep in (*fused.REPLAYERS, api._rows_replayer()))
    assert direct.Replayer("a test's own").enabled


# ---------------------------------------------------------------------------------------------------- ComfyUI
def _layer(k: int = 64, n: int = 48):
    from int8_w8a8.ops import layout
    from int8_w8a8.ops.comfy_ops import make_operations
    from int8_w8a8.ops.config import ConvertOptions, LoadConfig

    ops = make_operations(LoadConfig(profile=None, convert=ConvertOptions(), source="test"))
    layer = ops.Linear(k, n, bias=True, device=DEV, dtype=BF16)
    q, scale = ref.quantize_weight(torch.randn(n, k, device=DEV) * 0.05)
    layer.weight = torch.nn.Parameter(layout.make_weight(q, scale, BF16), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(n, device=DEV, dtype=BF16), requires_grad=False)
    return layer


@pytest.mark.integration
@pytest.mark.parametrize("residual", [False, True])
def test_resident_run_quantized_skips_the_cast_and_matches_it(seed, replay, cast_calls, residual):
    layer = _layer()
    assert layer.fusable()
    for _ in range(2):
        xq, xs, _, _ = _rows_and_weight(8, 64, 48)
        res = torch.randn(2, 4, 48, device=DEV, dtype=BF16) if residual else None
        gate = torch.randn(2, 1, 48, device=DEV, dtype=BF16) if residual else None
        with torch.inference_mode():
            got = layer.run_quantized(xq, xs, BF16, residual=None if res is None else res.clone(), gate=gate)
            assert cast_calls == []
            layer.comfy_cast_weights = True  # what ComfyUI sets on a layer it offloads: the cast path
            want = layer.run_quantized(xq, xs, BF16, residual=None if res is None else res.clone(), gate=gate)
            layer.comfy_cast_weights = False
        assert cast_calls == [layer]
        cast_calls.clear()
        _equal(got, want)


@pytest.mark.integration
@pytest.mark.parametrize("state", ["weight_function", "force_cast"])
def test_patched_layers_run_quantized_through_the_cast_path(seed, cast_calls, state):
    """Layers ComfyUI patches on the fly or forces to cast are not fusable, but run_quantized called anyway must
    still honour the cast path (no plan)."""
    layer = _layer()
    xq, xs, _, _ = _rows_and_weight(4, 64, 48)
    if state == "weight_function":
        layer.weight_function = [lambda w: w]
    else:
        layer.comfy_force_cast_weights = True
    assert not layer.fusable()
    layer.run_quantized(xq, xs, BF16)
    assert cast_calls == [layer]
