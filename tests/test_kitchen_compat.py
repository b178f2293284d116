"""Interoperability with comfy-kitchen, whose layout and ConvRot convention ComfyUI's native
``int8_tensorwise`` files use: weights quantized here must mean the same thing there, and back."""

from __future__ import annotations

import pytest
import torch

from int8_w8a8.kernels import reference as ref

from .conftest import rel_err

pytestmark = pytest.mark.unit

ck = pytest.importorskip("comfy_kitchen", reason="comfy-kitchen is a dependency: pip install -e .")
from comfy_kitchen.tensor import QuantizedTensor, TensorWiseINT8Layout  # noqa: E402


def _kitchen_tensor(q, s, convrot=False, group=256):
    params = TensorWiseINT8Layout.Params(scale=s, orig_dtype=torch.float32, orig_shape=tuple(q.shape),
                                         convrot=convrot, convrot_groupsize=group)
    return QuantizedTensor(q, "TensorWiseINT8Layout", params)


@pytest.mark.parametrize("per_row", [True, False])
def test_kitchen_dequantizes_our_weights_identically(seed, per_row):
    q, s = ref.quantize_weight(torch.randn(48, 320) * 0.05, per_row=per_row)
    assert torch.equal(_kitchen_tensor(q, s).dequantize(), ref.dequantize(q, s, torch.float32))


def test_convrot_convention_matches_kitchen(seed):
    w = torch.randn(40, 512) * 0.05
    q, s = ref.quantize_weight(w, rotate_group=256)
    # kitchen un-rotates our rotated weights back to w
    back = _kitchen_tensor(q, s, convrot=True).dequantize()
    assert rel_err(back, w) < 1.5e-2
    assert rel_err(back, ref.dequantize(q, s, torch.float32, rotate_group=256)) < 1e-5
    # and kitchen's rotated quantization is the same rotation: its codes dequantize here to w
    kq, kparams = TensorWiseINT8Layout.quantize(w, per_channel=True, convrot=True, convrot_groupsize=256)
    assert rel_err(ref.dequantize(kq, kparams.scale, torch.float32, rotate_group=256), w) < 1.5e-2


@pytest.mark.parametrize("convrot", [False, True])
def test_kitchen_linear_agrees_with_ours(seed, convrot):
    x = torch.randn(9, 512, dtype=torch.bfloat16)
    w = torch.randn(64, 512) * 0.05
    group = 256 if convrot else 0
    q, s = ref.quantize_weight(w, rotate_group=group)
    ours = ref.int8_linear(x, q, s, out_dtype=torch.float32, rotate_group=group)
    theirs = ck.int8_linear(x, q, s, None, torch.float32, convrot=convrot, convrot_groupsize=256)
    y64 = x.double() @ w.double().T
    # the same operation (kitchen quantizes x in its input dtype, which adds a little error) ...
    assert rel_err(theirs, ours) < 2e-2
    # ... and ours is at least as close to float64
    assert rel_err(ours, y64) <= rel_err(theirs, y64) * 1.02
