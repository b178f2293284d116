"""The SwiGLU GEMM (``kernels.fused.glu_gemm``): a SwiGLU MLP's two up projections on the same int8 rows as one GEMM
that writes only ``h = silu(g) * u`` (Hopper's Gluon row, ``gluon_gemm._gluon_glu_kernel``), its one-weight form
with a plain head part in the same launch (``split_glu_gemm``: FLUX.2's single-block linear1), and the fused
blocks' choice between it and the two GEMMs + ``glu_quantize`` (``ops.blocks.common.glu_quantized``).

Everywhere: the twin (``reference_fused.glu_gemm``) against float64, the function against the twin at odd shapes
(M = 1, 15, 16, 17; K and F not multiples of 16), per-row and per-tensor scales, biases, strided rows, NaN and
all-zero rows, its argument checks, its rule, the custom op (opcheck, a fullgraph compile). On an SM 9.x GPU: the
Gluon kernel itself against the twin (one unit in the last place where the sigmoid's last bit differs), and the
two paths of a fused block's SwiGLU against each other. The offline sm_90 compile of the kernel is in
``test_gluon_gemm.py`` (``bench_gluon_gemm --check``).
"""

from __future__ import annotations

import pytest
import torch

from int8_w8a8.kernels import fused, reference_fused
from int8_w8a8.kernels import reference as ref

from .conftest import HAS_CUDA, KERNEL_DEVICE, sqnr_db, ulp_diff

DEV = KERNEL_DEVICE
HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


def _operands(m: int, k: int, f: int, per_row: bool = True, bias: bool = False, device=DEV, row_pad: int = 0):
    """int8 rows ``xq [M, K]`` (``row_pad`` bytes between rows beyond K), their scales, and the gate and up
    weights ``(q [F, K], scale, bias)`` quantized from Gaussian floats."""
    x = torch.randn(m, k, device=device)
    xq, xs = ref.quantize_rows(x)
    if row_pad:
        buf = torch.zeros(m, k + row_pad, dtype=torch.int8, device=device)
        buf[:, :k] = xq
        xq = buf[:, :k]
    pair = []
    for _ in range(2):
        wq, ws = ref.quantize_weight(torch.randn(f, k, device=device) * 0.05, per_row=per_row)
        b = (torch.randn(f, device=device) * 0.1).to(torch.bfloat16) if bias else None
        pair.append((wq, ws, b))
    return xq, xs.reshape(-1), pair[0], pair[1]


def _float64(xq, xs, gate, up) -> torch.Tensor:
    """``silu(g) * u`` with every product, scale and sum in float64 and no rounding between."""
    def proj(q, scale, bias):
        y = (xq.double() @ q.double().T) * xs.double()[:, None] * scale.double().reshape(1, -1)
        return y + bias.double() if bias is not None else y

    g, u = proj(*gate), proj(*up)
    return g * torch.sigmoid(g) * u


@pytest.mark.unit
@pytest.mark.parametrize("per_row,bias", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("m,k,f", [(1, 40, 7), (15, 100, 33), (16, 64, 48), (17, 96, 130)])
def test_twin_against_float64(seed, per_row, bias, dtype, m, k, f):
    """The twin rounds g and u to the output dtype and h once: within the dtype's rounding of float64."""
    xq, xs, gate, up = _operands(m, k, f, per_row, bias, device="cpu")
    h = reference_fused.glu_gemm(xq, xs, gate, up, dtype)
    assert h.dtype == dtype and h.shape == (m, f)
    want = _float64(xq, xs, gate, up)
    floor = {torch.bfloat16: 40.0, torch.float16: 55.0, torch.float32: 100.0}[dtype]
    assert sqnr_db(want, h.double()) > floor


@pytest.mark.kernels
@pytest.mark.parametrize("per_row,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("m,k,f,row_pad", [(1, 48, 7, 0), (15, 100, 33, 16), (17, 96, 130, 0), (1100, 160, 200, 32)])
def test_matches_the_twin(seed, per_row, bias, m, k, f, row_pad):
    """On any device: the twin's values (bit for bit where two GEMMs and torch compute it; within one unit in the
    last place where the Gluon kernel's sigmoid does), for strided rows too."""
    xq, xs, gate, up = _operands(m, k, f, per_row, bias, row_pad=row_pad)
    h = fused.glu_gemm(xq, xs, gate, up, torch.bfloat16)
    want = reference_fused.glu_gemm(xq, xs, gate, up, torch.bfloat16)
    assert h.shape == want.shape and h.dtype == want.dtype
    assert ulp_diff(h, want) <= 1
    assert float((h != want).float().mean()) < 1e-2


@pytest.mark.kernels
def test_nan_and_zero_rows(seed):
    """A NaN row scale poisons only its own row of h; an all-zero row of int8 codes gives silu(b_g) * b_u there."""
    xq, xs, gate, up = _operands(17, 64, 40, bias=True)
    xs[3] = float("nan")
    xq[5] = 0
    h = fused.glu_gemm(xq, xs, gate, up, torch.bfloat16)
    nan_rows = h.isnan().any(dim=1)
    assert nan_rows[3] and int(nan_rows.sum()) == 1
    g, u = gate[2].float(), up[2].float()
    torch.testing.assert_close(h[5].float(), (torch.nn.functional.silu(g) * u).to(torch.bfloat16).float(),
                               rtol=0, atol=0)


@pytest.mark.unit
def test_bad_arguments():
    xq, xs, gate, up = _operands(4, 32, 8, device="cpu")
    with pytest.raises(ValueError, match="one shape"):
        fused.glu_gemm(xq, xs, gate, (up[0][:4], up[1][:4], None), torch.bfloat16)
    with pytest.raises(ValueError, match="K = 16 of the rows"):
        fused.glu_gemm(xq[:, :16], xs, gate, up, torch.bfloat16)
    with pytest.raises(ValueError, match="per-row or per-tensor"):
        fused.glu_gemm(xq, xs, gate, (up[0], up[1].amax().reshape(()), None), torch.bfloat16)
    with pytest.raises(ValueError, match="bias to both"):
        fused.glu_gemm(xq, xs, gate, (up[0], up[1], torch.zeros(8)), torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype"):
        fused.glu_gemm(xq, xs, gate, up, torch.int32)


@pytest.mark.unit
def test_rule_off_hopper(monkeypatch):
    """The rule names why the Gluon kernel does not run: off CUDA, and (on a CUDA GPU) below the large-M bucket;
    where it would run, the blocks take it only with ``INT8_W8A8_GLU_GEMM=1`` (opt-in: measured no faster)."""
    xq, _, gate, up = _operands(4, 32, 8, device="cpu")
    with monkeypatch.context() as patch:  # where the Gluon row would run
        patch.setattr(fused, "_gluon_row", lambda xq, width: None)
        patch.delenv("INT8_W8A8_GLU_GEMM", raising=False)
        assert fused.glu_gemm_rule(xq, 8).startswith("off unless INT8_W8A8_GLU_GEMM=1")
        patch.setenv("INT8_W8A8_GLU_GEMM", "0")
        assert fused.glu_gemm_rule(xq, 8).startswith("off unless")
        patch.setenv("INT8_W8A8_GLU_GEMM", "1")
        assert fused.glu_gemm_rule(xq, 8) is None
    assert fused.glu_gemm_rule(xq, 8) == "not on a CUDA GPU"
    assert fused.glu_kernel_rule(xq, gate[0], up[0]) == "not on a CUDA GPU"
    assert "one [F, K]" in fused.glu_kernel_rule(xq, gate[0], up[0][:4])
    if HOPPER:
        xq, _, gate, up = _operands(16, 128, 256, device="cuda")
        assert "not the Gluon one" in fused.glu_gemm_rule(xq, 256)


@pytest.mark.kernels
def test_op_and_compile(seed):
    """The custom op passes opcheck and traces into one fullgraph with the eager function's values."""
    xq, xs, gate, up = _operands(17, 64, 40, bias=True)
    args = (xq, xs, *gate, *up, torch.bfloat16)
    torch.library.opcheck(torch.ops.int8_w8a8.glu_gemm, args, test_utils=("test_schema", "test_faketensor"))

    def mlp_in(xq, xs, gq, gs, gb, uq, us, ub):
        return fused.glu_gemm(xq, xs, (gq, gs, gb), (uq, us, ub), torch.bfloat16) * 2

    compiled = torch.compile(mlp_in, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(xq, xs, *gate, *up), mlp_in(xq, xs, *gate, *up), rtol=0, atol=0)


def _split_operands(m: int, k: int, head: int, f: int, per_row: bool = True, bias: bool = False, device=DEV):
    """Rows and one weight ``[head | gate | up]`` (``(q [head + 2F, K], scale, bias)``)."""
    xq, xs, _, _ = _operands(m, k, 1, device=device)
    q, scale = ref.quantize_weight(torch.randn(head + 2 * f, k, device=device) * 0.05, per_row=per_row)
    b = (torch.randn(head + 2 * f, device=device) * 0.1).to(torch.bfloat16) if bias else None
    return xq, xs, q, scale, b


@pytest.mark.unit
@pytest.mark.parametrize("per_row,bias", [(True, True), (False, False)])
@pytest.mark.parametrize("m,k,head,f", [(1, 40, 3, 7), (17, 96, 48, 130)])
def test_split_twin_is_the_gemm_and_glu_gemm(seed, per_row, bias, m, k, head, f):
    """One weight ``[head | gate | up]``: the head part is the INT8 GEMM's first columns and h ``glu_gemm``'s twin on
    the weight's row blocks, bit for bit."""
    xq, xs, q, scale, b = _split_operands(m, k, head, f, per_row, bias, device="cpu")
    y_head, h = reference_fused.split_glu_gemm(xq, xs, q, scale, b, head, torch.bfloat16)
    rows = [slice(0, head), slice(head, head + f), slice(head + f, head + 2 * f)]
    parts = [(q[r], scale[r] if scale.dim() else scale, b[r] if b is not None else None) for r in rows]
    assert torch.equal(y_head, ref.epilogue(ref.int8_matmul(xq, parts[0][0]), xs.reshape(-1, 1), *parts[0][1:],
                                            torch.bfloat16))
    assert torch.equal(h, reference_fused.glu_gemm(xq, xs, parts[1], parts[2], torch.bfloat16))


@pytest.mark.kernels
@pytest.mark.parametrize("m,k,head,f", [(15, 100, 24, 33), (1100, 160, 384, 200)])
def test_split_matches_the_twin_op_and_compile(seed, m, k, head, f):
    """``split_glu_gemm`` against its twin (one ulp where the Gluon kernel's sigmoid differs), its op (opcheck)
    and a fullgraph compile; its argument checks."""
    xq, xs, q, scale, b = _split_operands(m, k, head, f, bias=True)
    y_head, h = fused.split_glu_gemm(xq, xs, q, scale, b, head, torch.bfloat16)
    want_head, want = reference_fused.split_glu_gemm(xq, xs, q, scale, b, head, torch.bfloat16)
    assert torch.equal(y_head, want_head) and ulp_diff(h, want) <= 1
    torch.library.opcheck(torch.ops.int8_w8a8.split_glu_gemm, (xq, xs, q, scale, b, head, torch.bfloat16),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda *a: fused.split_glu_gemm(*a, head, torch.bfloat16), fullgraph=True,
                             backend="aot_eager")
    c_head, c_h = compiled(xq, xs, q, scale, b)
    assert torch.equal(c_head, y_head) and torch.equal(c_h, h)
    with pytest.raises(ValueError, match="head 0"):
        fused.split_glu_gemm(xq, xs, q, scale, b, 0, torch.bfloat16)
    with pytest.raises(ValueError, match="not head"):
        fused.split_glu_gemm(xq, xs, q, scale, b, head + 1, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the SwiGLU GEMM's kernel is written for SM 9.x (Hopper)")
@pytest.mark.parametrize("per_row,bias", [(True, True), (False, False)])
@pytest.mark.parametrize("m,k,head,f", [(1025, 144, 200, 128), (4608, 4096, 12288, 1024)])
def test_split_gluon_kernel_against_the_twin(seed, per_row, bias, m, k, head, f):
    """The one-launch form (q/k/v tiles first, then the SwiGLU's) runs and gives the twin's head bit for bit and its
    h within one unit in the last place, replayed too."""
    xq, xs, q, scale, b = _split_operands(m, k, head, f, per_row, bias)
    assert fused.split_glu_rule(xq, q, head) is None
    y_head, h = fused.split_glu_gemm(xq, xs, q, scale, b, head, torch.bfloat16)
    want_head, want = reference_fused.split_glu_gemm(xq, xs, q, scale, b, head, torch.bfloat16)
    assert torch.equal(y_head, want_head)
    assert ulp_diff(h, want) <= 1 and float((h != want).float().mean()) < 1e-2
    again = fused.split_glu_gemm(xq, xs, q, scale, b, head, torch.bfloat16)
    assert torch.equal(again[0], y_head) and torch.equal(again[1], h)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the SwiGLU GEMM's kernel is written for SM 9.x (Hopper)")
@pytest.mark.parametrize("per_row,bias", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32))
@pytest.mark.parametrize("m,k,f", [(1025, 144, 128), (1100, 4000, 200), (4608, 3840, 1024)])
def test_gluon_kernel_against_the_twin(seed, per_row, bias, dtype, m, k, f, monkeypatch):
    """The Gluon row runs (the rule allows it, opted in) and gives the twin's h within one unit in the last place of
    a 16-bit output; float32 h within 1e-5 relative (its exp and reciprocal are approximations, a few float32 ulps
    from torch's silu: the 16-bit roundings hide them)."""
    monkeypatch.setenv("INT8_W8A8_GLU_GEMM", "1")
    xq, xs, gate, up = _operands(m, k, f, per_row, bias)
    assert fused.glu_gemm_rule(xq, f) is None and fused.glu_kernel_rule(xq, gate[0], up[0]) is None
    h = fused.glu_gemm(xq, xs, gate, up, dtype)
    want = reference_fused.glu_gemm(xq, xs, gate, up, dtype)
    if dtype == torch.float32:
        err = (h.double() - want.double()).abs() / want.double().abs().clamp_min(1e-30)
        assert float(err.max()) < 1e-5
    else:
        assert ulp_diff(h, want) <= 1
        assert float((h != want).float().mean()) < 1e-2
    again = fused.glu_gemm(xq, xs, gate, up, dtype)  # the replayed launch
    assert torch.equal(again, h)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the SwiGLU GEMM's kernel is written for SM 9.x (Hopper)")
def test_block_paths_agree(seed):
    """A fused block's SwiGLU input for the down projection, both ways: two GEMMs + ``glu_quantize`` (h in float32)
    and the GLU GEMM + ``quantize_rows`` (h rounded to bf16 first): int8 codes within one, and both forms as close
    to float h (g and u as the GEMMs write them): rounding h to bf16 costs nothing against int8's own error (the
    twins on the CPU: 34.80 / 34.77 dB to h, 42.7 dB to each other; H100, item 90: 40.4 dB to each other)."""
    from int8_w8a8.kernels import quantize_rows

    xq, xs, gate, up = _operands(4608, 3840, 1024)
    g = fused.int8_gemm(xq, xs, gate[0], gate[1], None, torch.bfloat16)
    u = fused.int8_gemm(xq, xs, up[0], up[1], None, torch.bfloat16)
    q0, s0 = fused.glu_quantize(None, (g, u))
    q1, s1 = quantize_rows(fused.glu_gemm(xq, xs, gate, up, torch.bfloat16))
    assert int((q0.int() - q1.int()).abs().max()) <= 1
    h = (torch.nn.functional.silu(g.float()) * u.float()).double()
    d0, d1 = q0.double() * s0.double().reshape(-1, 1), q1.double() * s1.double().reshape(-1, 1)
    assert abs(sqnr_db(h, d1) - sqnr_db(h, d0)) < 0.25
    assert sqnr_db(d0, d1) > sqnr_db(h, d0) + 3
