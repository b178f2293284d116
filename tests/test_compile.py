"""torch.compile over the public ops: one graph, no breaks, no recompiles when M changes."""

from __future__ import annotations

import pytest
import torch

from int8_w8a8 import kernels
from int8_w8a8.kernels import reference

pytestmark = pytest.mark.unit


class _TwoLayers(torch.nn.Module):
    def __init__(self, k=64, h=96, n=40):
        super().__init__()
        self.q1, self.s1 = reference.quantize_weight(torch.randn(h, k) * 0.05)
        self.q2, self.s2 = reference.quantize_weight(torch.randn(n, h) * 0.05, per_row=False)
        self.bias = torch.randn(n)

    def forward(self, x):
        h = torch.nn.functional.silu(kernels.int8_linear(x, self.q1, self.s1))
        return kernels.int8_linear(h, self.q2, self.s2, self.bias, out_dtype=torch.float32)


def test_fullgraph_dynamic_no_breaks_no_recompiles(seed):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _TwoLayers()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    frames = []
    for m in (17, 300, 33, 2, 4608, 1, 5):
        x = torch.randn(1, m, 64, dtype=torch.bfloat16)
        assert torch.equal(compiled(x), model(x))
        frames.append(counter.frame_count)
    # fullgraph=True already fails on any graph break; one graph serves every M >= 2 and PyTorch's
    # 0/1 specialization adds exactly one for M == 1
    assert frames[:5] == [1] * 5 and frames[-1] == 2, frames
    ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "int8_w8a8.int8_linear" in ops


class _NormThenLinear(torch.nn.Module):
    """A norm feeding an INT8 layer, as in a transformer block; the quantization may join the graph."""

    def __init__(self, quant_in_graph: bool, k=64, n=40):
        super().__init__()
        self.q, self.s = reference.quantize_weight(torch.randn(n, k) * 0.05)
        self.lora_a, self.lora_b = torch.randn(16, k) * 0.1, torch.randn(n, 16) * 0.1
        self.quant_in_graph = quant_in_graph

    def forward(self, x):
        h = torch.nn.functional.layer_norm(x, x.shape[-1:]) * 1.5 + 0.1
        return kernels.int8_linear(h, self.q, self.s, lora_a=self.lora_a.to(x.dtype), lora_b=self.lora_b.to(x.dtype),
                                   quant_in_graph=self.quant_in_graph)


@pytest.mark.parametrize("quant_in_graph", [False, True])
def test_quantization_in_graph_traces_into_one_graph(seed, quant_in_graph):
    """quant_in_graph: the activation quantization is traced as torch ops (amax, round) next to the norm,
    only the GEMM stays an opaque op; the result equals eager mode's, for every M, without recompiles."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _NormThenLinear(quant_in_graph)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for m in (17, 300, 2):
        x = torch.randn(1, m, 64, dtype=torch.bfloat16)
        x[0, 1] = 0  # an all-zero row
        assert torch.equal(compiled(x), model(x))
    assert counter.frame_count == 1
    ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")}
    if quant_in_graph:
        assert "int8_w8a8.int8_gemm" in ops and "int8_w8a8.int8_linear" not in ops
        assert any("amax" in op for op in ops) and any("round" in op for op in ops), ops
    else:
        assert "int8_w8a8.int8_linear" in ops and "int8_w8a8.int8_gemm" not in ops


def test_custom_ops_pass_opcheck(seed):
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    w = torch.randn(24, 64)
    q, s = reference.quantize_weight(w)
    ops = torch.ops.int8_w8a8
    torch.library.opcheck(ops.quantize_rows, (x, None, 0))
    torch.library.opcheck(ops.quantize_rows, (x.float(), torch.rand(64) + 0.5, 64))
    torch.library.opcheck(ops.quantize_weight, (w, True, 3, 0, None))
    torch.library.opcheck(ops.quantize_weight, (w, False, None, 0, None))
    torch.library.opcheck(ops.quantize_weight, (w, False, 5, 0, torch.tensor(0.01)))
    torch.library.opcheck(ops.int8_linear, (x, q, s, torch.randn(24), torch.float32, None, 0, True, None, None))
    la, lb = torch.randn(8, 64, dtype=torch.bfloat16), torch.randn(24, 8, dtype=torch.bfloat16)
    torch.library.opcheck(ops.int8_linear, (x, q, s, None, torch.bfloat16, None, 0, False, la, lb))
    torch.library.opcheck(ops.dequantize, (q, s, torch.bfloat16, 0, False))
    xq, xs = reference.quantize_rows(x)
    torch.library.opcheck(ops.int8_gemm, (xq, xs, q, s, torch.randn(24), torch.float32, True, None, None))
    h = x @ la.T
    torch.library.opcheck(ops.int8_gemm, (xq, xs, q, s, None, torch.bfloat16, False, h, lb))
    x3, mod = torch.randn(2, 5, 128, dtype=torch.bfloat16), torch.randn(2, 1, 128, dtype=torch.bfloat16)
    for group in (0, 64):
        torch.library.opcheck(ops.norm_modulate_quantize, (x3, mod, mod, 1e-6, group))
        torch.library.opcheck(ops.glu_quantize, (x3, torch.randn(2, 5, 256, dtype=torch.bfloat16), group))


def test_compiled_quantize_and_dequantize(seed):
    torch._dynamo.reset()

    def fn(w, x):
        q, s = kernels.quantize_weight(w)
        xq, xs = kernels.quantize_rows(x)
        return kernels.dequantize(q, s, torch.float32), xq, xs

    w, x = torch.randn(16, 32), torch.randn(3, 32)
    out = torch.compile(fn, backend="aot_eager", fullgraph=True)(w, x)
    expect = fn(w, x)
    assert all(torch.equal(a, b) for a, b in zip(out, expect, strict=True))


def test_eager_op_calls_skip_custom_ops_python_layers(seed):
    """An eager call of a pack op under inference mode (as ComfyUI runs models) runs its function as a plain kernel:
    not through ``torch.library.custom_op``'s per-call aliasing check (kernels/custom_op.py), and still the same
    function (same result as calling it through the op)."""
    import sys

    x = torch.randn(8, 64)
    called: list[str] = []

    def watch(frame, event, arg):
        if event == "call":
            called.append(frame.f_code.co_name)

    with torch.inference_mode():
        sys.setprofile(watch)
        try:
            q, s = torch.ops.int8_w8a8.quantize_rows(x, None, 0)
        finally:
            sys.setprofile(None)
    assert "quantize_rows_op" in called
    assert "autograd_impl" not in called and "backend_impl" not in called
    q_ref, s_ref = reference.quantize_rows(x)
    assert torch.equal(q, q_ref) and torch.equal(s.view(-1), s_ref.view(-1))


def test_ops_without_backward_say_so(seed):
    """A gradient asked through a pack op is an error naming the op (custom_op's Autograd kernel is kept), not a
    silently missing gradient."""
    x = torch.randn(8, 64, requires_grad=True)
    y = torch.ops.int8_w8a8.dequantize(*kernels.quantize_weight(x.detach()), torch.float32, 0, False) * x
    q, s = kernels.quantize_weight(torch.randn(16, 64))
    out = torch.ops.int8_w8a8.int8_linear(y, q, s, None, torch.float32, None, 0, False, None, None)
    with pytest.raises(RuntimeError, match="int8_linear"):
        out.sum().backward()
