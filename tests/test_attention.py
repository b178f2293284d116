"""8-bit attention: the torch twin and the Triton kernel against float64 attention, the quantization pass
against the twin, NaN/Inf rows, zero V, strided inputs, the custom op under torch.compile, the dispatch rules,
bad input, and the sm_90 PTX of the kernel (offline).

Sizes are small so the interpreter tier stays fast; S is never a multiple of the tile (64 or 128).
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch

from int8_w8a8.kernels import attention as attn
from int8_w8a8.kernels import attention_8bit, reference_attention
from int8_w8a8.kernels.attention_configs import DEFAULT, VARIANTS, AttentionConfig
from int8_w8a8.kernels.launch import tma_ok

from .conftest import KERNEL_DEVICE, offline_python, rel_err

# accuracy bound of issue 14 (kitchen measured 0.0167, sageattention 0.0134 at S = 4608); the e4m3 P/V form
# measures ~0.035 on Gaussian inputs (3 mantissa bits on both operands: reference_attention docstring)
BOUND = 0.02
BOUND_FP8 = 0.045
# the interpreter's tile: 64 x 64 keeps each program small; S values below are not multiples of it
SMALL = AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
SMALL16 = AttentionConfig(block_m=64, block_n=64, num_warps=4, num_stages=2, pv="16bit")
FP8 = next(c for c in VARIANTS if c.pv == "fp8")


def ref64(q, k, v, scale=None):
    """Float64 attention ``softmax(q k^T * scale) v`` on the same (bf16/fp16) inputs."""
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    return torch.softmax(s, dim=-1) @ v


def make(b, h, s_q, s_kv, d, *, dtype=torch.bfloat16, device="cpu", keys="gauss"):
    """Gaussian q, k, v; ``keys="offset"``: K with a large shared offset (10 sigma per channel, the same for every
    token) and four outlier channels with 4x the spread and offset of the others."""
    q, k, v = (torch.randn(b, h, s, d) for s in (s_q, s_kv, s_kv))
    if keys == "offset":
        k = k + 10 * torch.randn(b, h, 1, d)
        k[..., 5:9] *= 4
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def triton_run(q, k, v, cfg, scale=None, out_dtype=None):
    """The Triton path (quantize + kernel) with ``cfg``; ``out_dtype`` float32 compares without bf16 rounding."""
    from int8_w8a8.kernels import triton_attention

    d = q.shape[-1]
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    sm = 1.0 / math.sqrt(d) if scale is None else scale
    return triton_attention.attention_quantized(triton_attention.quantize(q, k, v, cfg), sm, out, cfg)


# --------------------------------------------------------------------------------------------
# The torch twin (unit tier)
# --------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("keys", ["gauss", "offset"])
def test_twin_accuracy(seed, d, keys):
    q, k, v = make(2, 3, 100, 200, d, keys=keys)
    out = reference_attention.attention_8bit(q, k, v, config=SMALL)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref64(q, k, v)) <= BOUND


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("keys", ["gauss", "offset"])
def test_twin_16bit_pv_form(seed, dtype, keys):
    """INT8 Q K^T with P and V in the inputs' 16-bit type: within the bound, and closer to float64 than the all-8-bit
    form (INT8 Q and K alone carry ~1.1 %); its pass keeps V as given (no scale, no column sums)."""
    q, k, v = make(2, 2, 90, 170, 128, dtype=dtype, keys=keys)
    ref = ref64(q, k, v)
    err16 = rel_err(reference_attention.attention_8bit(q, k, v, config=SMALL16), ref)
    err8 = rel_err(reference_attention.attention_8bit(q, k, v, config=SMALL), ref)
    assert err16 <= BOUND and err16 < err8
    qa = reference_attention.quantize_qkv(q, k, v, SMALL16)
    assert qa.v is v and qa.v_scale is None and qa.v_colsum is None and qa.pv == "16bit"


@pytest.mark.unit
def test_variant_names():
    """The names key the measurements (attention.TRITON_MEASURED): unique, the default first."""
    names = [c.name for c in VARIANTS]
    assert len(set(names)) == len(names)
    assert DEFAULT is VARIANTS[0] and DEFAULT.name == "16bit-64x128-w4-s2"
    assert VARIANTS[1].name == "int8-64x128-w4-s3-qsplit"
    assert AttentionConfig(rotate=False).name == "int8-128x128-w8-s2-norot"
    switches = AttentionConfig(warp_spec=True, loop_stages=3, no_acc_multibuf=True, split_quant_kv=True)
    assert switches.name == "int8-128x128-w8-s2-ws-ls3-noaccmb-qsplit"


@pytest.mark.unit
def test_twin_fp8_form_is_less_accurate(seed):
    """The e4m3 P/V form (the issue's first sketch) stays within its own, looser bound; on Gaussian inputs it
    is over the 2 % of issue 14, which is why the default's P V is 16-bit (int8 before, also within it)."""
    q, k, v = make(1, 2, 90, 150, 128)
    err8 = rel_err(reference_attention.attention_8bit(q, k, v, config=FP8), ref64(q, k, v))
    err_i = rel_err(reference_attention.attention_8bit(q, k, v, config=DEFAULT), ref64(q, k, v))
    assert err_i <= BOUND < err8 <= BOUND_FP8


@pytest.mark.unit
def test_twin_scale_and_fp16(seed):
    q, k, v = make(1, 2, 40, 77, 64, dtype=torch.float16)
    out = reference_attention.attention_8bit(q, k, v, scale=0.1, config=SMALL)
    assert out.dtype == torch.float16 and rel_err(out, ref64(q, k, v, 0.1)) <= BOUND


@pytest.mark.unit
def test_rotation_helps_outlier_channels(seed):
    """Without the Hadamard rotation the four wide K channels set every block's scale (~3 % error here)."""
    q, k, v = make(1, 2, 80, 200, 128, keys="offset")
    ref = ref64(q, k, v)
    plain = rel_err(reference_attention.attention_8bit(q, k, v, config=AttentionConfig(rotate=False)), ref)
    rotated = rel_err(reference_attention.attention_8bit(q, k, v, config=DEFAULT), ref)
    assert rotated <= BOUND < plain


@pytest.mark.unit
def test_public_api_on_cpu_is_the_twin(seed):
    q, k, v = make(2, 2, 33, 65, 64)
    assert attn.choose_attention(q.device).name == "reference"
    out = attention_8bit(q, k, v)
    assert torch.equal(out, reference_attention.attention_8bit(q, k, v, config=DEFAULT))


# --------------------------------------------------------------------------------------------
# Shared behaviour of both paths: NaN/Inf rows, zero V, strided inputs
# --------------------------------------------------------------------------------------------
def _paths():
    return [pytest.param("twin", marks=pytest.mark.unit), pytest.param("triton", marks=pytest.mark.kernels)]


def _run(path, q, k, v, cfg=SMALL):
    if path == "twin":
        return reference_attention.attention_8bit(q, k, v, config=cfg)
    return triton_run(q, k, v, cfg)


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("cfg", [SMALL, SMALL16], ids=["int8", "16bit"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_query_row_poisons_only_its_row(seed, path, cfg, bad):
    q, k, v = make(1, 2, 70, 90, 64, device=KERNEL_DEVICE if path == "triton" else "cpu")
    q[0, 1, 5, 7] = bad
    out = _run(path, q, k, v, cfg).float().cpu()
    assert torch.isnan(out[0, 1, 5]).all()
    others = torch.ones(out.shape[:3], dtype=torch.bool)
    others[0, 1, 5] = False
    assert torch.isfinite(out[others]).all()
    ref = ref64(q.cpu(), k.cpu(), v.cpu())
    assert rel_err(out[others], ref[others]) <= BOUND


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("cfg", [SMALL, SMALL16], ids=["int8", "16bit"])
def test_zero_v_gives_zeros(seed, path, cfg):
    q, k, v = make(1, 2, 50, 70, 128, device=KERNEL_DEVICE if path == "triton" else "cpu")
    out = _run(path, q, k, torch.zeros_like(v), cfg).float().cpu()
    assert torch.equal(out, torch.zeros(out.shape))


@pytest.mark.parametrize("path", _paths())
def test_strided_inputs_and_output_layout(seed, path):
    """q, k, v as [B, S, H, D] buffers seen through transpose(1, 2) (the fused blocks' layout) and a V that is
    a slice of a wider buffer give the same result as contiguous copies; the output keeps q's layout."""
    dev = KERNEL_DEVICE if path == "triton" else "cpu"
    b, h, s_q, s_kv, d = 2, 3, 45, 70, 64
    qb = torch.randn(b, s_q, h, d, device=dev).bfloat16()
    kb = torch.randn(b, s_kv, h, d, device=dev).bfloat16()
    vb = torch.randn(b, h, s_kv, 2 * d, device=dev).bfloat16()
    q, k, v = qb.transpose(1, 2), kb.transpose(1, 2), vb[..., d:]
    if path == "twin":
        out = attention_8bit(q, k, v)
        same = attention_8bit(q.contiguous(), k.contiguous(), v.contiguous())
    else:
        out = triton_run(q, k, v, SMALL, out_dtype=None)
        same = triton_run(q.contiguous(), k.contiguous(), v.contiguous(), SMALL)
    assert torch.equal(out, same)
    if path == "twin":
        assert out.stride() == torch.empty_like(q).stride()
    assert rel_err(out.cpu(), ref64(q.cpu(), k.cpu(), v.cpu())) <= BOUND


# --------------------------------------------------------------------------------------------
# The Triton kernels (interpreter on the CPU, natively on a GPU)
# --------------------------------------------------------------------------------------------
@pytest.mark.kernels
@pytest.mark.parametrize("cfg", [SMALL, AttentionConfig(64, 64, 4, 2, "fp8")], ids=["int8", "fp8"])
@pytest.mark.parametrize("d", [64, 128])
def test_quantization_pass_matches_twin(seed, cfg, d):
    from int8_w8a8.kernels import triton_attention

    q, k, v = make(2, 2, 37, 100, d, device=KERNEL_DEVICE)
    got = triton_attention.quantize(q, k, v, cfg)
    want = reference_attention.quantize_qkv(q.cpu(), k.cpu(), v.cpu(), cfg)
    s_kv = k.shape[2]
    # the rotation's float32 sums (and the K mean's) run in another order than the twin's: a value within an
    # ulp of a .5 boundary may round the other way
    for name in ("q", "k"):
        diff = (getattr(got, name).cpu().int() - getattr(want, name).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3, name
    # as values: the interpreter's e4m3 rounding writes +0 where torch writes -0
    assert torch.equal(got.v[:, :s_kv].cpu().float(), want.v[:, :s_kv].float())
    if cfg.pv == "int8":
        assert torch.equal(got.v_colsum.cpu(), want.v_colsum)
    for name in ("q_scale", "k_scale", "v_scale"):  # rotation sums differ in order: within a few ulps
        torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name), rtol=1e-6, atol=0)


@pytest.mark.kernels
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_16bit_pv_form(seed, d, dtype):
    """The 16-bit P V form: its pass writes the twin's int8 Q and K and reads V as given; the kernel on the same
    quantized inputs matches the twin (P rounded to V's type as the GPU's cvt.rn does), B, H > 1, S_q != S_kv, neither
    a multiple of the tile, q, k, v as the fused blocks pass them ([B, S, H, D] buffers seen as [B, H, S, D])."""
    from int8_w8a8.kernels import triton_attention

    b, h, s_q, s_kv = 2, 3, 70, 150
    dev = KERNEL_DEVICE
    q, k, v = (torch.randn(b, s, h, d, device=dev).to(dtype).transpose(1, 2) for s in (s_q, s_kv, s_kv))
    got = triton_attention.quantize(q, k, v, SMALL16)
    want = reference_attention.quantize_qkv(q.cpu(), k.cpu(), v.cpu(), SMALL16)
    for name in ("q", "k"):
        diff = (getattr(got, name).cpu().int() - getattr(want, name).int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3, name
    assert got.v is v and got.v_scale is None and got.v_colsum is None
    sm = 1 / math.sqrt(d)
    out = triton_attention.attention_quantized(want if dev == "cpu" else got, sm,
                                               torch.empty(q.shape, dtype=torch.float32, device=dev), SMALL16).cpu()
    twin = reference_attention.attention_quantized(want, sm, torch.float32)
    # an exp2 one ulp apart (numpy's or the GPU's against torch's) can flip the 16-bit rounding of a P value
    assert rel_err(out, twin) <= (5e-4 if dev == "cpu" else 2e-3)
    assert rel_err(out, ref64(q.cpu(), k.cpu(), v.cpu())) <= BOUND


@pytest.mark.parametrize("path", _paths())
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_16bit_pv_nonfinite_v_poisons_only_its_channel(seed, path, bad):
    """With V unquantized, a NaN or Inf in V reaches every query's output in that head's channel and nowhere else (the
    8-bit forms get the same through the channel's NaN scale)."""
    q, k, v = make(1, 2, 40, 300, 64, device=KERNEL_DEVICE if path == "triton" else "cpu")
    v[0, 1, 233, 9] = bad
    out = _run(path, q, k, v, SMALL16).float().cpu()
    bad_at = torch.zeros(out.shape, dtype=torch.bool)
    bad_at[0, 1, :, 9] = True
    assert not torch.isfinite(out[bad_at]).any() and torch.isfinite(out[~bad_at]).all()


@pytest.mark.kernels
@pytest.mark.parametrize("s_kv", [40, 128, 150])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_defer_pv_is_bit_identical(seed, s_kv, dtype):
    """defer_pv (each block's P V issued one iteration late) gives the block-order kernel's bits: one partial block
    only, whole blocks only, whole blocks and a partial one; an Inf in V's first block (the slot before block 0
    multiplies P = 0 by zeros, not by that block: 0 * Inf would be NaN) and a NaN in a later one."""
    from int8_w8a8.kernels import triton_attention

    base = SMALL16
    defer = AttentionConfig(64, 64, 4, 2, "16bit", defer_pv=True)
    q, k, v = make(2, 2, 70, s_kv, 64, dtype=dtype, device=KERNEL_DEVICE)
    v[0, 1, 3, 9] = float("inf")
    v[1, 0, s_kv - 1, 4] = float("nan")
    qa = triton_attention.quantize(q, k, v, base)
    outs = [triton_attention.attention_quantized(qa, 0.125, torch.empty(q.shape, dtype=torch.float32,
                                                                        device=q.device), cfg).cpu()
            for cfg in (base, defer)]
    assert torch.equal(outs[0].view(torch.int32), outs[1].view(torch.int32))
    assert torch.isinf(outs[0][0, 1, :, 9]).all() and torch.isnan(outs[0][1, 0, :, 4]).all()
    assert torch.isfinite(outs[0][0, 0]).all()


def test_defer_pv_needs_the_16bit_form():
    for kw in ({"pv": "int8"}, {"pv": "fp8"}, {"pv": "16bit", "warp_spec": True}):
        with pytest.raises(ValueError, match="defer_pv"):
            AttentionConfig(64, 64, 4, 2, defer_pv=True, **kw)
    assert AttentionConfig(64, 64, 4, 2, "16bit", defer_pv=True).name == "16bit-64x64-w4-s2-defer"


@pytest.mark.kernels
def test_kernel_16bit_pv_reads_any_v_layout(seed):
    """A V that TMA cannot read as it is (a row stride of 65 elements: not 16-byte aligned; a head dimension of
    stride 0) is copied once; the result equals that of a contiguous V, and a TMA-readable view is read in place."""
    from int8_w8a8.kernels import triton_attention

    q, k, _ = make(1, 2, 40, 90, 64, device=KERNEL_DEVICE)
    wide = torch.randn(1, 2, 90, 65, device=KERNEL_DEVICE).bfloat16()
    v = wide[..., :64]
    assert not tma_ok(v) and tma_ok(v.contiguous())
    assert triton_attention.quantize(q, k, v, SMALL16).v is not v
    assert torch.equal(triton_run(q, k, v, SMALL16), triton_run(q, k, v.contiguous(), SMALL16))
    shared = v[:, :1].expand(1, 2, 90, 64)  # one V for both heads: a zero stride, copied too
    assert not tma_ok(shared)
    assert torch.equal(triton_run(q, k, shared, SMALL16), triton_run(q, k, shared.contiguous(), SMALL16))


@pytest.mark.kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_v_channel_scale(seed, bad):
    """A NaN or +-Inf in V makes that head's channel scale NaN and only that one, as in the twin: the statistics
    pass keeps it through its element-wise maxima and the reduction across rows (which drops NaN by itself)."""
    from int8_w8a8.kernels import triton_attention

    q, k, v = make(1, 2, 20, 300, 64, device=KERNEL_DEVICE)
    v[0, 1, 233, 9] = bad  # in a later chunk and tile than the first
    got = triton_attention.quantize(q, k, v, SMALL).v_scale.cpu()
    want = reference_attention.quantize_qkv(q.cpu(), k.cpu(), v.cpu(), SMALL).v_scale
    nan = torch.zeros_like(want, dtype=torch.bool)
    nan[1, 9] = True
    assert torch.equal(torch.isnan(got), nan) and torch.equal(torch.isnan(want), nan)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True)


@pytest.mark.kernels
@pytest.mark.parametrize("pv", ["int8", "fp8"])
@pytest.mark.parametrize("d", [64, 128])
def test_split_quant_kv_is_bit_identical(seed, pv, d):
    """split_quant_kv (K and V in two launches) writes the same bits as the one K/V launch, NaN/Inf included."""
    from int8_w8a8.kernels import triton_attention

    q, k, v = make(2, 2, 37, 100, d, device=KERNEL_DEVICE)
    k[1, 0, 50, 3] = float("inf")
    v[0, 1, 10, 5] = float("nan")
    one = AttentionConfig(64, 64, 4, 2, pv)
    a = triton_attention.quantize(q, k, v, one)
    b = triton_attention.quantize(q, k, v, AttentionConfig(64, 64, 4, 2, pv, split_quant_kv=True))
    for name in ("q", "q_scale", "k", "k_scale", "v_scale"):
        assert torch.equal(getattr(a, name).view(torch.int8), getattr(b, name).view(torch.int8)), name
    assert torch.equal(a.v[:, :100].view(torch.int8), b.v[:, :100].view(torch.int8))
    assert a.v_colsum is None if pv == "fp8" else torch.equal(a.v_colsum, b.v_colsum)


@pytest.mark.kernels
@pytest.mark.parametrize("pv", ["16bit", "int8"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_lean_pass_is_bit_identical(seed, pv, d, bad):
    """The Q and K kernels' lean forms (NaN-propagating absmax, clamp-free store where a row / block is finite) write
    the general forms' bits: all-zero rows, a partial last block, and a NaN or Inf in one Q row and one K block."""
    from int8_w8a8.kernels import triton_attention

    q, k, v = make(1, 3, 77, 150, d, device=KERNEL_DEVICE)
    q[0, 1, 5] = 0.0
    k[0, 2, 20:30] = 0.0
    if bad is not None:
        q[0, 0, 40, 7] = bad
        k[0, 1, 70, 3] = -bad
    cfg = AttentionConfig(64, 64, 4, 2, pv)
    a = triton_attention.quantize(q, k, v, cfg, lean=False)
    b = triton_attention.quantize(q, k, v, cfg, lean=True)
    for name in ("q", "q_scale", "k", "k_scale"):
        assert torch.equal(getattr(a, name).view(torch.int8), getattr(b, name).view(torch.int8)), name
    if bad is not None:
        assert torch.isnan(b.q_scale[40]) and torch.isnan(b.k_scale[1, 1])
        # other Q rows keep their scales; other heads' K blocks too (head 1's mean carries the bad key to its blocks)
        assert torch.isfinite(b.q_scale[41]) and torch.isfinite(b.k_scale[[0, 2]]).all()


@pytest.mark.kernels
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("keys", ["gauss", "offset"])
def test_kernel_vs_twin_and_float64(seed, d, keys):
    """B, H > 1, S_q != S_kv, neither a multiple of the tile."""
    q, k, v = make(2, 2, 70, 150, d, device=KERNEL_DEVICE, keys=keys)
    out = triton_run(q, k, v, SMALL, out_dtype=torch.float32).cpu()
    twin = reference_attention.attention_quantized(
        reference_attention.quantize_qkv(q.cpu(), k.cpu(), v.cpu(), SMALL), 1 / math.sqrt(d), torch.float32)
    # the same quantized inputs and blockwise arithmetic: differences come from exp2 and summation order,
    # flipping the rounding of a few P values
    assert rel_err(out, twin) <= 2e-3
    assert rel_err(out, ref64(q.cpu(), k.cpu(), v.cpu())) <= BOUND


def _ws_on_gpu_needs_opt_in(cfg: AttentionConfig) -> None:
    """Warp-specialized builds have never run on a GPU, and the warp-specialized GEMM of the same Triton pass was
    wrong there (bench/NOTES.md item 28): on a GPU they run only under ``run_on_gpu.sh attention-safe``, which sets
    INT8_W8A8_TEST_WS=1 and a timeout (a deadlock must not hang the whole tier)."""
    if cfg.warp_spec and KERNEL_DEVICE != "cpu" and os.environ.get("INT8_W8A8_TEST_WS") != "1":
        pytest.skip("warp-specialized attention on a GPU: bench/run_on_gpu.sh attention-safe (INT8_W8A8_TEST_WS=1)")


@pytest.mark.kernels
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_warp_spec_loop(seed, d):
    """The warp_spec form (every key block masked, Q and its row scales through descriptors made in the kernel):
    the same numbers as the twin, a NaN row poisons only itself, S_kv not a multiple of the tile, S_q != S_kv."""
    cfg = AttentionConfig(128, 64, 4, 2, "int8", warp_spec=True)
    _ws_on_gpu_needs_opt_in(cfg)
    q, k, v = make(2, 2, 132, 150, d, device=KERNEL_DEVICE)
    q[1, 0, 7, 3] = float("nan")
    out = triton_run(q, k, v, cfg, out_dtype=torch.float32).cpu()
    twin = reference_attention.attention_quantized(
        reference_attention.quantize_qkv(q.cpu(), k.cpu(), v.cpu(), cfg), 1 / math.sqrt(d), torch.float32)
    bad = torch.zeros(out.shape[:3], dtype=torch.bool)
    bad[1, 0, 7] = True
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
    assert rel_err(out[~bad], twin[~bad]) <= 2e-3
    assert rel_err(out[~bad], ref64(q.cpu(), k.cpu(), v.cpu())[~bad]) <= BOUND


@pytest.mark.kernels
def test_kernel_warp_spec_needs_s_q_multiple_of_4():
    cfg = AttentionConfig(128, 64, 4, 2, "int8", warp_spec=True)
    q, k, v = make(1, 1, 70, 64, 64, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match=r"S_q % 4 == 0"):
        triton_run(q, k, v, cfg)


@pytest.mark.kernels
def test_kernel_fp8_form(seed):
    cfg = AttentionConfig(64, 64, 4, 2, "fp8")
    q, k, v = make(1, 2, 70, 150, 128, device=KERNEL_DEVICE)
    out = triton_run(q, k, v, cfg, out_dtype=torch.float32).cpu()
    twin = reference_attention.attention_quantized(
        reference_attention.quantize_qkv(q.cpu(), k.cpu(), v.cpu(), cfg), 1 / math.sqrt(128), torch.float32)
    assert rel_err(out, twin) <= 5e-3  # an e4m3 rounding flip moves a P value by up to 1/16
    assert rel_err(out, ref64(q.cpu(), k.cpu(), v.cpu())) <= BOUND_FP8


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: c.name)
def test_gpu_variants_at_model_sizes(seed, cfg):
    """Every benchmarked variant natively, at a size with many tiles per head, against float64."""
    _ws_on_gpu_needs_opt_in(cfg)
    q, k, v = make(1, 4, 1000, 1500, 128, device="cuda")
    out = triton_run(q, k, v, cfg)
    bound = BOUND_FP8 if cfg.pv == "fp8" else BOUND
    assert rel_err(out.cpu(), ref64(q.cpu(), k.cpu(), v.cpu())) <= bound


@pytest.mark.gpu
def test_gpu_public_api_dispatch(seed):
    q, k, v = make(1, 2, 300, 257, 128, device="cuda")
    backend = attn.choose_attention(q.device)
    out = attention_8bit(q, k, v)
    tol = 0.005 if backend.name == "sdpa" else BOUND
    assert rel_err(out.cpu(), ref64(q.cpu(), k.cpu(), v.cpu())) <= tol, backend


# --------------------------------------------------------------------------------------------
# torch.compile, the custom op, dispatch rules, bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_opcheck_and_fullgraph_compile(seed):
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v = make(1, 2, 40, 72, 64)
    torch.library.opcheck(torch.ops.int8_w8a8.attention_8bit, (q, k, v, 0.125))
    torch.library.opcheck(torch.ops.int8_w8a8.attention_8bit, (q.transpose(1, 2).contiguous().transpose(1, 2), k, v,
                                                               0.2))

    def block(q, k, v):
        return attention_8bit(q * 1.5, k, v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    assert torch.equal(compiled(q, k, v), block(q, k, v))
    ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "int8_w8a8.attention_8bit.default" in ops or "int8_w8a8.attention_8bit" in ops, ops


@pytest.mark.unit
def test_dispatch_rules_are_data(monkeypatch):
    """Hopper -> the Gluon kernel, or Triton where Gluon cannot run; Hopper without Triton -> SDPA (kitchen measured
    slower there); an unmeasured generation -> SDPA; a generation where kitchen is recorded faster -> kitchen when it
    is available."""
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(attn, "triton_import_error", lambda: None)
    monkeypatch.setattr(attn, "_kitchen_op", lambda: object())
    cuda = torch.device("cuda", 0)
    try:
        monkeypatch.setattr(attn, "_gluon_error", lambda cfg: None)
        attn.reset()
        backend = attn.choose_attention(cuda)
        assert backend.name == "gluon" and attn.gluon_name() in backend.reason
        monkeypatch.setattr(attn, "_gluon_error", lambda cfg: "INT8_W8A8_DISABLE_GLUON is set")
        attn.reset()
        backend = attn.choose_attention(cuda)
        assert backend.name == "triton" and "DISABLE_GLUON" in backend.reason
        monkeypatch.setenv("INT8_W8A8_DISABLE_TRITON", "1")
        attn.reset()
        backend = attn.choose_attention(cuda)
        assert backend.name == "sdpa" and "measured 0.49x" in backend.reason
        monkeypatch.delenv("INT8_W8A8_DISABLE_TRITON")
        cap["value"] = (8, 9)
        attn.reset()
        backend = attn.choose_attention(cuda)
        assert backend.name == "sdpa" and "unmeasured" in backend.reason
        monkeypatch.setitem(attn.KITCHEN_SPEEDUP_VS_SDPA, (8, 9), 1.3)
        attn.reset()
        assert attn.choose_attention(cuda).name == "kitchen"
        monkeypatch.setattr(attn, "_kitchen_op", lambda: None)
        attn.reset()
        assert attn.choose_attention(cuda).name == "sdpa"
    finally:
        attn.reset()


@pytest.mark.unit
def test_bad_input_raises_value_error_naming_the_argument():
    q, k, v = make(1, 2, 8, 8, 64)
    cases = [
        ((q, k, v), {"attn_mask": torch.zeros(8, 8)}, "attn_mask"),
        ((q, k, v), {"is_causal": True}, "is_causal"),
        ((q.float(), k, v), {}, "q: expected dtype bfloat16 or float16"),
        ((q, k.half(), v), {}, "k, v"),
        ((q[..., :32], k[..., :32], v[..., :32]), {}, "head size D=32"),
        ((q[0], k, v), {}, "q: expected 4 dimensions"),
        ((q, k[:, :1], v[:, :1]), {}, "k: expected [B, H, S_kv, D]"),
        ((q, k, v[:, :, :4]), {}, "v: expected k's shape"),
        ((q, k[:, :, :0], v[:, :, :0]), {}, "S_kv = 0"),
        ((q, k, v), {"scale": -1.0}, "scale"),
        ((q, k, v), {"scale": float("nan")}, "scale"),
        (([1.0], k, v), {}, "q: expected a torch.Tensor"),
        ((q.expand(32768, 2, 8, 64), k.expand(32768, 2, 8, 64), v.expand(32768, 2, 8, 64)), {}, "B * H = 65536"),
    ]
    for args, kwargs, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)):
            attention_8bit(*args, **kwargs)
    with pytest.raises(ValueError, match=r"AttentionConfig\.block_n"):
        AttentionConfig(block_n=256)


@pytest.mark.unit
def test_empty_queries():
    q, k, v = make(1, 2, 0, 8, 64)
    assert attention_8bit(q, k, v).shape == q.shape


@pytest.mark.kernels
def test_hopper_lean_pass_build():
    """Offline sm_90 compile of the pass's lean Q and K kernels (bench/NOTES.md item 80): no spills, the Q kernel within
    its 128-register cap (four 48 KB programs per SM), the K launch within quant_kv_options' 128."""
    code = ("import json; from int8_w8a8.bench import check_ptx_attention as c; "
            "from int8_w8a8.kernels.attention_configs import DEFAULT; "
            "r = c.compile_quant(DEFAULT, 90, lean=True); "
            "print(json.dumps({k: [v['regs'], v['local'], v['shared_bytes']] for k, v in r.items()}))")
    out = offline_python(code)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert rows["quant_q"][0] <= 128 and rows["quant_k"][0] <= 128, rows
    assert all(local == 0 for _, local, _ in rows.values()), rows
    assert 4 * rows["quant_q"][2] <= 232448, rows


@pytest.mark.kernels
def test_hopper_ptx_attention_uses_wgmma_for_both_products():
    """Offline sm_90 compile: wgmma s8 for Q K^T, s8 (default) or e4m3 (fp8 form) for P V, TMA loads, no
    spills, shared memory within 227 KB (the default config at D = 64 and 128, the fp8 variant at 128)."""
    code = ("from int8_w8a8.bench import check_ptx_attention as c; import sys; "
            "sys.exit(c.main(['--quick', '--json']))")
    out = offline_python(code)  # what sm_90 itself compiles
    rows = json.loads(out.stdout) if out.stdout.strip().startswith("[") else []
    assert rows and out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    kernels = [r for r in rows if r["what"].startswith("attention")]
    assert len(kernels) == 6
    for r in kernels:
        assert not r["problems"], r
        assert any(".s32.s8.s8" in w for w in r["wgmma"]) and r["tma_loads"] > 0, r
        if r["config"]["pv"] == "fp8":
            assert any(".e4m3.e4m3" in w for w in r["wgmma"]), r
        if r["config"]["pv"] == "16bit":
            assert any(".f32.bf16.bf16" in w for w in r["wgmma"]), r
    assert all(not r["problems"] for r in rows), [r for r in rows if r["problems"]]
    # Triton 3.6 waits for every INT8 product as soon as it is issued (its pipeliner keeps a wgmma in flight only
    # with a float32 accumulator: bench/NOTES.md item 56), so no softmax runs under the warpgroup's own wgmma; the
    # 16-bit P V product (float32 accumulator) is left in flight until the next Q K^T's wait
    eight = [r for r in kernels if r["config"]["pv"] != "16bit"]
    assert all(r["wgmma_waits"] == [0] and r["wgmma_overlap_instr"] == 0 for r in eight), eight
    assert all(r["wgmma_overlap_instr"] > 0 for r in kernels if r["config"]["pv"] == "16bit"), kernels
    # defer_pv: block j's softmax is issued under block j - 1's P V (348 instructions offline with Triton 3.6; a
    # loop-carried 16-bit P would be staged through one shared buffer and waited for at issue: bench/NOTES.md item 70),
    # and its 64x128 tile still fits two programs per SM (251 registers, 106 KB)
    defer = [r for r in kernels if r["config"]["defer_pv"]]
    assert len(defer) == 1 and defer[0]["wgmma_overlap_instr"] >= 200, defer
    assert defer[0]["regs"] <= 256 and 2 * defer[0]["shared_bytes"] <= 233472, defer
    # the Gluon kernel states its waits: the next block's Q K^T in flight across each block's softmax
    # (kernels/gluon_attention.py), in a form ptxas keeps (no serialization note, bench/NOTES.md item 59); no Triton
    # attention kernel gets such a note either
    gluon = [r for r in rows if r["what"].startswith("gluon attention")]
    assert len(gluon) == 3 and all(r["wgmma_overlap_instr"] >= 100 and not r["ptxas_waits"] for r in gluon), gluon
    assert not [r["what"] for r in kernels if r["ptxas_waits"]], kernels
    # warp_spec: Triton's Hopper pass made a TMA producer warpgroup and two consumer warpgroups (problems() checks
    # num_warps + 8 and setmaxnreg), each consumer with both products on wgmma
    ws = [r for r in kernels if r["config"]["warp_spec"]]
    assert len(ws) == 1 and ws[0]["num_warps"] == 12 and ws[0]["sass_hgmma_igmma"] in (None, 16), ws
    # the main loops as measured on the H200 (NOTES items 20, 23 and 68: 14.19 instructions per score for the int8
    # P V form and 8.84 for the 16-bit default at D = 128 offline with Triton 3.6); present where cuobjdump is
    per_score = {r["what"]: r.get("instr_per_score") for r in kernels}
    plain = per_score[f"attention {DEFAULT.name} D=128"]
    int8 = per_score[f"attention {VARIANTS[1].name} D=128"]
    assert plain is None or plain <= 9.5, per_score
    assert int8 is None or int8 <= 15.0, per_score
    # the quantization pass (bench/NOTES.md item 63): the statistics stream K and V without a rotation (no wgmma),
    # and no tile is read or written an element at a time (V's transposed store is 16 bytes wide)
    quant = {r["what"].split()[0]: r for r in rows if r["what"].startswith(("kv_", "quant_")) and " int8 " in r["what"]}
    assert {"kv_stats", "kv_finalize", "quant_q", "quant_k", "quant_v"} <= set(quant), sorted(quant)
    # the 16-bit P V form's pass: K's statistics and blocks only (nothing of V is read or written)
    no_v = {r["what"].split()[0] for r in rows if r["what"].startswith(("kv_", "quant_")) and " 16bit " in r["what"]}
    assert no_v == {"kv_stats", "kv_finalize", "quant_q", "quant_k"}, no_v
    assert not quant["kv_stats"]["wgmma"], quant["kv_stats"]
    narrow = {name: [op for op in r["global_access"] if op.endswith((".b8", ".b16"))] for name, r in quant.items()}
    assert not any(narrow.values()), narrow
    # item 64: the split K launch fits its register cap without spilling (two blocks per SM), and the statistics'
    # element-wise sums and maxima five programs per SM
    regs = {name: r["regs"] for name, r in quant.items()}
    assert regs["quant_k"] <= 128 and regs["kv_stats"] <= 102, regs
    assert not [name for name, r in quant.items() if r["local"]], quant
