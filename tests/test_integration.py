"""Integration tier: the pack inside a real ComfyUI (COMFYUI_PATH), on CPU."""

from __future__ import annotations

import asyncio
import pathlib

import pytest
import torch

from int8_w8a8 import kernels

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_comfyui_loads_the_pack_as_a_custom_node(comfyui):
    import comfy.quant_ops

    import nodes

    algo = comfy.quant_ops.QUANT_ALGOS["int8_tensorwise"]
    before = algo["comfy_tensor_layout"]
    try:
        ok = asyncio.run(nodes.load_custom_node(str(ROOT)))
        assert ok, "ComfyUI's loader rejected the pack (see the log above)"
        for node_id in ("Int8DiffusionModelLoader", "Int8QuantizeModel", "Int8SaveModel", "Int8LoraMerge",
                        "Int8LoraMergeStack", "Int8LoraDynamic", "Int8LoraDynamicStack", "Int8LoraStack"):
            assert node_id in nodes.NODE_CLASS_MAPPINGS, node_id
            inputs = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()  # what ComfyUI's /object_info serves
            assert inputs.get("required") or inputs.get("optional"), node_id
        names = nodes.NODE_DISPLAY_NAME_MAPPINGS
        assert names["Int8DiffusionModelLoader"] == "Load Diffusion Model (INT8 W8A8)"
        assert names["Int8LoraMerge"] == "Load LoRA (INT8 merge)"
        assert names["Int8LoraDynamic"] == "Load LoRA (INT8 dynamic)"
        stack = nodes.NODE_CLASS_MAPPINGS["Int8LoraMergeStack"].INPUT_TYPES()["optional"]
        assert {f"lora_{i}" for i in range(1, 11)} <= set(stack)
        assert algo["comfy_tensor_layout"] == "Int8W8A8Layout"  # on_load routed native INT8 to the pack
    finally:
        algo["comfy_tensor_layout"] = before


def test_pack_kernels_on_comfyui_native_int8_weights(comfyui):
    """A layer loaded by ComfyUI's own mixed-precision ops (int8_tensorwise, per-row scale [N, 1])
    holds a QuantizedTensor whose data and scale run unchanged through the pack's kernels."""
    import json

    import comfy.ops

    n, k = 48, 256
    w = torch.randn(n, k) * 0.05
    q, s = kernels.quantize_weight(w)
    ops = comfy.ops.mixed_precision_ops({}, compute_dtype=torch.float32)
    layer = ops.Linear(k, n, bias=False)
    sd = {"weight": q, "weight_scale": s,
          "comfy_quant": torch.tensor(list(json.dumps({"format": "int8_tensorwise"}).encode()), dtype=torch.uint8)}
    layer.load_state_dict(sd, strict=False)
    qt = layer.weight
    assert type(qt).__name__ == "QuantizedTensor" and qt._layout_cls in ("TensorWiseINT8Layout", "Int8W8A8Layout")
    x = torch.randn(7, k)
    ours = kernels.int8_linear(x, qt._qdata, qt._params.scale, out_dtype=torch.float32)
    assert torch.equal(ours, kernels.int8_linear(x, q, s, out_dtype=torch.float32))
    y64 = x.double() @ w.double().T
    assert float((ours.double() - y64).norm() / y64.norm()) < 1.5e-2
