"""Integration tier: loading, converting, saving and running INT8 models inside a real ComfyUI (CPU).

A tiny FLUX.2 (hidden 256, one double and one single block) is built with ComfyUI's own Flux class
and random weights, written to safetensors files in every supported format, and loaded through the
pack's loader, ComfyUI's stock loader and the nodes. Outputs are compared with the float model.
"""

from __future__ import annotations

import functools
import json

import pytest
import safetensors.torch
import torch

from . import formats_util as fu
from .conftest import sqnr_db
from .tiny_flux2 import QUANTIZED, H, forward
from .tiny_flux2 import int8_layers as _int8_layers
from .tiny_flux2 import quantized_layer as _quantized_layer
from .tiny_flux2 import write as _write

pytestmark = pytest.mark.integration

FILES = {
    **{name: functools.partial(writer, quantize=_quantized_layer) for name, writer in fu.INT8_WRITERS.items()},
    "fp8-scaled": lambda sd: fu.fp8_scaled(sd, _quantized_layer),
    "bf16": lambda sd: (dict(sd), None),
    "fp16": lambda sd: ({k: v.half() for k, v in sd.items()}, None),
    "fp32": lambda sd: ({k: v.float() for k, v in sd.items()}, None),
}


@pytest.mark.parametrize("fmt", list(FILES))
def test_every_format_loads_and_matches_bf16(flux2, tmp_path, fmt):
    from int8_w8a8.ops import loader

    path = _write(tmp_path, f"{fmt}.safetensors", *FILES[fmt](flux2["sd"]))
    patcher = loader.load_file(path)
    assert len(_int8_layers(patcher)) == QUANTIZED
    assert sqnr_db(flux2["ref"], forward(patcher, flux2["inputs"])) >= 25
    assert patcher.cached_patcher_init[0] is loader.load_file


def test_smoothquant_file_runs_with_its_smoothing_vector(flux2, tmp_path):
    """A ModelOpt SmoothQuant file (weights stored as W * s per input channel, pre_quant_scale = 1 / s): every
    INT8 layer carries the smoothing vector and the model matches BF16; the same file without its vectors is
    far off, which is what silently dropping them (ComfyUI drops keys it does not know) would give."""
    from int8_w8a8.ops import formats, loader

    sd, meta = fu.modelopt_smoothquant(flux2["sd"], _quantized_layer)
    patcher = loader.load_file(_write(tmp_path, "sq.safetensors", sd, meta))
    weights = [patcher.model.diffusion_model.get_submodule(n).weight for n in _int8_layers(patcher)]
    assert len(weights) == QUANTIZED and all(w._params.smooth is not None for w in weights)
    assert all(w._params.smooth.shape == (w._qdata.shape[1],) for w in weights)
    good = sqnr_db(flux2["ref"], forward(patcher, flux2["inputs"]))
    plain = {k: v for k, v in sd.items() if not k.endswith(".pre_quant_scale")}
    unsmoothed = sqnr_db(flux2["ref"], forward(loader.load_file(_write(tmp_path, "plain.safetensors", plain, meta)),
                                               flux2["inputs"]))
    print(f"SmoothQuant file: {good:.1f} dB against BF16; without its smoothing vectors {unsmoothed:.1f} dB")
    assert good >= 25 and unsmoothed < good - 10
    sd["single_blocks.0.linear1.weight_zero_point"] = torch.zeros(9 * H)
    with pytest.raises(formats.Int8FormatError, match=r"single_blocks.0.linear1.weight_zero_point"):
        loader.load_file(_write(tmp_path, "zp.safetensors", sd, meta))


@pytest.mark.parametrize("convert", [{"per_row": False}, {"rotate_group": 256}, {"rotate_group": 64, "seed": 7}])
def test_conversion_options(flux2, tmp_path, convert):
    from int8_w8a8.ops import loader
    from int8_w8a8.ops.config import ConvertOptions

    path = _write(tmp_path, "bf16.safetensors", flux2["sd"])
    patcher = loader.load_file(path, loader.LoadOptions(convert=ConvertOptions(**convert)))
    weights = [patcher.model.diffusion_model.get_submodule(n).weight for n in _int8_layers(patcher)]
    assert len(weights) == QUANTIZED
    assert all(w._params.convrot == bool(convert.get("rotate_group")) for w in weights)
    assert all((w._params.scale.dim() == 0) == (convert.get("per_row") is False) for w in weights)
    assert sqnr_db(flux2["ref"], forward(patcher, flux2["inputs"])) >= 25


def test_conversion_reports_progress_per_layer(flux2, tmp_path, monkeypatch):
    import comfy.utils

    from int8_w8a8.ops import loader

    bars = []

    class Bar:
        def __init__(self, total, node_id=None):
            self.total, self.done = total, 0
            bars.append(self)

        def update(self, value):
            self.done += value

    monkeypatch.setattr(comfy.utils, "ProgressBar", Bar)
    loader.load_file(_write(tmp_path, "bf16.safetensors", flux2["sd"]))
    assert [(b.total, b.done) for b in bars] == [(QUANTIZED, QUANTIZED)]
    bars.clear()
    loader.load_file(_write(tmp_path, "int8.safetensors", *fu.native(flux2["sd"], _quantized_layer)))
    assert bars == []  # nothing to convert


def test_stock_torch_compile_node_accepts_the_model(flux2, tmp_path):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    from int8_w8a8.ops import loader

    patcher = loader.load_file(_write(tmp_path, "bf16.safetensors", flux2["sd"]))
    compiled = TorchCompileModel.execute(patcher, "inductor").args[0]
    assert "torch.compile" in str(compiled.model_options.get("transformer_options", {})) or compiled.wrappers
    assert compiled.cached_patcher_init == patcher.cached_patcher_init


def test_loader_node(flux2, models_dir):
    from int8_w8a8.nodes import model_nodes

    _write(models_dir, "klein-int8.safetensors", *fu.native(flux2["sd"], _quantized_layer, convrot=256))
    schema = model_nodes.Int8DiffusionModelLoader.define_schema()
    assert all(getattr(i, "tooltip", None) for i in schema.inputs)
    assert "klein-int8.safetensors" in schema.inputs[0].options
    out = model_nodes.Int8DiffusionModelLoader.execute("klein-int8.safetensors", "auto", "per-row", "0")
    assert sqnr_db(flux2["ref"], forward(out.args[0], flux2["inputs"])) >= 25


def test_stock_loader_runs_on_the_pack_kernels(flux2, models_dir, monkeypatch):
    """ComfyUI's own UNETLoader on a native file: the pack's layout, its kernels, no dequantized weights
    (also not for the img_attn.proj layer, whose input is a strided slice), same output as the pack's loader."""
    import nodes
    from int8_w8a8.ops import layout, loader, native

    _write(models_dir, "native.safetensors", *fu.native(flux2["sd"], _quantized_layer))
    previous = native.install()
    try:
        stock = nodes.UNETLoader().load_unet("native.safetensors", "default")[0]
        weights = [m.weight for m in stock.model.diffusion_model.modules()
                   if isinstance(getattr(m, "weight", None), torch.Tensor) and layout.is_int8_weight(m.weight)]
        assert len(weights) == QUANTIZED and all(w._layout_cls == layout.LAYOUT_NAME for w in weights)
        calls = []
        original = layout.Int8W8A8Layout.dequantize.__func__
        monkeypatch.setattr(layout.Int8W8A8Layout, "dequantize",
                            classmethod(lambda cls, q, p: calls.append(1) or original(cls, q, p)))
        y_stock = forward(stock, flux2["inputs"])
        assert calls == [], f"{len(calls)} INT8 weights were dequantized in the forward pass"
        y_pack = forward(loader.load_file(str(models_dir / "native.safetensors")), flux2["inputs"])
        assert torch.equal(y_stock, y_pack)
    finally:
        native.uninstall("TensorWiseINT8Layout")
    try:
        plain = nodes.UNETLoader().load_unet("native.safetensors", "default")[0]
        assert all(m.weight._layout_cls == "TensorWiseINT8Layout" for m in plain.model.diffusion_model.modules()
                   if isinstance(getattr(m, "weight", None), torch.Tensor) and layout.is_int8_weight(m.weight))
        assert sqnr_db(flux2["ref"], forward(plain, flux2["inputs"])) >= 25
    finally:
        native.uninstall(previous or "TensorWiseINT8Layout")


def test_native_hook_environment_switch(comfyui, monkeypatch):
    import comfy.quant_ops

    from int8_w8a8.ops import native

    monkeypatch.setenv(native.ENV, "0")
    before = comfy.quant_ops.QUANT_ALGOS["int8_tensorwise"]["comfy_tensor_layout"]
    assert native.install() is None
    assert comfy.quant_ops.QUANT_ALGOS["int8_tensorwise"]["comfy_tensor_layout"] == before


def _add_lora(patcher, layer="double_blocks.0.img_mlp.0", rank=4, seed=0):
    """A LoRA patch in ComfyUI's own format (LoRAAdapter), through add_patches."""
    from comfy.weight_adapter.lora import LoRAAdapter

    w = patcher.model.diffusion_model.get_submodule(layer).weight
    n, k = w.shape
    gen = torch.Generator().manual_seed(seed)
    up, down = torch.randn(n, rank, generator=gen) * 0.05, torch.randn(rank, k, generator=gen) * 0.05
    adapter = LoRAAdapter(set(), (up, down, None, None, None, None))
    key = f"diffusion_model.{layer}.weight"
    assert patcher.add_patches({key: adapter}, 1.0) == [key]
    return key


def test_quantize_node_keeps_patches_and_leaves_the_input(flux2, models_dir):
    import nodes
    from int8_w8a8.nodes import model_nodes

    _write(models_dir, "bf16.safetensors", flux2["sd"])
    stock = nodes.UNETLoader().load_unet("bf16.safetensors", "default")[0]
    key = _add_lora(stock)
    out = model_nodes.Int8QuantizeModel.execute(stock, "flux2", "per-row", "0").args[0]
    assert len(_int8_layers(out)) == QUANTIZED and key in out.patches
    assert not any(isinstance(m.weight, torch.Tensor) and m.weight.dtype == torch.int8
                   for m in stock.model.diffusion_model.modules() if hasattr(m, "weight") and m.weight is not None)
    assert out.model_size() < 0.75 * stock.model_size()
    out.patches.clear()  # the unpatched INT8 model vs the float reference
    assert sqnr_db(flux2["ref"], forward(out, flux2["inputs"])) >= 25


def test_save_node_writes_native_files_stock_comfyui_loads(flux2, models_dir):
    import comfy.model_management
    import comfy.sd

    from int8_w8a8.nodes import model_nodes
    from int8_w8a8.ops import loader

    int8 = loader.load_file(_write(models_dir, "bf16.safetensors", flux2["sd"]))
    key = _add_lora(int8)
    comfy.model_management.load_models_gpu([int8])
    y_patched = forward(int8, flux2["inputs"])
    model_nodes.Int8SaveModel.execute(int8, "int8/test")
    saved = sorted((models_dir / "int8").glob("test_*.safetensors"))
    assert len(saved) == 1 and not list((models_dir / "int8").glob("*.partial"))
    with safetensors.safe_open(str(saved[0]), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        assert len(layers) == QUANTIZED and all(c["format"] == "int8_tensorwise" for c in layers.values())
        assert f.get_tensor(key[len("diffusion_model."):]).dtype == torch.int8
        keys = set(f.keys())
        assert all(f"{name}.comfy_quant" in keys for name in layers)
    # stock ComfyUI, without the pack's hook, loads it; the LoRA is merged into the saved weights
    comfy.model_management.unload_all_models()
    reloaded = comfy.sd.load_diffusion_model(str(saved[0]))
    y_reloaded = forward(reloaded, flux2["inputs"])
    assert sqnr_db(y_patched, y_reloaded) >= 30
    assert sqnr_db(flux2["ref"], y_reloaded) < sqnr_db(y_patched, y_reloaded)  # the LoRA is in there


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(4000)


def _overwrite(path):
    with open(path, "wb") as f:
        f.write(b"\x00" * 64)


BAD_FILES = {
    "truncated": (_truncate, r"cannot be read .*truncated"),
    "not-safetensors": (_overwrite, r"cannot be read"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_broken_files_fail_cleanly(flux2, tmp_path, case):
    import comfy.model_management

    from int8_w8a8.ops import formats, loader

    path = _write(tmp_path, "broken.safetensors", *fu.native(flux2["sd"], _quantized_layer))
    mutate, message = BAD_FILES[case]
    mutate(path)
    loaded = len(comfy.model_management.current_loaded_models)
    with pytest.raises(formats.Int8FormatError, match=message) as info:
        loader.load_file(path)
    assert "broken.safetensors" in str(info.value)
    assert len(comfy.model_management.current_loaded_models) == loaded


def test_wrong_architecture_and_bad_layers_fail_before_building(flux2, tmp_path):
    from int8_w8a8.ops import formats, loader, profiles

    path = _write(tmp_path, "bf16.safetensors", flux2["sd"])
    wrong = r"bf16\.safetensors: is a FLUX\.2 .* profile 'chroma' was selected"
    with pytest.raises(formats.Int8FormatError, match=wrong):
        loader.load_file(path, loader.LoadOptions(profile="chroma"))
    sd, meta = fu.native(flux2["sd"], _quantized_layer)
    sd["single_blocks.0.linear2.weight_scale"] = torch.full((H, 1), float("inf"))
    with pytest.raises(formats.Int8FormatError, match=r"layer 'single_blocks.0.linear2': weight scale has 256 non"):
        loader.load_file(_write(tmp_path, "nan.safetensors", sd, meta))
    assert profiles.BY_NAME["flux2"].matches(flux2["sd"])


def test_memory_modes_lowvram_and_full(flux2, tmp_path):
    import comfy.model_management

    from int8_w8a8.ops import loader

    patcher = loader.load_file(_write(tmp_path, "bf16.safetensors", flux2["sd"]))
    key = _add_lora(patcher)
    layer = patcher.model.diffusion_model.get_submodule(key[len("diffusion_model."):-len(".weight")])
    q_before, s_before = layer.weight._qdata.clone(), layer.weight._params.scale.clone()
    # legacy lowvram: every module offloaded, LoRA applied on the fly in float (LowVramPatch)
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    y_lowvram = forward(patcher, flux2["inputs"])
    patcher.unpatch_model()
    assert torch.equal(layer.weight._qdata, q_before) and torch.equal(layer.weight._params.scale, s_before)
    # full load: the LoRA merged into the INT8 weights (requantized), restored bit-exactly on unload
    comfy.model_management.load_models_gpu([patcher])
    y_full = forward(patcher, flux2["inputs"])
    assert not torch.equal(layer.weight._qdata, q_before)
    comfy.model_management.unload_all_models()
    assert torch.equal(layer.weight._qdata, q_before) and torch.equal(layer.weight._params.scale, s_before)
    assert sqnr_db(y_lowvram, y_full) >= 25


@pytest.mark.parametrize("quant_in_graph", [False, True])
def test_torch_compile_no_graph_breaks_and_rebuild(flux2, tmp_path, monkeypatch, quant_in_graph):
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention
    import comfy.model_management
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from int8_w8a8.ops import loader

    # ComfyUI's CPU default (sub-quadratic attention) asks psutil for free memory, which breaks graphs;
    # GPUs use PyTorch's SDPA, as here
    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    path = _write(tmp_path, "bf16.safetensors", flux2["sd"])
    patcher = loader.load_file(path, loader.LoadOptions(quant_in_graph=quant_in_graph))
    comfy.model_management.load_models_gpu([patcher])
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    dm = patcher.model.diffusion_model
    compiled = torch.compile(dm, backend=backend, fullgraph=True)
    x, t, ctx = flux2["inputs"]
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    with torch.inference_mode():
        y = compiled(x.to(dtype), t.to(dtype), ctx.to(dtype)).float()
    assert backend.frame_count == 1 and not counters["graph_break"]
    assert sqnr_db(forward(patcher, flux2["inputs"]), y) >= 60
    # TorchCompileModel rebuilds a non-dynamic model through cached_patcher_init
    fn, fn_args = patcher.cached_patcher_init
    rebuilt = fn(*fn_args, disable_dynamic=True)
    assert torch.equal(forward(rebuilt, flux2["inputs"]), forward(patcher, flux2["inputs"]))


def test_compiled_graph_reads_plain_weight_parts_that_follow_merges_and_restores(flux2, tmp_path, monkeypatch):
    """A compiled graph reads each resident INT8 weight as its two plain tensors (``Int8Linear._traced``), never the
    QuantizedTensor: no subclass guard and no subclass graph input (Dynamo checks a subclass weight's whole subtree of
    guards before every call: bench/NOTES.md items 50-51). The parts follow the weight through ComfyUI's own paths:
    a LoRA merged when a clone with it is loaded, and the original restored when the clone without it is loaded
    again; after each the one graph gives the eager answer, without recompiling."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention
    import comfy.model_management
    from comfy_kitchen.tensor import QuantizedTensor
    from torch._dynamo.testing import CompileCounterWithBackend

    from int8_w8a8.ops import loader

    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    patcher = loader.load_file(_write(tmp_path, "bf16.safetensors", flux2["sd"]))
    comfy.model_management.load_models_gpu([patcher])
    dm = patcher.model.diffusion_model
    guard_types = []

    def keep_all(entries):
        guard_types.extend(e.guard_type for e in entries)
        return [True] * len(entries)

    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(dm, backend=backend, fullgraph=True, options={"guard_filter_fn": keep_all})
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    x, t, ctx = (i.to(dtype) for i in flux2["inputs"])

    def run():
        with torch.inference_mode():
            return compiled(x, t, ctx).float()

    y0 = run()
    assert backend.frame_count == 1 and guard_types and "TENSOR_SUBCLASS_METADATA_MATCH" not in guard_types
    inputs = [n.meta["example_value"] for n in backend.graphs[0].graph.nodes if n.op == "placeholder"]
    assert inputs and not any(isinstance(v, QuantizedTensor) for v in inputs)
    assert sqnr_db(forward(patcher, flux2["inputs"]), y0) >= 60
    with_lora = patcher.clone()  # what a LoRA loader node returns
    key = _add_lora(with_lora)
    layer = dm.get_submodule(key[len("diffusion_model."):-len(".weight")])
    q_before = layer.weight._qdata.clone()
    comfy.model_management.load_models_gpu([with_lora])  # merges the LoRA: a new INT8 weight (set_weight)
    assert not torch.equal(layer.weight._qdata, q_before) and layer._traced.qdata is layer.weight._qdata
    y1 = run()
    assert not torch.equal(y1, y0) and sqnr_db(forward(with_lora, flux2["inputs"]), y1) >= 60
    comfy.model_management.load_models_gpu([patcher])  # the model without the LoRA again: the weight restored
    assert torch.equal(layer.weight._qdata, q_before) and layer._traced.qdata is layer.weight._qdata
    assert torch.equal(run(), y0)
    assert backend.frame_count == 1


def test_compiled_graph_under_lowvram_takes_the_cast_path(flux2, tmp_path, monkeypatch):
    """Layers ComfyUI streams (lowvram: ``comfy_cast_weights`` on, a LoRA applied on cast through ``weight_function``)
    must not read the resident parts: the graph compiled on the resident model recompiles for the streamed one (its
    guards see the flags) and gives the eager lowvram answer, LoRA included."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention
    import comfy.model_management
    from torch._dynamo.testing import CompileCounterWithBackend

    from int8_w8a8.ops import loader

    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    patcher = loader.load_file(_write(tmp_path, "bf16.safetensors", flux2["sd"]))
    _add_lora(patcher)
    comfy.model_management.load_models_gpu([patcher])  # LoRA merged, every layer resident
    dm = patcher.model.diffusion_model
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(dm, backend=backend)
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    x, t, ctx = (i.to(dtype) for i in flux2["inputs"])
    with torch.inference_mode():
        y_full = compiled(x, t, ctx).float()
    comfy.model_management.unload_all_models()
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)  # every layer streamed, LoRA on cast
    try:
        assert all(m.comfy_cast_weights for m in dm.modules() if hasattr(m, "_traced"))
        with torch.inference_mode():
            y_lowvram = compiled(x, t, ctx).float()
        assert backend.frame_count >= 2
        assert sqnr_db(forward(patcher, flux2["inputs"]), y_lowvram) >= 60
        assert sqnr_db(y_lowvram, y_full) >= 25  # LoRA in float on cast vs merged and requantized
    finally:
        patcher.unpatch_model()


def test_compiled_layer_taken_over_by_dynamic_vram_recompiles(flux2, tmp_path):
    """A layer DynamicVRAM takes over (``ModelPatcherDynamic.load``: ``comfy_cast_weights`` on, then a VBAR buffer
    ``_v``) must leave the resident parts: the graph's guard on the flag fails and the call recompiles instead of
    reusing the graph that read the parts. The graph does not read ``_v`` itself (a ``hasattr`` guard per layer:
    item 54)."""
    from int8_w8a8.ops import loader

    patcher = loader.load_file(_write(tmp_path, "bf16.safetensors", flux2["sd"]))
    layer = patcher.model.diffusion_model.get_submodule(_int8_layers(patcher)[0])
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager")
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    with torch.inference_mode():
        compiled(x)
        entry = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(type(layer).forward.__code__)[0]
        assert "'_v'" not in str(entry.guard_manager)
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled(x)  # the same layer again: no recompile
            layer.comfy_cast_weights, layer._v = True, object()  # as ModelPatcherDynamic.load sets them
            try:
                assert layer._traced_now() is None
                with pytest.raises(RuntimeError, match=r"[Rr]ecompil"):
                    compiled(x)
            finally:
                layer.comfy_cast_weights = False
                del layer._v


def test_traced_parts_follow_the_weight(flux2, tmp_path):
    """``Int8Linear._traced`` is the registered weight's own tensors after every way a weight is replaced or
    changed: ``.to()`` (``_apply``), deleting the weight, a float weight (none). A LoRA merge is in the test above;
    ComfyUI never patches these layers in place (``Int8Linear.set_weight``)."""
    from int8_w8a8.ops import layout, loader

    patcher = loader.load_file(_write(tmp_path, "bf16.safetensors", flux2["sd"]))
    dm = patcher.model.diffusion_model
    name = _int8_layers(patcher)[0]
    layer = dm.get_submodule(name)

    def parts_are_the_weights(m):
        w, tr = m.weight, m._traced
        return (tr.qdata is w._qdata and tr.scale is w._params.scale and tr.smooth is None
                and tr.rotate_group == layout.rotate_group_of(w._params))

    assert parts_are_the_weights(layer)
    old = layer.weight._qdata
    layer._apply(lambda t: t.clone())  # what .to(device) does
    assert layer.weight._qdata is not old and parts_are_the_weights(layer)
    del layer.weight
    assert layer._traced is None
    layer.weight = torch.nn.Parameter(torch.randn(old.shape), requires_grad=False)
    assert layer._traced is None
