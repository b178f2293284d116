"""Integration tier: the workflows in examples/ against a real ComfyUI.

The files are in the format the ComfyUI frontend saves (nodes with positions and widget values, links,
groups, notes). Each node and its widget values are checked against the node's definition as ComfyUI's
/object_info sends it to the frontend (inputs, their order, outputs, link types), the graph is converted
to the API format the way the frontend does when it queues a prompt, and ComfyUI validates that; the
model parts then run. ComfyUI's built-in extra nodes and the pack (as a custom node) are registered; the
file names the workflows use exist in temporary model folders: the tiny FLUX.2 as the diffusion model,
tiny LoRAs for it, and placeholder text-encoder and VAE files (validation checks names; sampling with a
real text encoder and VAE is out of the CPU tier's reach). Execution goes through ComfyUI's own
PromptExecutor; the only stand-in is the websocket server it reports progress to.
"""

from __future__ import annotations

import asyncio
import json
import pathlib

import pytest

from . import lora_util as lu
from .conftest import sqnr_db
from .test_lora import QUANTIZED_LAYERS
from .tiny_flux2 import forward, write

pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.json"))
MODEL_NODES = {"Int8DiffusionModelLoader", "Int8LoraMerge", "Int8LoraDynamicStack", "Int8LoraStack",
               "TorchCompileModel"}
NOTE_NODES = {"Note", "MarkdownNote"}  # the frontend's own nodes: never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}  # inputs the frontend shows as widgets
FILE_WIDGETS = ("unet_name", "clip_name", "vae_name", "lora_name", "lora_")  # model files a workflow expects


class MessageLog:
    """Where PromptExecutor sends its progress messages (the websocket server, in ComfyUI's main)."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@pytest.fixture(scope="module")
def workspace(comfyui, flux2, tmp_path_factory):
    import comfy.quant_ops
    import folder_paths

    import nodes

    algo = comfy.quant_ops.QUANT_ALGOS["int8_tensorwise"]
    layout_before = algo["comfy_tensor_layout"]
    asyncio.run(nodes.init_builtin_extra_nodes())
    assert asyncio.run(nodes.load_custom_node(str(ROOT)))  # its on_load routes native INT8 to the pack
    root = tmp_path_factory.mktemp("examples")
    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    saved_output = folder_paths.get_output_directory()
    for kind in ("diffusion_models", "text_encoders", "vae", "loras"):
        (root / kind).mkdir()
        folder_paths.add_model_folder_path(kind, str(root / kind), is_default=True)
    (root / "output").mkdir()
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.filename_list_cache.clear()
    write(root / "diffusion_models", "flux-2-klein-4b.safetensors", flux2["sd"])
    (root / "text_encoders" / "qwen_3_4b.safetensors").write_bytes(b"placeholder")
    (root / "vae" / "flux2-vae.safetensors").write_bytes(b"placeholder")
    for i, name in enumerate(("klein-style.safetensors", "klein-detail.safetensors")):
        write(root / "loras", name, lu.lora(flux2["sd"], QUANTIZED_LAYERS, seed=90 + i))
    yield root
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.set_output_directory(saved_output)
    folder_paths.filename_list_cache.clear()
    algo["comfy_tensor_layout"] = layout_before


def _load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def node_definition(class_type: str) -> dict:
    """The node's definition as ComfyUI's /object_info sends it to the frontend (server.py's node_info)."""
    from comfy_api.internal import _ComfyNodeInternal

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if issubclass(cls, _ComfyNodeInternal):
        return cls.GET_NODE_INFO_V1()
    types = cls.INPUT_TYPES()
    return {"input": types, "input_order": {k: list(v) for k, v in types.items()},
            "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))}


def widgets(definition: dict) -> list[tuple[str, bool]]:
    """``(name, has_control)`` for each widget the frontend makes, in its order (required, then optional
    inputs, each in ``input_order``); ``has_control``: an INT with ``control_after_generate``, whose widget
    is followed in ``widgets_values`` by its control ("fixed", "randomize", ...)."""
    found = []
    for section in ("required", "optional"):
        for name in definition["input_order"].get(section, []):
            kind, *rest = definition["input"][section][name]
            options = rest[0] if rest else {}
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput"):
                found.append((name, kind == "INT" and bool(options.get("control_after_generate"))))
    return found


def _check_widget_value(where: str, class_type: str, name: str, value: object, definition: dict) -> None:
    """A widget value fits its input: one of a combo's choices, a number within range, a string, a bool."""
    spec = definition["input"].get("required", {}).get(name) or definition["input"]["optional"][name]
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    what = f"{where}: {class_type}.{name} = {value!r}"
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        assert value in choices, f"{what} is not one of {choices} (widget values in another order?)"
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, int if kind == "INT" else (int, float)) and not isinstance(value, bool), (
            f"{what} is not {kind} (widget values in another order?)")
        assert options.get("min", value) <= value <= options.get("max", value), f"{what} is out of range"
    else:
        assert isinstance(value, {"STRING": str, "BOOLEAN": bool}[kind]), f"{what} is not {kind}"


def _socket_types(definition: dict) -> dict[str, str]:
    sections = ("required", "optional")
    return {name: spec[0] for s in sections for name, spec in definition["input"].get(s, {}).items()
            if not isinstance(spec[0], list)}


def to_api(workflow: dict, where: str) -> dict:
    """The API-format prompt the frontend queues for a UI-format ``workflow``, after checking every node,
    widget value count and link against the node definitions; ``where`` names the file in messages."""
    by_id = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    for link_id, origin, origin_slot, target, target_slot, kind in links.values():
        out, inp = by_id[origin]["outputs"][origin_slot], by_id[target]["inputs"][target_slot]
        assert link_id in (out["links"] or []) and inp["link"] == link_id, f"{where}: link {link_id} is half wired"
        out_type = node_definition(by_id[origin]["type"])["output"][origin_slot]
        in_type = _socket_types(node_definition(by_id[target]["type"])).get(inp["name"])
        assert kind == out_type == in_type, f"{where}: link {link_id} carries {kind}: {out_type} into {in_type}"
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in NOTE_NODES:
            continue
        assert node.get("mode", 0) == 0, f"{where}: node {node['id']} ({node['type']}) is muted or bypassed"
        definition = node_definition(node["type"])
        names = widgets(definition)
        expected = [part for name, control in names for part in ([name, f"{name}: control"] if control else [name])]
        values = list(node["widgets_values"])
        assert len(values) == len(expected), (
            f"{where}: node {node['id']} ({node['type']}) has {len(values)} widget values {values}, its definition "
            f"{len(expected)}: {expected}")
        inputs = {}
        for name, control in names:
            inputs[name] = values.pop(0)
            _check_widget_value(where, node["type"], name, inputs[name], definition)
            if control:
                after = values.pop(0)
                assert after == "fixed", f"{where}: {node['type']}.{name} is {after!r} after generating, not 'fixed'"
        outputs = [(o["name"], o["type"]) for o in node["outputs"]]
        declared = list(zip(definition.get("output_name") or definition["output"], definition["output"], strict=True))
        assert outputs == declared, f"{where}: {node['type']} outputs {outputs}, its definition {declared}"
        sockets = _socket_types(definition)
        for slot in node["inputs"]:
            assert slot["name"] in sockets or slot.get("widget"), f"{where}: {node['type']} has no input {slot['name']}"
            if slot.get("link") is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"text_to_image_int8.json", "convert_bf16_and_save.json", "lora_merge.json", "lora_dynamic_stack.json",
            "lora_before_quantization.json", "torch_compile.json"} <= names
    for path in EXAMPLES:
        workflow = _load(path)
        assert isinstance(workflow.get("nodes"), list) and workflow.get("version") == 0.4, (
            f"{path.name} is not a UI-format workflow (the format the ComfyUI frontend saves)")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_layout_notes_and_seed(workspace, path):
    """What a user sees on opening the file: nodes placed without overlaps and inside a group, a note that
    says what the workflow does and names every model file it expects, and a fixed seed."""
    workflow = _load(path)
    boxes = [(n["id"], *n["pos"], *n["size"]) for n in workflow["nodes"]]
    for i, (a, ax, ay, aw, ah) in enumerate(boxes):
        for b, bx, by, bw, bh in boxes[i + 1:]:
            # a node's title bar (~30 px) sits above its pos
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by - 30 or by + bh <= ay - 30, (
                f"{path.name}: nodes {a} and {b} overlap")
    groups = [g["bounding"] for g in workflow["groups"]]
    for node in workflow["nodes"]:
        x, y = node["pos"]
        w, h = node["size"]
        inside = any(gx <= x and gy <= y - 30 and x + w <= gx + gw and y + h <= gy + gh for gx, gy, gw, gh in groups)
        assert inside or node["type"] in NOTE_NODES, f"{path.name}: node {node['id']} ({node['type']}) is in no group"
    notes = " ".join(str(v) for n in workflow["nodes"] if n["type"] in NOTE_NODES for v in n["widgets_values"])
    assert len(notes) > 200, f"{path.name}: no note saying what the workflow does"
    prompt = to_api(workflow, path.name)
    files = {(v["class_type"], name, value) for v in prompt.values() for name, value in v["inputs"].items()
             if name.startswith(FILE_WIDGETS) and isinstance(value, str) and value != "None"}
    assert files, f"{path.name}: no model files"
    for class_type, name, value in sorted(files):
        assert value in notes, f"{path.name}: the note does not name {value} ({class_type}.{name})"
    assert all(v["class_type"] != "RandomNoise" or v["inputs"]["noise_seed"] == 42 for v in prompt.values())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_matches_node_definitions_and_validates(workspace, path):
    """Every node and widget value fits the node's definition, and ComfyUI validates the prompt the
    frontend would queue (widget values within their ranges and choices, links of matching types)."""
    import execution

    prompt = to_api(_load(path), path.name)
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("example", prompt, None))
    assert valid, (error, node_errors)
    assert outputs


def _execute(prompt: dict, outputs: list[str]) -> MessageLog:
    import execution

    log = MessageLog()
    # what ComfyUI's main builds with --cache-classic
    executor = execution.PromptExecutor(log, cache_type=execution.CacheType.CLASSIC,
                                        cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    executor.execute(prompt, "example", {}, outputs)
    errors = [data for event, data in log.messages if event == "execution_error"]
    assert executor.success and not errors, errors
    return log


def test_convert_and_save_example_runs(workspace, flux2):
    """The BF16 -> INT8 -> native file workflow, run by ComfyUI's executor; stock ComfyUI reads the file."""
    import comfy.sd

    prompt = to_api(_load(ROOT / "examples" / "convert_bf16_and_save.json"), "convert_bf16_and_save.json")
    save = next(k for k, v in prompt.items() if v["class_type"] == "Int8SaveModel")
    _execute(prompt, [save])
    saved = sorted(workspace.rglob("flux-2-klein-4b-int8_*.safetensors"))
    assert len(saved) == 1
    stock = comfy.sd.load_diffusion_model(str(saved[0]), disable_dynamic=True)
    assert sqnr_db(flux2["ref"], forward(stock, flux2["inputs"])) >= 25


@pytest.mark.parametrize("name", ["lora_merge", "lora_dynamic_stack", "lora_before_quantization", "torch_compile"])
def test_example_model_chain_runs(workspace, flux2, name):
    """Each example's model chain (loader, LoRA nodes, compile) as wired in the file, ending in a save node
    instead of sampling, run by ComfyUI's executor."""
    full = to_api(_load(ROOT / "examples" / f"{name}.json"), f"{name}.json")
    prompt = {k: v for k, v in full.items() if v["class_type"] in MODEL_NODES}
    last = next(k for k, v in prompt.items() if not any(
        isinstance(x, list) and x[0] == k for other in prompt.values() for x in other["inputs"].values()))
    prompt["99"] = {"class_type": "Int8SaveModel", "inputs": {"model": [last, 0], "filename_prefix": f"int8/{name}"}}
    _execute(prompt, ["99"])
    assert len(list(workspace.rglob(f"{name}_*.safetensors"))) == 1
