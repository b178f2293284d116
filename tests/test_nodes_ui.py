"""Integration tier: what a user of the nodes sees, through ComfyUI's own validation and PromptExecutor (CPU).

The pack is registered as a custom node the way ComfyUI's main does it; prompts in API format are validated
and run by ComfyUI's executor. Two stand-ins: the websocket server the executor reports to (as in
test_examples), and, as ComfyUI's ``server.PromptServer.instance``, an object that records the progress text
nodes send (ComfyUI's web server needs aiohttp and a frontend, which the test tier does not install); it
keeps what ``PromptServer.send_progress_text(text, node_id)`` is called with, which is what the frontend draws
under the node.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
import types

import pytest
import safetensors.torch
import torch

from . import formats_util as fu
from . import lora_util as lu
from .test_examples import MessageLog
from .test_lora import KEPT_LAYERS, QUANTIZED_LAYERS
from .tiny_flux2 import quantized_layer, write

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[1]


class ProgressTexts:
    """Records ``send_progress_text`` calls: (node id, text)."""

    def __init__(self):
        self.sent: list[tuple[str, str]] = []

    def send_progress_text(self, text, node_id, sid=None):
        self.sent.append((str(node_id), text.decode() if isinstance(text, bytes) else text))

    def of(self, node_id: str) -> str:
        texts = [t for n, t in self.sent if n == node_id]
        assert len(texts) == 1, (node_id, self.sent)
        return texts[0]


@pytest.fixture(scope="module")
def workspace(comfyui, flux2, tmp_path_factory):
    import comfy.quant_ops
    import folder_paths

    import nodes

    algo = comfy.quant_ops.QUANT_ALGOS["int8_tensorwise"]
    layout_before = algo["comfy_tensor_layout"]
    assert asyncio.run(nodes.load_custom_node(str(ROOT)))
    root = tmp_path_factory.mktemp("ui")
    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    for kind in ("diffusion_models", "loras"):
        (root / kind).mkdir()
        folder_paths.add_model_folder_path(kind, str(root / kind), is_default=True)
    folder_paths.filename_list_cache.clear()
    sd = flux2["sd"]
    write(root / "diffusion_models", "bf16.safetensors", sd)
    zp, meta = fu.native(sd, quantized_layer)
    zp["single_blocks.0.linear2.weight_zero_point"] = torch.zeros(256)
    write(root / "diffusion_models", "zero-point.safetensors", zp, meta)
    for name, lsd in {"a.safetensors": lu.lora(sd, QUANTIZED_LAYERS + KEPT_LAYERS, seed=111),
                      "b.safetensors": lu.lora(sd, list(lu.DIFFUSERS), fmt="diffusers", seed=112)}.items():
        safetensors.torch.save_file({k: v.contiguous() for k, v in lsd.items()}, str(root / "loras" / name))
    (root / "loras" / "broken.safetensors").write_bytes(b"\x00" * 64)
    yield root
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()
    algo["comfy_tensor_layout"] = layout_before


@pytest.fixture
def texts(monkeypatch) -> ProgressTexts:
    """ProgressTexts as ComfyUI's ``server.PromptServer.instance``."""
    recorder = ProgressTexts()
    module = sys.modules.get("server")
    if hasattr(module, "PromptServer"):
        monkeypatch.setattr(module.PromptServer, "instance", recorder, raising=False)
    else:
        stand_in = types.ModuleType("server")
        stand_in.PromptServer = type("PromptServer", (), {"instance": recorder})
        monkeypatch.setitem(sys.modules, "server", stand_in)
    return recorder


def _execute(prompt: dict, outputs: list[str]):
    import execution

    executor = execution.PromptExecutor(MessageLog(), cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    executor.execute(prompt, "ui-test", {}, outputs)
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    return executor, errors


def _loader(weight_scale="per-row", convrot_group="0", unet_name="bf16.safetensors", **optional) -> dict:
    return {"class_type": "Int8DiffusionModelLoader",
            "inputs": {"unet_name": unet_name, "model_profile": "auto", "weight_scale": weight_scale,
                       "convrot_group": convrot_group, **optional}}


def _save(model, prefix="int8/ui") -> dict:
    return {"class_type": "Int8SaveModel", "inputs": {"model": model, "filename_prefix": prefix}}


# ------------------------------------------------------------------------------------------------ schema


# What the UI-format example workflows rely on: node ids, input order (required, then optional) and category.
SCHEMA = {
    "Int8DiffusionModelLoader": ("loaders/int8 w8a8", ["unet_name", "model_profile", "weight_scale",
                                                        "convrot_group"],
                                 ["attention", "quantize_extra_blocks", "lora_stack"]),
    "Int8QuantizeModel": ("loaders/int8 w8a8", ["model", "model_profile", "weight_scale", "convrot_group"],
                          ["attention", "quantize_extra_blocks"]),
    "Int8SaveModel": ("model/merging", ["model", "filename_prefix"], []),
    "Int8LoraMerge": ("loaders/int8 w8a8", ["model", "lora_name", "strength"], ["rounding"]),
    "Int8LoraMergeStack": ("loaders/int8 w8a8", ["model"],
                           [x for i in range(1, 11) for x in (f"lora_{i}", f"strength_{i}")] + ["rounding"]),
    "Int8LoraDynamic": ("loaders/int8 w8a8", ["model", "lora_name", "strength"], []),
    "Int8LoraDynamicStack": ("loaders/int8 w8a8", ["model"],
                             [x for i in range(1, 11) for x in (f"lora_{i}", f"strength_{i}")]),
    "Int8LoraStack": ("loaders/int8 w8a8", [],
                      ["lora_stack"] + [x for i in range(1, 11) for x in (f"lora_{i}", f"strength_{i}")]),
}


@pytest.mark.parametrize("node_id", list(SCHEMA))
def test_node_categories_and_input_order(workspace, node_id):
    """Inputs in the order the UI shows them (required first): rounding after every LoRA input on both merge
    nodes; the save node beside ComfyUI's own Save Model (model/merging), the rest under loaders."""
    import nodes

    category, required, optional = SCHEMA[node_id]
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    inputs = cls.INPUT_TYPES()
    assert list(inputs.get("required", {})) == required
    assert list(inputs.get("optional", {})) == optional
    assert category == cls.CATEGORY
    if node_id != "Int8LoraStack":  # a plain data node, nothing to report
        assert inputs["hidden"]["unique_id"] == ("UNIQUE_ID",)


# ------------------------------------------------------------------------------------------------ text on the nodes


def test_nodes_show_what_they_did_on_the_node(workspace, texts):
    """Loader, LoRA nodes and the save node send their report as progress text (drawn on the node by the
    frontend) and keep it in the history; the texts say what was loaded, converted, matched and written where."""
    prompt = {
        "1": _loader(),
        "2": {"class_type": "Int8LoraMerge", "inputs": {"model": ["1", 0], "lora_name": "a.safetensors",
                                                        "strength": 1.0, "rounding": "nearest"}},
        "3": {"class_type": "Int8LoraDynamicStack", "inputs": {"model": ["2", 0], "lora_1": "b.safetensors",
                                                               "strength_1": 0.5}},
        "4": _save(["3", 0]),
    }
    executor, errors = _execute(prompt, ["4"])
    assert executor.success and not errors, errors
    loaded = texts.of("1")
    # on the CPU ComfyUI holds the model in float32: the kept layers' dtype in the file and the one they run in; and
    # the attention the loader's choice (auto) runs there
    assert loaded == ("bf16.safetensors (19 BF16 weights): 10 layers converted to INT8 (per-row scales, no ConvRot); "
                      "kept in high precision (the flux2 profile keeps embedders, modulation and output layers "
                      "unquantized): 9 in BF16, held in FP32 (ComfyUI's weight dtype for this model on this device); "
                      "attention (auto chosen): ComfyUI's on cpu: tensors are on cpu: the torch twin (8-bit numerics, "
                      "float32), slower than SDPA (no GPU measured)")
    n_a = 2 * (len(QUANTIZED_LAYERS) + len(KEPT_LAYERS))  # lora_up and lora_down per layer
    assert texts.of("2") == f"a.safetensors: {n_a}/{n_a} LoRA keys matched (13 weights)"
    assert texts.of("3").startswith("b.safetensors: 36/36 LoRA keys matched")
    saved = sorted((workspace / "diffusion_models" / "int8").glob("ui_*.safetensors"))
    assert len(saved) == 1
    lines = texts.of("4").split("\n")
    assert lines[0].startswith(f"saved {saved[0]} (")
    assert "10 INT8 layers, kept in high precision: 9 in BF16" in lines[0]
    assert "from dynamic LoRA nodes, requantized once" in lines[0]
    assert lines[1] == f"the loaders list it as int8/{saved[0].name}"
    history = executor.history_result["outputs"]
    assert history["4"] == {"text": lines} and history["2"]["text"] == [texts.of("2")]


def _reporting_nodes_in_frontend() -> set[str]:
    """The node ids web/reports.js shows reports for (its REPORTING_NODES set)."""
    import re

    source = (ROOT / "web" / "reports.js").read_text()
    block = re.search(r"const REPORTING_NODES = new Set\(\[(.*?)\]\);", source, re.S)
    assert block, "web/reports.js: REPORTING_NODES not found"
    return set(re.findall(r'"(\w+)"', block.group(1)))


def test_frontend_extension_is_served_and_covers_every_reporting_node(workspace):
    """ComfyUI serves web/ for the pack (WEB_DIRECTORY), and reports.js handles exactly the nodes that report:
    those whose schema hands them their node id, which show() needs to send the text."""
    import int8_w8a8
    import nodes
    from int8_w8a8.nodes import node_list

    assert int8_w8a8.WEB_DIRECTORY == "web"
    served = [d for d in nodes.EXTENSION_WEB_DIRS.values() if pathlib.Path(d).resolve() == ROOT / "web"]
    assert served and (pathlib.Path(served[0]) / "reports.js").is_file(), nodes.EXTENSION_WEB_DIRS
    reporting = {cls.__name__ for cls in node_list() if "unique_id" in cls.INPUT_TYPES().get("hidden", {})}
    assert reporting == _reporting_nodes_in_frontend()
    assert len(reporting) == len(node_list()) - 1  # all but the plain LoRA list for the loader


def test_reporting_nodes_return_their_text_as_ui_output(workspace, texts):
    """What web/reports.js shows from the "executed" message (which ComfyUI also replays for a cached output node,
    without progress text): the ``text`` entry of the node's ui output, a list of lines, equal to the progress text
    sent when it ran."""
    prompt = {
        "1": _loader(),
        "2": {"class_type": "Int8LoraMergeStack", "inputs": {"model": ["1", 0], "lora_1": "a.safetensors",
                                                             "strength_1": 0.5, "rounding": "nearest"}},
        "3": {"class_type": "Int8LoraDynamic", "inputs": {"model": ["2", 0], "lora_name": "b.safetensors",
                                                          "strength": 0.5}},
        "4": {"class_type": "Int8QuantizeModel", "inputs": {"model": ["3", 0], "model_profile": "auto",
                                                            "weight_scale": "per-row", "convrot_group": "0"}},
        "5": _save(["4", 0], prefix="int8/ui-cached"),
    }
    executor, errors = _execute(prompt, ["5"])
    assert executor.success and not errors, errors
    outputs = executor.history_result["outputs"]
    assert set(outputs) == set(prompt)
    for node_id, output in outputs.items():
        assert set(output) == {"text"} and output["text"], (node_id, output)
        assert all(isinstance(line, str) and line for line in output["text"])
        assert "\n".join(output["text"]) == texts.of(node_id)
    assert outputs["2"]["text"][0].startswith("a.safetensors: ")
    assert outputs["4"]["text"][0].startswith("the Flux2 input model: 10 layers INT8 as stored")


# ------------------------------------------------------------------------------------------------ validation


def test_convrot_with_per_tensor_scales_fails_validation_naming_the_inputs(workspace):
    import execution

    for node in (_loader("per-tensor", "64"), _loader("per-row", "96")):
        prompt = {"1": node, "2": _save(["1", 0])}
        valid, _, _, node_errors = asyncio.run(execution.validate_prompt("v", prompt, None))
        assert not valid
        details = [e["details"] for e in node_errors["1"]["errors"]]
        assert {d.split(" - ")[0] for d in details} == {"weight_scale", "convrot_group"}
        if node["inputs"]["weight_scale"] == "per-tensor":
            assert "convrot_group 64 needs weight_scale 'per-row'" in details[0] and "convrot_group to 0" in details[0]
        else:
            assert "convrot_group: '96' is not one of 0, 64, 128, 256" in details[0]
    for scale, group in (("per-row", "128"), ("per-tensor", "0")):
        valid, *_ = asyncio.run(execution.validate_prompt("v", {"1": _loader(scale, group), "2": _save(["1", 0])},
                                                          None))
        assert valid


def test_attention_option(workspace):
    """Both loaders offer the fused blocks' attention (advanced, optional: prompts and workflows made before it
    validate and get "auto"), explain each choice in the tooltip, refuse other values, and record the choice on
    the model they return."""
    import execution

    import nodes
    from int8_w8a8.nodes import model_nodes
    from int8_w8a8.ops.blocks import attention_choice

    for node_id in ("Int8DiffusionModelLoader", "Int8QuantizeModel"):
        kind, options = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["optional"]["attention"]
        assert (kind if isinstance(kind, list) else options["options"]) == ["auto", "bf16", "8-bit"]
        assert options["default"] == "auto" and options.get("advanced") is True
        tip = options["tooltip"]
        for words in ("'auto'", "'bf16'", "'8-bit'", "measured faster", "accuracy bound", "ComfyUI's own code",
                      "shorter ones keep ComfyUI's"):
            assert words in tip, words
    for choice in ("auto", "bf16", "8-bit"):
        prompt = {"1": _loader(attention=choice), "2": _save(["1", 0])}
        assert asyncio.run(execution.validate_prompt("v", prompt, None))[0]
    valid, _, _, node_errors = asyncio.run(execution.validate_prompt(
        "v", {"1": _loader(attention="fp8"), "2": _save(["1", 0])}, None))
    assert not valid and node_errors["1"]["errors"][0]["extra_info"]["input_name"] == "attention"
    key = attention_choice.KEY
    model = model_nodes.Int8DiffusionModelLoader.execute("bf16.safetensors", "auto", "per-row", "0",
                                                         attention="8-bit").result[0]
    assert model.model_options["transformer_options"][key] == "8-bit"
    default = model_nodes.Int8DiffusionModelLoader.execute("bf16.safetensors", "auto", "per-row", "0").result[0]
    assert default.model_options["transformer_options"][key] == "auto"


def test_quantize_extra_blocks_option(workspace):
    """Both loaders offer ``quantize_extra_blocks`` (advanced, optional, off: earlier prompts and workflows keep
    their load): on a Z-Image model it converts the refiners too and says so on the node; off, the node says they
    were kept; a FLUX.2 file loads the same either way."""
    import execution

    import nodes
    from int8_w8a8.nodes import model_nodes
    from int8_w8a8.ops import layout

    from . import blocks_util as bu
    from .test_blocks_zimage import zimage_module

    for node_id in ("Int8DiffusionModelLoader", "Int8QuantizeModel"):
        kind, options = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["optional"]["quantize_extra_blocks"]
        assert kind == "BOOLEAN" and options["default"] is False and options.get("advanced") is True
        for words in ("Z-Image's noise and context refiners", "No effect on other architectures", "pre-quantized"):
            assert words in options["tooltip"], words
    for value in (True, False):
        prompt = {"1": _loader(quantize_extra_blocks=value), "2": _save(["1", 0])}
        assert asyncio.run(execution.validate_prompt("v", prompt, None))[0]
    flux = [model_nodes.Int8DiffusionModelLoader.execute("bf16.safetensors", "auto", "per-row", "0",
                                                         quantize_extra_blocks=v) for v in (False, True)]
    assert flux[0].ui == flux[1].ui  # FLUX.2's profile has no optional layers
    with bu.tiny_detection():
        bf16 = bu.load_bf16(bu.random_state_dict(zimage_module(device="meta"), seed=19))
        out = {v: model_nodes.Int8QuantizeModel.execute(bf16, "auto", "per-row", "0", quantize_extra_blocks=v)
               for v in (False, True)}
    for value, node_out in out.items():
        dm = node_out.result[0].model.diffusion_model
        refiners = [*dm.noise_refiner, *dm.context_refiner]
        assert all(layout.is_int8_weight(r.attention.qkv.weight) == value for r in refiners)
        assert layout.is_int8_weight(dm.layers[0].attention.qkv.weight)
        text = " ".join(node_out.ui["text"])
        assert ("noise_refiner, context_refiner converted too" if value else "kept in high precision") in text, text


def test_conversion_inputs_from_links_are_checked_when_run(workspace):
    from int8_w8a8.nodes import model_nodes

    with pytest.raises(ValueError, match=r"convrot_group 256 needs weight_scale 'per-row'.*Set weight_scale to "
                                         r"per-row, or convrot_group to 0"):
        model_nodes.Int8DiffusionModelLoader.execute("bf16.safetensors", "auto", "per-tensor", "256")


# ------------------------------------------------------------------------------------------------ errors


ERRORS = {
    "lora": ({"1": _loader(), "2": {"class_type": "Int8LoraMerge", "inputs": {
        "model": ["1", 0], "lora_name": "broken.safetensors", "strength": 1.0}}, "3": _save(["2", 0])},
        "int8_w8a8.LoraError", "broken.safetensors: cannot be read"),
    "format": ({"1": _loader(unet_name="zero-point.safetensors"), "2": _save(["1", 0])},
               "int8_w8a8.Int8FormatError", "single_blocks.0.linear2.weight_zero_point"),
    "save": ({"1": _loader(convrot_group="128"), "2": _save(["1", 0])},
             "int8_w8a8.Int8SaveError", "use ConvRot group 128"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_error_types_have_a_clean_name_in_comfyui(workspace, case):
    """ComfyUI reports an exception's type as module + class name; the pack's read int8_w8a8.<Class>, not the
    module path ComfyUI imported the pack under (its install folder)."""
    prompt, exception_type, message = ERRORS[case]
    executor, errors = _execute(prompt, [max(prompt)])
    assert not executor.success and len(errors) == 1
    assert errors[0]["exception_type"] == exception_type
    assert message in errors[0]["exception_message"]


def test_every_exception_class_of_the_pack_has_the_clean_module_name(comfyui):
    """Every exception class defined in the pack's ComfyUI-facing modules (a user can see any of them) reports
    itself as int8_w8a8.<Class>."""
    import importlib
    import pkgutil

    import int8_w8a8

    found = {}
    for part in ("ops", "lora", "nodes"):
        package = importlib.import_module(f"int8_w8a8.{part}")
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"int8_w8a8.{part}.{info.name}")
            for value in vars(module).values():
                if (isinstance(value, type) and issubclass(value, BaseException)
                        and value.__module__.startswith(int8_w8a8.__name__)):
                    found[value.__qualname__] = value.__module__
    assert {"Int8FormatError", "LoraError", "Int8SaveError"} <= set(found)
    assert set(found.values()) == {"int8_w8a8"}, found
