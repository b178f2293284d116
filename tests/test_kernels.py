"""Triton kernels against their torch twins, on fresh random data and awkward shapes.

On a machine without a GPU these run under TRITON_INTERPRET=1 (set in conftest.py) on CPU tensors;
on a GPU they run the compiled kernels. Without rotation the kernels must equal the twin bit for bit
(int8 values, scales, float32 outputs). Two interpreter limits are allowed for explicitly: its
float32 -> bfloat16 cast truncates instead of rounding to nearest even (bf16 outputs may differ by
one ulp there, never on a GPU), and its tl.dot cannot multiply bfloat16 (the rotation runs in float32
there).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from int8_w8a8.kernels import configs, triton_gemm, triton_ops, triton_quant
from int8_w8a8.kernels import reference as ref
from int8_w8a8.kernels.configs import GemmConfig
from int8_w8a8.kernels.dispatch import Backend

from .conftest import INTERPRETED, KERNEL_DEVICE, rel_err, ulp_diff

pytestmark = pytest.mark.kernels

DEV = KERNEL_DEVICE
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _same_scales(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0)) and torch.equal(a.isnan(), b.isnan())


def _assert_out_equal(out: torch.Tensor, expect: torch.Tensor) -> None:
    """Bitwise equal, except bf16 under the interpreter (truncating cast): at most one ulp."""
    if INTERPRETED and out.dtype == torch.bfloat16:
        assert ulp_diff(out, expect) <= 1
    else:
        assert torch.equal(out.nan_to_num(7.0), expect.nan_to_num(7.0)) and torch.equal(out.isnan(), expect.isnan())


# ---------------------------------------------------------------------------------------------
# quantize_rows
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (15, 100), (16, 64), (17, 33), (3, 2, 129), (2, 16384), (2, 16385)])
def test_quantize_rows_matches_twin(seed, dtype, shape):
    x = (torch.randn(shape) * torch.rand((*shape[:-1], 1)) * 10).to(DEV, dtype)
    q, s = triton_quant.quantize_rows(x)
    q_ref, s_ref = ref.quantize_rows(x)
    assert q.shape == q_ref.shape and s.shape == s_ref.shape == (q.shape[0], 1)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)


def test_quantize_rows_long_rows_two_pass(seed):
    # K > 65536 exercises the two-pass loop (absmax pass, then quantize pass) with a ragged tail
    x = torch.randn(2, 70001, device=DEV, dtype=torch.bfloat16) * 3
    q, s = triton_quant.quantize_rows(x)
    q_ref, s_ref = ref.quantize_rows(x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_rows_strided_input(seed, dtype):
    base = torch.randn(40, 96, device=DEV, dtype=dtype)
    for view in (base.t(), base[:, ::3], base[::2, 5:77]):
        q, s = triton_quant.quantize_rows(view)
        q_ref, s_ref = ref.quantize_rows(view.contiguous())
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_quantize_rows_nonfinite_and_zero_rows(seed):
    x = torch.randn(6, 300, device=DEV)
    x[1, 7] = float("nan")
    x[2, 0] = float("inf")
    x[3, 299] = -float("inf")
    x[4] = 0.0
    q, s = triton_quant.quantize_rows(x)
    q_ref, s_ref = ref.quantize_rows(x)
    assert torch.equal(q, q_ref) and _same_scales(s, s_ref)
    assert torch.isnan(s[1:4]).all() and not torch.isnan(s[[0, 4, 5]]).any()
    assert (q[4] == 0).all() and s[4].item() == ref.TINY_SCALE
    assert (q[1:4] == 0).sum() >= 1  # non-finite entries store 0


def test_quantize_rows_smooth_exact(seed):
    x = torch.randn(9, 200, device=DEV, dtype=torch.bfloat16)
    smooth = torch.rand(200, device=DEV) + 0.25
    q, s = triton_quant.quantize_rows(x, smooth=smooth)
    q_ref, s_ref = ref.quantize_rows(x, smooth=smooth)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("case", ["shapes", "nonfinite", "strided", "smooth", "rotated"])
def test_quantize_rows_lean_is_bit_identical(seed, monkeypatch, case):
    """``LEAN_ROWS``: single-pass rows by ``_quantize_parts``' LEAN form write the general form's bits (odd shapes,
    NaN/Inf and all-zero rows, strided inputs, smoothing, rotation); two-pass rows are unchanged by it."""
    bf16 = torch.bfloat16
    if case == "shapes":
        inputs = [((torch.randn(sh) * torch.rand((*sh[:-1], 1)) * 10).to(DEV, bf16), {})
                  for sh in ((1, 1), (1, 7), (15, 100), (16, 64), (17, 33), (2, 3072), (2, 5000))]
    elif case == "nonfinite":
        x = torch.randn(6, 300, device=DEV)
        x[1, 7], x[2, 0], x[3, 299], x[4] = float("nan"), float("inf"), -float("inf"), 0.0
        inputs = [(x, {})]
    elif case == "strided":
        base = torch.randn(40, 96, device=DEV, dtype=bf16)
        inputs = [(v, {}) for v in (base.t(), base[:, ::3], base[::2, 5:77])]
    elif case == "smooth":
        inputs = [(torch.randn(9, 200, device=DEV, dtype=bf16), {"smooth": torch.rand(200, device=DEV) + 0.25})]
    else:
        inputs = [(torch.randn(17, 256, device=DEV, dtype=bf16), {"rotate_group": 128})]
    for x, kw in inputs:
        monkeypatch.setattr(triton_quant, "LEAN_ROWS", False)
        q0, s0 = triton_quant.quantize_rows(x, **kw)
        monkeypatch.setattr(triton_quant, "LEAN_ROWS", True)
        q1, s1 = triton_quant.quantize_rows(x, **kw)
        assert torch.equal(q0, q1) and _same_scales(s0, s1), (case, tuple(x.shape))


@pytest.mark.parametrize("group", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_rows_rotation_close_to_twin(seed, group, dtype):
    x = torch.randn(17, 2 * group, device=DEV, dtype=dtype)
    q, s = triton_quant.quantize_rows(x, rotate_group=group)
    q_ref, s_ref = ref.quantize_rows(x, rotate_group=group)
    # float32 sums of the group (tensor cores) vs the twin's exact float64 sums: values within
    # rounding of a .5 boundary may land one step apart
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    assert torch.allclose(s, s_ref, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# quantize_weight / dequantize
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("seed_arg", [None, 0, 123456789, 2**32 - 1])
def test_quantize_weight_matches_twin(seed, per_row, seed_arg):
    w = torch.randn(33, 70, device=DEV, dtype=torch.bfloat16) * 0.05
    q, s = triton_quant.quantize_weight(w, per_row=per_row, seed=seed_arg)
    q_ref, s_ref = ref.quantize_weight(w, per_row=per_row, seed=seed_arg)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert s.shape == ((33, 1) if per_row else ())


def test_quantize_weight_fixed_scale_matches_twin(seed):
    w = torch.randn(20, 50, device=DEV) * 0.05
    fixed = torch.tensor(0.002, device=DEV)
    q, s = triton_quant.quantize_weight(w, per_row=False, seed=9, scale=fixed)
    q_ref, s_ref = ref.quantize_weight(w, per_row=False, seed=9, scale=fixed)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and s.item() == fixed.item()


def test_quantize_weight_fixed_per_row_scales_match_twin(seed):
    w = torch.randn(20, 50, device=DEV) * 0.05
    fixed = torch.rand(20, 1, device=DEV) * 1e-3 + 5e-4
    q, s = triton_quant.quantize_weight(w, seed=11, scale=fixed)
    q_ref, s_ref = ref.quantize_weight(w, seed=11, scale=fixed)
    assert torch.equal(q, q_ref) and torch.equal(s, fixed) and torch.equal(s_ref, fixed)


def test_fixed_scales_made_in_inference_mode_are_checked(seed):
    """Under torch.inference_mode (DynamicVRAM merges a LoRA on cast there) scales have no version counter:
    the public API still checks their values instead of failing on the missing counter."""
    from int8_w8a8 import kernels

    with torch.inference_mode():
        w = torch.randn(20, 50, device=DEV) * 0.05
        fixed = torch.full((20, 1), 1e-3, device=DEV)
        q, s = kernels.quantize_weight(w, scale=fixed)
        assert torch.equal(s, fixed)
        assert torch.equal(kernels.dequantize(q, s, torch.float32), q.float() * fixed)
        with pytest.raises(ValueError, match="finite and > 0"):
            kernels.quantize_weight(w, scale=torch.full((20, 1), float("nan"), device=DEV))


def test_quantize_weight_rotated_close_to_twin(seed):
    w = torch.randn(24, 512, device=DEV) * 0.05
    q, s = triton_quant.quantize_weight(w, rotate_group=256)
    q_ref, s_ref = ref.quantize_weight(w, rotate_group=256)
    assert (q.int() - q_ref.int()).abs().max() <= 1
    assert torch.allclose(s, s_ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_row", [True, False])
def test_dequantize_matches_twin(seed, dtype, per_row):
    q = torch.randint(-128, 128, (37, 300), dtype=torch.int8, device=DEV)
    s = torch.rand((37, 1) if per_row else (), device=DEV) + 0.01
    out = triton_quant.dequantize(q, s, dtype)
    _assert_out_equal(out, ref.dequantize(q, s, dtype))


def test_dequantize_strided_weight(seed):
    q = torch.randint(-128, 128, (64, 48), dtype=torch.int8, device=DEV).t()
    s = torch.rand(48, device=DEV) + 0.01
    out = triton_quant.dequantize(q, s, torch.float32)
    assert torch.equal(out, ref.dequantize(q.contiguous(), s, torch.float32))


# ---------------------------------------------------------------------------------------------
# GEMM + epilogue
# ---------------------------------------------------------------------------------------------
GENERIC = [GemmConfig("generic", 16, 32, 64, group_m=1), GemmConfig("generic", 32, 16, 32, group_m=2, num_stages=2)]
TMA = [GemmConfig("tma", 16, 32, 32), GemmConfig("tma", 32, 32, 32, epilogue_subtile=True, ctas_per_sm=2)]


def _gemm_case(m, k, n, per_row, with_bias, out_dtype, cfg):
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=DEV)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEV)
    # scales keep |out| well inside float16's range
    xs = (torch.rand(m, device=DEV) + 0.1) * 1e-3
    ws = torch.rand(n, device=DEV) + 0.01 if per_row else torch.rand((), device=DEV) + 0.01
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16) if with_bias else None
    out = torch.full((m, n), float("nan"), device=DEV, dtype=out_dtype)  # poison: every element must be written
    triton_gemm.gemm(xq, xs, wq, ws, bias, out, cfg)
    expect = ref.epilogue(ref.int8_matmul(xq, wq), xs, ws, bias, out_dtype)
    _assert_out_equal(out, expect)


@pytest.mark.parametrize("cfg", GENERIC, ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 16, 20), (15, 100, 24), (16, 64, 40), (17, 70, 33), (33, 200, 17)])
@pytest.mark.parametrize("per_row", [True, False])
def test_generic_gemm_exact(seed, cfg, m, k, n, per_row):
    _gemm_case(m, k, n, per_row, with_bias=m % 2 == 1, out_dtype=torch.float32, cfg=cfg)


@pytest.mark.parametrize("cfg", TMA, ids=str)
@pytest.mark.parametrize("m,k,n", [(1, 16, 24), (17, 80, 40), (70, 64, 48)])
@pytest.mark.parametrize("per_row", [True, False])
def test_tma_gemm_exact(seed, cfg, m, k, n, per_row):
    _gemm_case(m, k, n, per_row, with_bias=per_row, out_dtype=torch.float32, cfg=cfg)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [GENERIC[0], TMA[1]], ids=str)
def test_gemm_half_outputs(seed, out_dtype, cfg):
    _gemm_case(19, 96, 40, True, True, out_dtype, cfg)


def test_gemm_strided_weight_generic(seed):
    wq = torch.randint(-128, 128, (80, 24), dtype=torch.int8, device=DEV).t()  # [24, 80] with strides (1, 24)
    xq = torch.randint(-128, 128, (5, 80), dtype=torch.int8, device=DEV)
    xs, ws = torch.rand(5, device=DEV) + 0.1, torch.rand(24, device=DEV) + 0.1
    out = torch.empty(5, 24, device=DEV)
    triton_gemm.gemm(xq, xs, wq, ws, None, out, GENERIC[0])
    assert torch.equal(out, ref.epilogue(ref.int8_matmul(xq, wq.contiguous()), xs, ws, None, torch.float32))


def test_gemm_empty_dims(seed):
    xs, ws = torch.ones(3, device=DEV), torch.ones(4, device=DEV)
    bias = torch.randn(4, device=DEV)
    out = torch.full((3, 4), float("nan"), device=DEV)
    triton_gemm.gemm(torch.empty(3, 0, dtype=torch.int8, device=DEV), xs,
                     torch.empty(4, 0, dtype=torch.int8, device=DEV), ws, bias, out, GENERIC[0])
    assert torch.equal(out, bias.expand(3, 4))


# ---------------------------------------------------------------------------------------------
# Warp-specialized TMA configs (GemmConfig.warp_spec; HOPPER_TABLE's large-M row): bit-identical to the same tiles
# without it, every epilogue. On a GPU the measured variants (128-row tiles: the pass splits them into two consumers);
# under the interpreter small tiles of the same code path (the interpreter ignores the specialization). M = 200 runs
# a second row tile and rows past 128 (item 28's bug: the second consumer's x scales came from 64 rows further on);
# a LoRA term or a gated residual runs the tiles without warp specialization (triton_gemm.gemm's rule; the residual
# differed once programs run several tiles, item 47), so those cases compare the rule.
# ---------------------------------------------------------------------------------------------
WS = ([GemmConfig("tma", 32, 32, 32, warp_spec=True), GemmConfig("tma", 32, 64, 32, num_stages=2, warp_spec=True)]
      if INTERPRETED else [configs.HOPPER_WS_VARIANTS[0], configs.HOPPER_WS_LARGE])


def _ws_run(cfg, xq, xs, wq, ws, bias, out, lora, gate, rows_per_batch):
    triton_gemm.gemm(xq, xs, wq, ws, bias, out, cfg, *lora, gate=gate, rows_per_batch=rows_per_batch)
    return out


@pytest.mark.parametrize("cfg", WS, ids=str)
@pytest.mark.parametrize("m", [1, 15, 17, 200, 517])
@pytest.mark.parametrize("epilogue", ["plain", "bias", "residual", "lora", "residual+lora"])
def test_ws_gemm_bit_identical_to_tma(seed, cfg, m, epilogue):
    k, n = 80, 72  # neither a multiple of the tiles (TMA takes K in steps of 16)
    per_row = m % 2 == 1
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=DEV)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEV)
    xs = (torch.rand(m, device=DEV) + 0.1) * 1e-3
    ws = torch.rand(n, device=DEV) + 0.01 if per_row else torch.rand((), device=DEV) + 0.01
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16) if epilogue != "plain" else None
    rank = 80 if m == 200 else 16  # 80: padded to 128, two 64-rank chunks
    lora = ((torch.randn(m, rank, device=DEV) * 0.1).to(torch.bfloat16),
            (torch.randn(n, rank, device=DEV) * 0.1).to(torch.bfloat16)) if "lora" in epilogue else (None, None)
    rows_per_batch = max(1, m // 3)  # batches that start inside a row tile (and inside the second consumer's half)
    gate = torch.randn(-(-m // rows_per_batch), n, device=DEV, dtype=torch.bfloat16) if "residual" in epilogue \
        else None
    start = torch.randn(m, n, device=DEV, dtype=torch.bfloat16) if gate is not None \
        else torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)
    plain = dataclasses.replace(cfg, warp_spec=False, num_warps=max(4, cfg.block_m * cfg.block_n // 4096))
    expect = _ws_run(plain, xq, xs, wq, ws, bias, start.clone(), lora, gate, rows_per_batch)
    out = _ws_run(cfg, xq, xs, wq, ws, bias, start.clone(), lora, gate, rows_per_batch)
    assert torch.equal(out, expect)
    if epilogue in ("plain", "bias"):
        _assert_out_equal(out, ref.epilogue(ref.int8_matmul(xq, wq), xs, ws, bias, torch.bfloat16))


@pytest.mark.parametrize("cfg", WS[:1], ids=str)
def test_ws_gemm_float32_output_and_strided_rows(seed, cfg):
    """float32 out, and operands whose rows are views with padded strides (in-kernel descriptors take strides)."""
    m, k, n = 33, 96, 40
    xq = torch.randint(-128, 128, (m, k + 32), dtype=torch.int8, device=DEV)[:, :k]
    wq = torch.randint(-128, 128, (n, k + 16), dtype=torch.int8, device=DEV)[:, :k]
    xs, ws = (torch.rand(m, device=DEV) + 0.1) * 1e-3, torch.rand(n, device=DEV) + 0.01
    out = torch.full((m, n + 4), float("nan"), device=DEV)[:, :n]
    triton_gemm.gemm(xq, xs, wq, ws, None, out, cfg)
    assert torch.equal(out, ref.epilogue(ref.int8_matmul(xq, wq), xs, ws, None, torch.float32))


# ---------------------------------------------------------------------------------------------
# Split tail (GemmConfig.split_tail, opt-in): the last, partial wave of the persistent grid split over K and summed
# in int32; bit-identical to the same tiles without it, every epilogue, and the workspace left zeroed for the next
# call. Under the interpreter (4 "SMs") small tiles give tails; on a GPU the table's large-M tiles.
# ---------------------------------------------------------------------------------------------
SPLIT = ([GemmConfig("tma", 16, 16, 32, ctas_per_sm=2, split_tail=1),
          GemmConfig("tma", 32, 32, 32, epilogue_subtile=True, split_tail=1)]
         if INTERPRETED else [GemmConfig("tma", 128, 128, 64, num_stages=4, ctas_per_sm=2, split_tail=1),
                              GemmConfig("tma", 64, 128, 128, num_stages=4, ctas_per_sm=2, split_tail=1)])


def test_tail_plan():
    assert triton_gemm.tail_plan(1080, 264, 60) == (1056, 11)  # Z-Image's attention output, 128 x 128 tiles
    assert triton_gemm.tail_plan(1080, 264, 60, 16) == (1056, 3)  # parts of >= 16 K tiles
    assert triton_gemm.tail_plan(1080, 264, 60, 64) == (1080, 1)  # the Hopper table: K = 3840 is not split
    assert triton_gemm.tail_plan(864, 264, 240, 64) == (792, 3)  # Chroma's single-block linear2
    assert triton_gemm.tail_plan(3240, 264, 60) == (3168, 3)
    assert triton_gemm.tail_plan(5760, 264, 60) == (5760, 1)  # a last wave over half full: left as it is
    assert triton_gemm.tail_plan(1056, 264, 60) == (1056, 1)  # no partial wave
    assert triton_gemm.tail_plan(3240, 264, 60, 64) == (3240, 1)  # Z-Image's qkv: not two parts of 64 K tiles
    assert triton_gemm.tail_plan(288, 264, 6) == (264, 6)  # at most k_tiles parts
    assert triton_gemm.tail_plan(2, 264, 2) == (2, 1)  # less than one wave: not split
    assert triton_gemm.tail_plan(36, 264, 240, 16) == (36, 1)  # a LoRA down projection (N = 64) at K = 15360
    assert triton_gemm.tail_plan(9, 8, 1) == (9, 1)  # one K tile: nothing to split
    assert triton_gemm.tail_plan(24, 264, 31, 16) == (24, 1)  # not two parts of 16 K tiles
    with pytest.raises(ValueError, match="split_tail"):
        GemmConfig("generic", 16, 16, 32, split_tail=1)
    with pytest.raises(ValueError, match="split_tail"):
        GemmConfig("tma", 16, 16, 32, split_tail=-1)


@pytest.mark.parametrize("cfg", SPLIT, ids=str)
@pytest.mark.parametrize("m,k,n", [(95, 80, 88), (65, 96, 72), (130, 80, 40)] if INTERPRETED
                         else [(2304, 384, 2048), (4608, 3840, 3840), (4608, 1024, 3072)])
@pytest.mark.parametrize("epilogue", ["bias", "residual", "lora", "residual+lora"])
def test_split_tail_gemm_bit_identical(seed, cfg, m, k, n, epilogue):
    programs = triton_quant.num_sms(torch.device(DEV)) * cfg.ctas_per_sm
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    k_tiles = -(-k // cfg.block_k)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=DEV)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEV)
    xs = (torch.rand(m, device=DEV) + 0.1) * 1e-3
    ws = torch.rand(n, device=DEV) + 0.01
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    lora = ((torch.randn(m, 16, device=DEV) * 0.1).to(torch.bfloat16),
            (torch.randn(n, 16, device=DEV) * 0.1).to(torch.bfloat16)) if "lora" in epilogue else (None, None)
    rows_per_batch = max(1, m // 3)  # batches that start inside a row tile (and inside the second consumer's half)
    gate = torch.randn(-(-m // rows_per_batch), n, device=DEV, dtype=torch.bfloat16) if "residual" in epilogue \
        else None
    start = torch.randn(m, n, device=DEV, dtype=torch.bfloat16) if gate is not None \
        else torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)
    plain = dataclasses.replace(cfg, split_tail=0)
    if gate is not None:  # a residual epilogue runs with its own config rule (configs.for_residual), both alike
        cfg, plain = configs.for_residual(cfg), configs.for_residual(plain)
    expect = _ws_run(plain, xq, xs, wq, ws, bias, start.clone(), lora, gate, rows_per_batch)
    for _ in range(2):  # the second call finds the workspace as the first left it: zeroed
        out = _ws_run(cfg, xq, xs, wq, ws, bias, start.clone(), lora, gate, rows_per_batch)
        assert torch.equal(out, expect)
    if epilogue == "bias":
        _assert_out_equal(out, ref.epilogue(ref.int8_matmul(xq, wq), xs, ws, bias, torch.bfloat16))
    # these shapes do split: a full wave and a last one at most half full (the interpreter: 16 x 16 tiles on 8
    # programs 36 / 25 / 27, 32 x 32 tiles on 4 programs 9 / 9 / 10; on the GPU: 288 tiles of 128 x 128 or 576 of
    # 64 x 128 on 264 programs, 3-6 K tiles)
    assert triton_gemm.tail_plan(tiles, programs, k_tiles, cfg.split_tail)[1] > 1 or m == 4608


def test_ws_config_rules():
    """Hopper only: its table's large-M row, LoRA terms on its plain table; other GPUs' tables have none, and a
    config given for them runs the same tiles without it (8 warps for 128 x 256); the resource fallback never
    halves the output tile or the rows of a warp-specialized config."""
    from int8_w8a8.kernels import dispatch

    for gen in dispatch.GENERATIONS:
        if gen.table is not None and gen.table is not configs.HOPPER_TABLE:
            assert not any(c.warp_spec for c in gen.table.configs()), gen.name
    hopper = configs.HOPPER_TABLE
    assert hopper.pick(4608) is configs.HOPPER_WS_LARGE
    assert [c for c in hopper.configs() if c.warp_spec] == [configs.HOPPER_WS_LARGE]
    assert hopper.pick(4608, n=256) is configs.HOPPER_WS_LARGE
    for m in (1, 17, 200, 1024, 1025, 4608):
        plain = configs.HOPPER_PLAIN_TABLE.pick(m)
        assert hopper.pick(m, lora=True) == plain and not plain.warp_spec
        assert hopper.pick(m, residual=True) == plain  # a gated residual epilogue (item 47)
        assert hopper.pick(m, n=64) == plain  # a LoRA's down projection: N = its rank
        if hopper.pick(m).kernel == "tma":
            assert hopper.pick(m, tma_ok=False) == configs.MMA_TABLE.pick(m)
    wide = configs.HOPPER_WS_VARIANTS[2]
    assert (wide.block_n, wide.warp_spec) == (256, True)
    assert configs.for_arch(wide, (9, 0)) is wide
    for arch in ((8, 6), (8, 9), (10, 0), (12, 0)):
        assert configs.for_arch(wide, arch) == dataclasses.replace(wide, warp_spec=False, num_warps=8)
    assert configs.for_residual(wide) is wide
    # a config given directly (triton_gemm.gemm): unspecialized with a LoRA term or a gated residual, whose output
    # tile comes in halves as for_residual gives it; as given on Hopper otherwise, unspecialized elsewhere
    large, plain_large = configs.HOPPER_WS_LARGE, configs.without_warp_spec(configs.HOPPER_WS_LARGE)
    assert configs.for_launch(large, (9, 0), lora=False, residual=False) is large
    assert configs.for_launch(large, None, lora=False, residual=False) is large
    assert configs.for_launch(large, (12, 0), lora=False, residual=False) == plain_large
    assert configs.for_launch(large, (9, 0), lora=True, residual=False) == plain_large
    for lora in (False, True):
        res = configs.for_launch(large, (9, 0), lora=lora, residual=True)
        assert res == dataclasses.replace(plain_large, epilogue_subtile=True) and res == configs.for_residual(res)
    assert configs.for_launch(plain_large, (9, 0), lora=True, residual=True) is plain_large
    cfg, seen = wide, []
    while cfg is not None:
        seen.append(cfg)
        cfg = configs.smaller(cfg)
    assert not any(c.epilogue_subtile and c.warp_spec for c in seen)
    assert all(c.block_m == 128 for c in seen if c.warp_spec)
    base = GemmConfig("tma", 128, 128, 64, warp_spec=True)
    for bad in ({"kernel": "generic"}, {"num_warps": 8}, {"epilogue_subtile": True}):
        with pytest.raises(ValueError, match="warp_spec"):
            dataclasses.replace(base, **bad)


# ---------------------------------------------------------------------------------------------
# The whole Triton int8_linear (quantize + GEMM), forced onto each kernel
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [None, GENERIC[1], TMA[0]], ids=str)
@pytest.mark.parametrize("m", [1, 15, 16, 17])
def test_triton_int8_linear_matches_twin(seed, cfg, m):
    k, n = 96, 40
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    q, s = ref.quantize_weight(torch.randn(n, k, device=DEV) * 0.02)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    backend = Backend("triton", "test", (9, 0))
    y = triton_ops.int8_linear(x, q, s, bias, torch.float32, None, 0, backend, config=cfg)
    assert torch.equal(y, ref.int8_linear(x, q, s, bias, out_dtype=torch.float32))


def test_triton_int8_linear_nan_row_poisons_only_its_row(seed):
    x = torch.randn(2, 5, 64, device=DEV)
    x[1, 3, 10] = float("nan")
    x[0, 0, 0] = float("inf")
    q, s = ref.quantize_weight(torch.randn(24, 64, device=DEV) * 0.02)
    y = triton_ops.int8_linear(x, q, s, None, torch.float32, None, 0, Backend("triton", "test", (8, 0)))
    bad = torch.zeros(2, 5, dtype=torch.bool, device=DEV)
    bad[1, 3] = bad[0, 0] = True
    assert torch.isnan(y[bad]).all()
    assert torch.isfinite(y[~bad]).all()
    assert torch.equal(y[~bad], ref.int8_linear(x, q, s, out_dtype=torch.float32)[~bad])


@pytest.mark.parametrize("group", [64, 256])
def test_triton_int8_linear_rotation(seed, group):
    k, n = 2 * group, 48
    x = torch.randn(20, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV) * 0.02
    q, s = ref.quantize_weight(w, rotate_group=group)
    y = triton_ops.int8_linear(x, q, s, None, torch.float32, None, group, Backend("triton", "test", (9, 0)))
    y_twin = ref.int8_linear(x, q, s, out_dtype=torch.float32, rotate_group=group)
    assert rel_err(y, y_twin) < 2e-3  # only rare off-by-one activation codes differ
    y_float = x.double() @ w.double().T
    assert rel_err(y, y_float) < 1.5e-2


# ---------------------------------------------------------------------------------------------
# LoRA term in the epilogue
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [GENERIC[0], TMA[1], None], ids=str)
@pytest.mark.parametrize("m,rank", [(1, 8), (17, 16), (40, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lora_epilogue_matches_twin(seed, cfg, m, rank, dtype):
    k, n = 96, 48
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    q, s = ref.quantize_weight(torch.randn(n, k, device=DEV) * 0.05)
    lora_a = (torch.randn(rank, k, device=DEV) * 0.1).to(dtype)
    lora_b = (torch.randn(n, rank, device=DEV) * 0.1).to(dtype)
    backend = Backend("triton", "test", (9, 0))
    y = triton_ops.int8_linear(x, q, s, None, torch.float32, None, 0, backend, config=cfg, lora_a=lora_a,
                               lora_b=lora_b)
    y_twin = ref.int8_linear(x, q, s, out_dtype=torch.float32, lora_a=lora_a, lora_b=lora_b)
    y_base = ref.int8_linear(x, q, s, out_dtype=torch.float32)
    assert rel_err(y - y_base, y_twin - y_base) < 1e-5  # the low-rank term, summed in another order
    assert rel_err(y, y_twin) < 1e-6
