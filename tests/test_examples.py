"""Integration tier: the workflows in examples/ validate in a real ComfyUI, and their model parts run.

ComfyUI's built-in extra nodes and the pack (as a custom node) are registered; the file names the
workflows use exist in temporary model folders: the tiny FLUX.2 as the diffusion model, tiny LoRAs for
it, and placeholder text-encoder and VAE files (validation checks names; sampling with a real text
encoder and VAE is out of the CPU tier's reach). Execution goes through ComfyUI's own PromptExecutor;
the only stand-in is the websocket server it reports progress to.
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


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"text_to_image_int8.json", "convert_bf16_and_save.json", "lora_merge.json", "lora_dynamic_stack.json",
            "lora_before_quantization.json", "torch_compile.json"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_validates_in_comfyui(workspace, path):
    import execution

    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("example", _load(path), None))
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

    _execute(_load(ROOT / "examples" / "convert_bf16_and_save.json"), ["2"])
    saved = sorted((workspace / "diffusion_models" / "int8").glob("flux-2-klein-4b-int8_*.safetensors"))
    assert len(saved) == 1
    stock = comfy.sd.load_diffusion_model(str(saved[0]), disable_dynamic=True)
    assert sqnr_db(flux2["ref"], forward(stock, flux2["inputs"])) >= 25


@pytest.mark.parametrize("name", ["lora_merge", "lora_dynamic_stack", "lora_before_quantization", "torch_compile"])
def test_example_model_chain_runs(workspace, flux2, name):
    """Each example's model chain (loader, LoRA nodes, compile) as wired in the file, ending in a save node
    instead of sampling, run by ComfyUI's executor."""
    prompt = {k: v for k, v in _load(ROOT / "examples" / f"{name}.json").items() if v["class_type"] in MODEL_NODES}
    last = next(k for k, v in prompt.items() if not any(
        isinstance(x, list) and x[0] == k for other in prompt.values() for x in other["inputs"].values()))
    prompt["99"] = {"class_type": "Int8SaveModel", "inputs": {"model": [last, 0], "filename_prefix": f"int8/{name}"}}
    _execute(prompt, ["99"])
    assert len(list((workspace / "diffusion_models" / "int8").glob(f"{name}_*.safetensors"))) == 1
