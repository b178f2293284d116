"""A dynamic LoRA term in the fused path: ``Int8Linear.run_quantized`` on rows a fused kernel quantized.

The term's down projection runs on the block's int8 rows (``kernels.fused.lora_down``: ``a`` rotated by the
layer's ConvRot group and quantized per rank, ``ops.lowrank.LowRank.int8_down``) and its up projection in the
GEMM epilogue (``fused.int8_gemm`` / ``int8_gemm_residual`` with ``lora_h``/``lora_b``).

Kernels tier (Triton under TRITON_INTERPRET=1 on the CPU): the GEMMs with a LoRA term, plain and with the gated
residual, against their torch twins and float64, at odd M and K/N that are not multiples of 16, per-row and
per-tensor weights, both GEMM kernels; replayed bit-identical; bad terms raise.
Integration tier (a real ComfyUI): ``run_quantized`` with a term against the layer's own forward with the term
(the unfused path: the term in float on the unquantized input) and against float64, ConvRot groups 0/64/128,
residual form, resident and cast paths alike; which layers stay fusable.
The whole-model checks per architecture are in tests/test_flux_fused.py and tests/test_blocks_*.py.
"""

from __future__ import annotations

import pytest
import torch

from int8_w8a8.kernels import api, fused, reference_fused
from int8_w8a8.kernels import reference as ref
from int8_w8a8.kernels.dispatch import Backend

from .conftest import INTERPRETED, KERNEL_DEVICE, sqnr_db

DEV = KERNEL_DEVICE
HOPPER = Backend("triton", "test", (9, 0))
BF16 = torch.bfloat16



def _term(n: int, k: int, rank: int, rel: float, w: torch.Tensor, gen=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [R, K], b [N, R]) in bf16 whose product has ``rel`` times the norm of ``w``."""
    a = torch.randn(rank, k, generator=gen) / k ** 0.5
    b = torch.randn(n, rank, generator=gen) / rank ** 0.5
    b *= rel * w.float().cpu().norm() / (b @ a).norm()
    return a.to(DEV, BF16), b.to(DEV, BF16)


def _rows(m: int, k: int, group: int = 0):
    x = torch.randn(m, k, device=DEV, dtype=BF16)
    xq, xs = ref.quantize_rows(x, rotate_group=group)
    return x, xq, xs.reshape(-1)


# ---------------------------------------------------------------------------------------------------- kernels
@pytest.mark.kernels
@pytest.mark.parametrize("m", [1, 15, 17, 40])
@pytest.mark.parametrize("k,n", [(88, 50), (128, 64)])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_gemms_with_a_lora_term_match_the_twin_and_float64(seed, triton_gemms, m, k, n, per_row, residual):
    """``lora_down`` then ``int8_gemm`` / ``int8_gemm_residual`` with the term: the Triton kernels against the
    torch twins (equal up to the interpreter's truncating bf16 cast) and float64 on the same int8 operands."""
    from int8_w8a8.ops.lowrank import quantize_down

    w = torch.randn(n, k, device=DEV) / k ** 0.5
    q, ws = ref.quantize_weight(w, per_row=per_row)
    a, b = _term(n, k, 16, 0.5, w)
    down = quantize_down(a, 0)
    _, xq, xs = _rows(m, k)
    bias = torch.randn(n, device=DEV, dtype=BF16) * 0.1
    h = fused.lora_down(xq, xs, down.q, down.scale, BF16)
    h_twin = ref.int8_gemm_unchecked(xq, xs, down.q, down.scale.reshape(-1), None, BF16)
    h64 = (xq.double() @ down.q.double().T) * xs.double()[:, None] * down.scale.double().reshape(1, -1)
    assert h.shape == (m, 16) and h.dtype == BF16
    assert sqnr_db(h64, h) > 40 and sqnr_db(h_twin, h) > 40
    main64 = (xq.double() @ q.double().T) * xs.double()[:, None] * (ws.double().reshape(1, -1) if per_row
                                                                      else ws.double())
    y64 = main64 + bias.double() + h.double() @ b.double().T
    wsr = ws.reshape(-1) if ws.dim() else ws
    if residual:
        bsz = 1 if m % 2 else 2
        res = torch.randn(bsz, m // bsz, n, device=DEV, dtype=BF16)
        gate = torch.randn(bsz, 1, n, device=DEV, dtype=BF16)
        before = res.clone()
        assert fused.int8_gemm_residual(xq, xs, q, ws, bias, res, gate, h, b) is res
        twin = before.clone()
        reference_fused.int8_gemm_residual(xq, xs, q, wsr, bias, twin.view(m, n), gate.reshape(bsz, n), m // bsz, h, b)
        got, want = res, twin
        truth = before.double() + gate.double() * y64.reshape(bsz, m // bsz, n)
        without = before.double() + gate.double() * (main64 + bias.double()).reshape(bsz, m // bsz, n)
    else:
        got = fused.int8_gemm(xq, xs, q, ws, bias, BF16, h, b)
        want = ref.int8_gemm_unchecked(xq, xs, q, wsr, bias, BF16, h, b)
        truth, without = y64, main64 + bias.double()
    assert sqnr_db(want, got) > (40 if INTERPRETED else 45)  # the interpreter's float32 -> bf16 cast truncates
    assert sqnr_db(truth, got) > (40 if INTERPRETED else 45)
    assert sqnr_db(truth, without) < 20  # the term is there (half the weight's norm)


@pytest.mark.kernels
def test_plan_gemms_with_a_lora_term_replay_bit_identical(seed, triton_gemms, monkeypatch):
    """``LinearPlan.gemm`` / ``gemm_residual`` with a term (run_quantized's resident path), replayed, against the
    launch path."""
    from int8_w8a8.kernels import direct

    for rep in fused.REPLAYERS:
        monkeypatch.setattr(rep, "enabled", True)
        monkeypatch.setattr(rep, "table", {})
    m, k, n = 40, 96, 48
    w = torch.randn(n, k, device=DEV) / k ** 0.5
    q, scale = ref.quantize_weight(w)
    plan = direct.LinearPlan(q, scale, None, backend=HOPPER)
    for _ in range(3):
        _, xq, xs = _rows(m, k)
        h, b = torch.randn(m, 16, device=DEV, dtype=BF16), torch.randn(n, 16, device=DEV, dtype=BF16) * 0.1
        want = api.int8_gemm_impl(xq, xs.reshape(-1, 1), q, scale, None, BF16, False, h, b)
        assert torch.equal(plan.gemm(xq, xs, BF16, h, b), want)
        res, gate = torch.randn(2, m // 2, n, device=DEV, dtype=BF16), torch.randn(2, 1, n, device=DEV, dtype=BF16)
        a_res = res.clone()
        fused.int8_gemm_residual_impl(xq, xs, q, scale, None, a_res, gate, h, b)
        assert plan.gemm_residual(xq, xs, BF16, res, gate, h, b) is res and torch.equal(res, a_res)
    assert [type(v).__name__ for v in fused._GEMM.table.values()] == ["_Recorded"]
    assert [type(v).__name__ for v in fused._GEMM_RESIDUAL.table.values()] == ["_Recorded"]


@pytest.mark.kernels
@pytest.mark.parametrize("group", [0, 64])
def test_plan_linear_with_a_lora_term_is_the_public_api_replayed(seed, triton_gemms, monkeypatch, group):
    """``LinearPlan.linear_lora`` (an unfused resident layer with a dynamic LoRA term) gives bit for bit what the
    public ``int8_linear`` with the term gives, call after call (replayed), for 3-D inputs; a smoothed weight is
    left to the public API (None)."""
    from int8_w8a8.kernels import api as api_mod
    from int8_w8a8.kernels import direct

    for rep in (*fused.REPLAYERS, api_mod._rows_replayer()):
        monkeypatch.setattr(rep, "enabled", True)
        monkeypatch.setattr(rep, "table", {})
    k, n = 128, 40
    w = torch.randn(n, k, device=DEV) / k ** 0.5
    q, scale = ref.quantize_weight(w, rotate_group=group)
    bias = torch.randn(n, device=DEV, dtype=BF16) * 0.1
    a, b = _term(n, k, 16, 0.3, w)
    plan = direct.LinearPlan(q, scale, bias, rotate_group=group, backend=HOPPER)
    for m in (1, 17, 17):
        x = torch.randn(2, m, k, device=DEV, dtype=BF16)
        want = api_mod.int8_linear_impl(x, q, scale, bias, BF16, None, group, False, a, b)
        got = plan.linear_lora(x, a, b)
        assert got.shape == (2, m, n) and torch.equal(got, want)
    b32 = b.float()  # a term kept in float32 for bf16 activations: cast as the public API casts it
    assert torch.equal(plan.linear_lora(x, a, b32), api_mod.int8_linear_impl(x, q, scale, bias, BF16, None, group,
                                                                              False, a, b32))
    assert direct.LinearPlan(q, scale, bias, smooth=torch.ones(k, device=DEV), rotate_group=group,
                             backend=HOPPER).linear_lora(x, a, b) is None


@pytest.mark.kernels
@pytest.mark.parametrize("residual", [False, True])
def test_a_lora_term_given_as_columns_of_a_wider_h(seed, triton_gemms, residual):
    """``lora_h`` as a column slice of a stacked down projection (``comfy_ops.run_quantized_shared``: row stride
    larger than R) gives the GEMMs exactly what a contiguous ``lora_h`` gives, with no copy."""
    m, k, n = 33, 96, 40
    q, scale = ref.quantize_weight(torch.randn(n, k, device=DEV) / k ** 0.5)
    _, xq, xs = _rows(m, k)
    wide = torch.randn(m, 48, device=DEV, dtype=BF16)
    h, b = wide[:, 16:32], torch.randn(n, 16, device=DEV, dtype=BF16) * 0.1
    assert h.stride() == (48, 1)
    if residual:
        res, gate = torch.randn(1, m, n, device=DEV, dtype=BF16), torch.randn(1, 1, n, device=DEV, dtype=BF16)
        want = res.clone()
        fused.int8_gemm_residual(xq, xs, q, scale, None, want, gate, h.contiguous(), b)
        fused.int8_gemm_residual(xq, xs, q, scale, None, res, gate, h, b)
        assert torch.equal(res, want)
    else:
        assert torch.equal(fused.int8_gemm(xq, xs, q, scale, None, BF16, h, b),
                           fused.int8_gemm(xq, xs, q, scale, None, BF16, h.contiguous(), b))


@pytest.mark.kernels
def test_bad_lora_terms_raise(seed):
    _, xq, xs = _rows(6, 64)
    q, scale = ref.quantize_weight(torch.randn(32, 64, device=DEV))
    h, b = torch.randn(6, 16, device=DEV, dtype=BF16), torch.randn(32, 16, device=DEV, dtype=BF16)
    with pytest.raises(ValueError, match="give both"):
        fused.int8_gemm(xq, xs, q, scale, None, BF16, h, None)
    with pytest.raises(ValueError, match=r"expected \[6, R\] and \[32, R\]"):
        fused.int8_gemm(xq, xs, q, scale, None, BF16, h[:5], b)
    with pytest.raises(ValueError, match="one float16/bfloat16/float32 dtype"):
        fused.int8_gemm(xq, xs, q, scale, None, BF16, h, b.float())
    res, gate = torch.zeros(2, 3, 32, device=DEV, dtype=BF16), torch.ones(2, 1, 32, device=DEV, dtype=BF16)
    with pytest.raises(ValueError, match=r"expected \[6, R\] and \[32, R\]"):
        fused.int8_gemm_residual(xq, xs, q, scale, None, res, gate, h, b[:, :8])


# ---------------------------------------------------------------------------------------------------- ComfyUI
def _layer(k: int, n: int, per_row: bool = True, group: int = 0):
    """An Int8Linear (the pack's operations) with a random INT8 weight (rotated by ``group``) and a bf16 bias."""
    from int8_w8a8 import kernels
    from int8_w8a8.ops import layout
    from int8_w8a8.ops.comfy_ops import make_operations
    from int8_w8a8.ops.config import ConvertOptions, LoadConfig

    ops = make_operations(LoadConfig(profile=None, convert=ConvertOptions(), source="test"))
    layer = ops.Linear(k, n, bias=True, device=DEV, dtype=BF16)
    q, scale = kernels.quantize_weight(torch.randn(n, k, device=DEV) / k ** 0.5, per_row=per_row, rotate_group=group)
    layer.weight = torch.nn.Parameter(layout.make_weight(q, scale, BF16, rotate_group=group), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.randn(n, device=DEV, dtype=BF16) * 0.1, requires_grad=False)
    return layer


@pytest.mark.integration
@pytest.mark.parametrize("m", [1, 15, 17])
@pytest.mark.parametrize("group,k,per_row", [(0, 200, True), (0, 200, False), (64, 192, True), (128, 384, True)])
@pytest.mark.parametrize("residual", [False, True])
def test_run_quantized_adds_the_lora_term(seed, cast_calls, m, group, k, per_row, residual):
    """The fused path with a term against the layer's unfused forward with the term and against float64 (the
    dequantized weight plus the bf16 term on the unquantized input): within 2 dB of the unfused path's distance to
    float64 (ConvRot needs per-row scales) with a LoRA of 0.2 times the weight's norm, where
    the term's own error (its down projection sees the activation quantization and ``a``'s int8 rounding: ~39 dB
    of the term) is close to the main product's; a realistic LoRA (0.1) costs ~0.1 dB (bench/NOTES.md, "Dynamic
    LoRA in the fused blocks").
    Far from the output without the term; the resident (LinearPlan) and cast paths agree bit for bit, and
    a term without a stored int8 down projection quantizes it per call to the same result."""
    from int8_w8a8.kernels.hadamard import rotate
    from int8_w8a8.ops.lowrank import LowRank

    n = 1000  # not a multiple of 16; enough outputs that one row's SQNR is steady (at 200, 0.1 dB past the bound)
    layer = _layer(k, n, per_row, group)
    a, b = _term(n, k, 32, 0.2, layer.weight.dequantize())
    layer.int8_lora = LowRank(a, b).with_int8_down(group)
    assert layer.fusable() and layer.input_rotation() == group
    x = torch.randn(m, k, device=DEV, dtype=BF16)
    x_rot = rotate(x.float(), group).to(BF16) if group else x  # what a fused quantizer rotates before rounding
    xq, xs = ref.quantize_rows(x_rot)
    xs = xs.reshape(-1)
    res = torch.randn(1, m, n, device=DEV, dtype=BF16)
    gate = torch.randn(1, 1, n, device=DEV, dtype=BF16)

    def fused_run(lay):
        r = res.clone() if residual else None
        with torch.inference_mode():
            return lay.run_quantized(xq, xs, BF16, residual=r, gate=gate if residual else None)

    got = fused_run(layer)
    assert cast_calls == []
    layer.comfy_cast_weights = True  # what ComfyUI sets on a layer it offloads: the cast path
    assert torch.equal(fused_run(layer), got)
    assert cast_calls == [layer]
    layer.comfy_cast_weights = False
    layer.int8_lora = LowRank(a, b)  # no stored int8 down projection: quantized in the call
    assert torch.equal(fused_run(layer), got)

    with torch.inference_mode():
        unfused = layer(x).float()
    w64 = layer.weight.dequantize().double()
    y64 = x.double() @ w64.T + layer.bias.double() + (x.double() @ a.double().T) @ b.double().T
    no_term = x.double() @ w64.T + layer.bias.double()
    assert sqnr_db(y64, no_term) < 20  # the term matters (checked before a residual dilutes it)
    if residual:
        # rounded once to bf16, as the fused epilogue rounds its sum
        unfused = (res.float() + gate.float() * unfused.reshape(1, m, n)).to(BF16)
        y64 = res.double() + gate.double() * y64.reshape(1, m, n)
    s_fused, s_unfused = sqnr_db(y64, got), sqnr_db(y64, unfused)
    print(f"[sqnr vs float64] fused {s_fused:.2f} dB, unfused forward {s_unfused:.2f} dB")
    assert s_fused > s_unfused - 2.0 and s_fused > 30
    assert sqnr_db(unfused, got) > 30


@pytest.mark.integration
def test_a_dynamic_lora_keeps_the_layer_fusable_other_exclusions_stay(seed):
    from int8_w8a8.ops import layout
    from int8_w8a8.ops.lowrank import LowRank

    layer = _layer(64, 32)
    layer.int8_lora = LowRank(torch.randn(16, 64, device=DEV, dtype=BF16), torch.randn(32, 16, device=DEV, dtype=BF16))
    assert layer.fusable()
    layer.comfy_force_cast_weights = True
    assert not layer.fusable()
    del layer.comfy_force_cast_weights
    layer.weight_function = [lambda w: w]
    assert not layer.fusable()
    layer.weight_function = []
    w = layer.weight
    smoothed = layout.make_weight(w._qdata, w._params.scale, BF16, smooth=torch.ones(64, device=DEV))
    layer.weight = torch.nn.Parameter(smoothed, requires_grad=False)
    assert not layer.fusable()
    layer.weight = torch.nn.Parameter(torch.randn(32, 64, device=DEV, dtype=BF16), requires_grad=False)
    assert not layer.fusable()


@pytest.mark.unit
def test_int8_down_follows_the_rotation(seed):
    """``LowRank.with_int8_down(g)`` stores ``a`` rotated by g and quantized per rank; ``int8_down`` hands it out
    for g and quantizes afresh for another group; ``concat`` (stacking) drops it."""
    from int8_w8a8.kernels.hadamard import rotate
    from int8_w8a8.ops.lowrank import LowRank

    a, b = torch.randn(16, 128), torch.randn(40, 16)
    term = LowRank(a, b).with_int8_down(64)
    q, s = term.int8_down(64)
    assert q is term.down.q and q.dtype == torch.int8 and s.shape == (16, 1)
    assert sqnr_db(rotate(a, 64), q.float() * s) > 38
    q0, s0 = term.int8_down(0)
    assert sqnr_db(a, q0.float() * s0) > 38
    assert term.concat(term).down is None
    with pytest.raises(ValueError, match="does not match"):
        LowRank(a[:8], b[:, :8], down=term.down)


@pytest.mark.integration
@pytest.mark.parametrize("group", [0, 64])
def test_layers_sharing_rows_stack_their_lora_down_projections(seed, group, monkeypatch):
    """``run_quantized_shared`` (q/k/v, w1/w3 on one quantization): the terms' down projections as one GEMM of the
    stacked ``a`` give each layer bit for bit what its own ``run_quantized`` gives; a layer without a term runs as
    it is; the stacked down is built once per set of terms and rebuilt when one of them is replaced; one term alone
    takes the per-layer path."""
    from int8_w8a8.kernels import fused as fused_mod
    from int8_w8a8.ops import lowrank
    from int8_w8a8.ops.comfy_ops import run_quantized_shared
    from int8_w8a8.ops.lowrank import LowRank

    k, m = 192, 17
    layers = [_layer(k, n, group=group) for n in (200, 72, 136)]
    for layer, rank in zip(layers, (32, 16, 64), strict=True):
        layer.int8_lora = LowRank(*_term(layer.weight.shape[0], k, rank, 0.2, layer.weight.dequantize())) \
            .with_int8_down(group)
    xq, xs = ref.quantize_rows(torch.randn(m, k, device=DEV, dtype=BF16), rotate_group=group)
    xs = xs.reshape(-1)
    downs = []
    real_down = fused_mod.lora_down

    def counting_down(*args):
        downs.append(args[2].shape[0])
        return real_down(*args)

    with torch.inference_mode():
        each = [layer.run_quantized(xq, xs, BF16) for layer in layers]
        monkeypatch.setattr(fused_mod, "lora_down", counting_down)
        shared = run_quantized_shared(layers, xq, xs, BF16)
        first = lowrank._STACKED[layers[0].int8_lora][2]
        assert run_quantized_shared(layers, xq, xs, BF16)[1].shape == (m, 72)
        assert lowrank._STACKED[layers[0].int8_lora][2] is first  # built once
        assert downs == [112, 112]  # one GEMM of 32 + 16 + 64 columns per call
        assert all(torch.equal(a, b) for a, b in zip(each, shared, strict=True))
        old = layers[1].int8_lora
        layers[1].int8_lora = LowRank(old.a * 2, old.b).with_int8_down(group)  # a replaced term
        doubled = run_quantized_shared(layers, xq, xs, BF16)
        assert lowrank._STACKED[layers[0].int8_lora][2] is not first
        assert torch.equal(doubled[1], layers[1].run_quantized(xq, xs, BF16))
        assert not torch.equal(doubled[1], shared[1]) and torch.equal(doubled[0], shared[0])
        layers[1].int8_lora = None  # a layer without a term
        downs.clear()
        partial = run_quantized_shared(layers, xq, xs, BF16)
        assert downs == [96]
        assert torch.equal(partial[1], layers[1].run_quantized(xq, xs, BF16))
        assert torch.equal(partial[2], each[2])
        layers[2].int8_lora = None  # one term: the per-layer path
        downs.clear()
        assert torch.equal(run_quantized_shared(layers, xq, xs, BF16)[0], each[0])
        assert downs == [32]
