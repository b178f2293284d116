"""The torch twins (the CPU path and the kernels' oracle) against float64 arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from int8_w8a8.kernels import hadamard
from int8_w8a8.kernels import reference as ref

from .conftest import rel_err, sqnr_db

pytestmark = pytest.mark.unit

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------ quantize_rows
def test_round_half_to_even_and_clamp():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, -128.5, 300.0, -300.0, 3.49999]])
    q, _ = ref._quantize_float_rows(x, fixed_scale=torch.tensor(1.0))
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 126, 127, -128, 127, -128, 3]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 7, 100, 16384, 70001])
def test_quantize_rows_reconstructs_within_half_step(seed, dtype, k):
    m = 3 if k > 16384 else 17
    x = (torch.randn(m, k) * torch.logspace(-3, 3, m)[:, None]).to(dtype)
    q, s = ref.quantize_rows(x)
    assert q.dtype == torch.int8 and q.shape == (m, k) and s.shape == (m, 1) and s.dtype == torch.float32
    xf = x.double()
    err = (q.double() * s.double() - xf).abs()
    # half a step, plus the float32 rounding of x * (1 / scale) at up to 127 steps
    assert (err <= s.double() * (0.5 + 1e-4)).all()
    assert (q.abs().amax(dim=1) == 127).all()  # every row uses the full range
    assert torch.allclose(s[:, 0].double(), xf.abs().amax(dim=1) / 127, rtol=1e-6, atol=0)


def test_quantize_rows_folds_leading_dims_and_strides(seed):
    x = torch.randn(2, 40, 3, 96)[:, ::2].transpose(1, 2)  # [2, 3, 20, 96], non-contiguous
    q, s = ref.quantize_rows(x)
    q2, s2 = ref.quantize_rows(x.contiguous().reshape(-1, 96))
    assert q.shape == (120, 96) and torch.equal(q, q2) and torch.equal(s, s2)


def test_zero_and_nonfinite_rows(seed):
    x = torch.randn(5, 64)
    x[1] = 0
    x[2, 3] = float("nan")
    x[3, 0] = float("inf")
    q, s = ref.quantize_rows(x)
    assert (q[1] == 0).all() and s[1, 0] == ref.TINY_SCALE
    assert torch.isnan(s[2:4]).all() and torch.isfinite(s[[0, 1, 4]]).all()
    assert q[2, 3] == 0 and q[3, 0] == 0


def test_empty_inputs():
    q, s = ref.quantize_rows(torch.empty(0, 8))
    assert q.shape == (0, 8) and s.shape == (0, 1)
    q, s = ref.quantize_rows(torch.empty(3, 0))
    assert q.shape == (3, 0) and (s == ref.TINY_SCALE).all()
    y = ref.int8_linear(torch.randn(3, 0), torch.empty(4, 0, dtype=torch.int8), torch.ones(4), torch.arange(4.0))
    assert torch.equal(y, torch.arange(4.0).expand(3, 4))


# ------------------------------------------------------------------ quantize_weight
@pytest.mark.parametrize("per_row", [True, False])
def test_quantize_weight_round_to_nearest(seed, per_row):
    w = torch.randn(33, 70, dtype=torch.bfloat16) * 0.05
    q, s = ref.quantize_weight(w, per_row=per_row)
    assert s.shape == ((33, 1) if per_row else ())
    assert ((q.double() * s.double() - w.double()).abs() <= s.double() * (0.5 + 1e-4)).all()


def test_stochastic_rounding_is_seeded_and_unbiased(seed):
    w = torch.randn(16, 256) * 0.05
    q1, s1 = ref.quantize_weight(w, seed=7)
    q2, _ = ref.quantize_weight(w, seed=7)
    q3, _ = ref.quantize_weight(w, seed=8)
    assert torch.equal(q1, q2) and not torch.equal(q1, q3)
    # each draw is within one step, and the mean over many seeds converges on w
    assert ((q1.double() * s1 - w.double()).abs() <= s1 * (1 + 1e-4)).all()
    mean = torch.stack([ref.quantize_weight(w, seed=i)[0].double() for i in range(256)]).mean(0) * s1
    rtn_err = (ref.quantize_weight(w)[0].double() * s1 - w.double()).abs().mean()
    assert (mean - w.double()).abs().mean() < rtn_err / 5


def test_stochastic_rounding_keeps_exact_grid_values():
    s = torch.tensor(0.25)
    w = torch.arange(-127, 128, dtype=torch.float32)[None, :] * s  # already on the grid, absmax 127 * s
    q, _ = ref.quantize_weight(w, per_row=False, seed=3)
    assert torch.equal(q[0].int(), torch.arange(-127, 128, dtype=torch.int32))


def test_uniform_noise_matches_its_definition():
    u = ref.uniform_noise(1234, 5, 3, 4, torch.device("cpu"))
    for i in range(3):
        for j in range(4):
            rh = ref.fmix32_int((5 + i) ^ ref.fmix32_int(1234))
            h = ref.fmix32_int(((j * 0x9E3779B1) & 0xFFFFFFFF) ^ rh)
            assert u[i, j].item() == (h >> 8) * 2.0**-24


# ------------------------------------------------------------------ GEMM and int8_linear
def test_int8_matmul_is_exact_at_the_extremes(seed):
    a = torch.randint(-128, 128, (19, 3001), dtype=torch.int8)
    b = torch.randint(-128, 128, (23, 3001), dtype=torch.int8)
    a[0] = -128
    b[0] = -128  # 3001 * 16384 = 49 million: beyond float32's exact integers, within int32
    acc = ref.int8_matmul(a, b)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.double(), a.double() @ b.double().T)


@pytest.mark.parametrize("m", [1, 15, 16, 17])
@pytest.mark.parametrize("k,n", [(100, 33), (4099, 48)])
@pytest.mark.parametrize("per_row", [True, False])
def test_int8_linear_accuracy(seed, m, k, n, per_row):
    x = torch.randn(m, k)
    w = torch.randn(n, k) * 0.02
    bias = torch.randn(n)
    q, s = ref.quantize_weight(w, per_row=per_row)
    y = ref.int8_linear(x, q, s, bias, out_dtype=torch.float32)
    y64 = x.double() @ w.double().T + bias.double()
    assert rel_err(y, y64) <= (1.5e-2 if per_row else 2.0e-2)
    # the twin computes exactly its documented formula: dequantized operands, float32 epilogue
    xq, xs = ref.quantize_rows(x)
    exact = (xq.double() @ q.double().T) * xs.double() * (s.double().reshape(1, -1) if per_row else s.double())
    assert rel_err(y - bias, exact) < 1e-6


def test_int8_linear_out_dtypes_and_shapes(seed):
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    q, s = ref.quantize_weight(torch.randn(24, 64) * 0.05)
    assert ref.int8_linear(x, q, s).dtype == torch.float16
    y = ref.int8_linear(x, q, s.reshape(-1), out_dtype=torch.bfloat16)
    assert y.shape == (2, 3, 24) and y.dtype == torch.bfloat16


def test_nonfinite_row_poisons_only_its_row(seed):
    x = torch.randn(6, 64)
    x[2, 5] = float("nan")
    x[4, 0] = float("-inf")
    q, s = ref.quantize_weight(torch.randn(16, 64) * 0.05)
    bias = torch.randn(16)
    y = ref.int8_linear(x, q, s, bias)
    assert torch.isnan(y[[2, 4]]).all()
    keep = [0, 1, 3, 5]
    assert torch.equal(y[keep], ref.int8_linear(x[keep], q, s, bias))  # rows are independent
    assert torch.isfinite(y[keep]).all()


def test_zero_rows_give_exact_zeros(seed):
    x = torch.zeros(4, 50)
    q, s = ref.quantize_weight(torch.randn(8, 50))
    assert torch.equal(ref.int8_linear(x, q, s), torch.zeros(4, 8))


# ------------------------------------------------------------------ smoothing and rotation
@pytest.mark.parametrize("group", [64, 128, 256])
def test_hadamard_is_orthonormal_and_symmetric(group):
    h = hadamard.hadamard(group, dtype=torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(group, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)


@pytest.mark.parametrize("group", [64, 256])
def test_hadamard_matches_comfy_kitchen_convrot(group):
    int8_utils = pytest.importorskip("comfy_kitchen.tensor.int8_utils")
    kitchen = int8_utils._build_hadamard(group, dtype=torch.float64)
    assert torch.allclose(hadamard.hadamard(group, dtype=torch.float64), kitchen, atol=1e-12)


def test_hadamard_128_is_sylvester():
    # Sylvester (scipy.linalg.hadamard): H[i, j] = (-1)^popcount(i & j)
    bits = torch.tensor([[bin(a & b).count("1") % 2 for b in range(128)] for a in range(128)])
    assert torch.equal(hadamard.hadamard_pm1(128), (1 - 2 * bits).float())


@pytest.mark.parametrize("group", [64, 128, 256])
def test_rotation_round_trip_and_accuracy_with_outliers(seed, group):
    k, n = 4 * group, 40
    w = torch.randn(n, k) * 0.02
    q, s = ref.quantize_weight(w, rotate_group=group)
    assert rel_err(ref.dequantize(q, s, torch.float32, rotate_group=group), w) < 1.5e-2
    x = torch.randn(32, k)
    x[:, 3] *= 50  # an outlier channel: rotation spreads it over its group
    y64 = x.double() @ w.double().T
    y_rot = ref.int8_linear(x, q, s, out_dtype=torch.float32, rotate_group=group)
    q0, s0 = ref.quantize_weight(w)
    y_plain = ref.int8_linear(x, q0, s0, out_dtype=torch.float32)
    assert sqnr_db(y64, y_rot) > sqnr_db(y64, y_plain) + 3


def test_smoothing_matches_float(seed):
    k = 96
    x = torch.randn(20, k) * torch.linspace(0.1, 10, k)
    w = torch.randn(30, k) * 0.02
    smooth = x.abs().amax(0).sqrt()
    q, s = ref.quantize_weight(w * smooth)
    y = ref.int8_linear(x, q, s, out_dtype=torch.float32, smooth=smooth)
    assert rel_err(y, x.double() @ w.double().T) < 1.5e-2


def test_dequantize_is_exact(seed):
    q = torch.randint(-128, 128, (9, 31), dtype=torch.int8)
    s = torch.rand(9, 1) + 0.1
    assert torch.equal(ref.dequantize(q, s, torch.float32), q.float() * s)
    assert torch.equal(ref.dequantize(q, s.reshape(-1), torch.bfloat16), (q.float() * s).to(torch.bfloat16))
    assert torch.equal(ref.dequantize(q, torch.tensor(0.5), torch.float16), (q.float() * 0.5).half())


# ------------------------------------------------------------------ bad input
def _linear_args():
    x = torch.randn(4, 32)
    q, s = ref.quantize_weight(torch.randn(8, 32))
    return x, q, s


BAD_LINEAR = [
    ("x", lambda x, q, s: ref.int8_linear(x.int(), q, s)),
    ("x", lambda x, q, s: ref.int8_linear(x[:, :31], q, s)),
    ("q", lambda x, q, s: ref.int8_linear(x, q.float(), s)),
    ("q", lambda x, q, s: ref.int8_linear(x, q[None], s)),
    ("scale", lambda x, q, s: ref.int8_linear(x, q, s.reshape(1, 8))),
    ("scale", lambda x, q, s: ref.int8_linear(x, q, torch.cat([s, s], 1))),
    ("scale", lambda x, q, s: ref.int8_linear(x, q, s[:7])),
    ("scale", lambda x, q, s: ref.int8_linear(x, q, s.half())),
    ("scale", lambda x, q, s: ref.int8_linear(x, q, torch.where(torch.arange(8)[:, None] == 3, float("nan"), s))),
    ("scale", lambda x, q, s: ref.int8_linear(x, q, -s)),
    ("scale", lambda x, q, s: ref.int8_linear(x, q, torch.tensor(0.0))),
    ("bias", lambda x, q, s: ref.int8_linear(x, q, s, torch.randn(7))),
    ("smooth", lambda x, q, s: ref.int8_linear(x, q, s, smooth=torch.ones(31))),
    ("smooth", lambda x, q, s: ref.int8_linear(x, q, s, smooth=torch.zeros(32))),
    ("rotate_group", lambda x, q, s: ref.int8_linear(x, q, s, rotate_group=32)),
    ("rotate_group", lambda x, q, s: ref.int8_linear(torch.randn(2, 96), torch.zeros(8, 96, dtype=torch.int8), s,
                                                      rotate_group=64)),
    ("out_dtype", lambda x, q, s: ref.int8_linear(x, q, s, out_dtype=torch.int8)),
]


@pytest.mark.parametrize("arg,call", BAD_LINEAR, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_LINEAR)])
def test_bad_linear_arguments_name_the_argument(arg, call):
    x, q, s = _linear_args()
    with pytest.raises(ValueError, match=rf"^{arg}"):
        call(x, q, s)


def test_bad_weights():
    with pytest.raises(ValueError, match=r"^w: contains NaN or Inf in 1 row\(s\), first rows \[2\]"):
        w = torch.randn(4, 8)
        w[2, 1] = float("inf")
        ref.quantize_weight(w)
    with pytest.raises(ValueError, match=r"^w: expected a 2-D"):
        ref.quantize_weight(torch.randn(8))
    with pytest.raises(ValueError, match=r"^rotate_group: ConvRot needs per-row"):
        ref.quantize_weight(torch.randn(4, 64), per_row=False, rotate_group=64)
    with pytest.raises(ValueError, match=r"^seed"):
        ref.quantize_weight(torch.randn(4, 64), seed=1.5)
    with pytest.raises(ValueError, match=r"^scale"):
        ref.dequantize(torch.zeros(4, 8, dtype=torch.int8), torch.ones(5), torch.float32)


def test_scale_checks_are_cached_per_tensor_version():
    x, q, s = _linear_args()
    ref.int8_linear(x, q, s)
    assert s._int8_w8a8_checked_version == s._version
    s.mul_(-1)  # an in-place change invalidates the cached check
    with pytest.raises(ValueError, match=r"^scale"):
        ref.int8_linear(x, q, s)
    assert math.isfinite(float(s.abs().min()))


def test_lora_term_is_added_exactly(seed):
    x = torch.randn(7, 64, dtype=torch.float64).float()
    w = torch.randn(24, 64) * 0.05
    a, b = torch.randn(4, 64) * 0.1, torch.randn(24, 4) * 0.1
    q, s = ref.quantize_weight(w)
    y = ref.int8_linear(x, q, s, out_dtype=torch.float32, lora_a=a, lora_b=b)
    base = ref.int8_linear(x, q, s, out_dtype=torch.float32)
    assert rel_err(y - base, (x.double() @ a.double().T) @ b.double().T) < 1e-5
    with pytest.raises(ValueError, match=r"^lora_a, lora_b: give both"):
        ref.int8_linear(x, q, s, lora_a=a)
    with pytest.raises(ValueError, match=r"^lora_a, lora_b: expected \[R, 64\] and \[24, R\]"):
        ref.int8_linear(x, q, s, lora_a=a, lora_b=b[:, :3])
