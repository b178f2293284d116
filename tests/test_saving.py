"""Integration tier: Save INT8 Model writes files that stock ComfyUI runs, with every LoRA in them (CPU).

Every saved file is read back by ComfyUI's own loader with comfy-kitchen's INT8 layout (the pack's hook off,
none of the pack's ops), run, and compared with ComfyUI's BF16 model (with the same LoRAs applied by core's
patcher where there are LoRAs). ``loss`` is the SQNR lost against that reference relative to the INT8 model
without LoRA against BF16, as in test_lora.
"""

from __future__ import annotations

import json
import os

import pytest
import safetensors
import torch

from . import formats_util as fu
from . import lora_util as lu
from .conftest import HAS_CUDA, sqnr_db
from .test_lora import KEPT_LAYERS, QUANTIZED_LAYERS
from .tiny_flux2 import QUANTIZED, forward, quantized_layer, write

pytestmark = pytest.mark.integration


def run(patcher, inputs) -> torch.Tensor:
    """The model's output with its patches applied the way ComfyUI applies them for sampling."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    try:
        return forward(patcher, inputs)
    finally:
        comfy.model_management.unload_all_models()


def stock(path: str):
    """``path`` through ComfyUI's own loader and comfy-kitchen's INT8 layout: what a ComfyUI without the pack runs."""
    import comfy.model_management
    import comfy.quant_ops
    import comfy.sd

    from int8_w8a8.ops import layout

    comfy.model_management.unload_all_models()
    algo = comfy.quant_ops.QUANT_ALGOS["int8_tensorwise"]
    before = algo["comfy_tensor_layout"]
    algo["comfy_tensor_layout"] = "TensorWiseINT8Layout"  # the pack's hook off, as without the pack
    try:
        patcher = comfy.sd.load_diffusion_model(path, disable_dynamic=True)
    finally:
        algo["comfy_tensor_layout"] = before
    layouts = {m.weight._layout_cls for m in patcher.model.diffusion_model.modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor) and layout.is_int8_weight(m.weight)}
    assert layouts == {"TensorWiseINT8Layout"}
    assert not any(type(m).__module__.startswith("int8_w8a8") for m in patcher.model.diffusion_model.modules())
    return patcher


@pytest.fixture(scope="module")
def env(flux2, tmp_path_factory):
    """Model and LoRA folders registered with ComfyUI, the BF16 file, two LoRAs, the INT8 model and references."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    import folder_paths

    from int8_w8a8.ops import loader

    root = tmp_path_factory.mktemp("saving")
    for kind in ("loras", "diffusion_models"):
        (root / kind).mkdir()
    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    folder_paths.add_model_folder_path("loras", str(root / "loras"), is_default=True)
    folder_paths.add_model_folder_path("diffusion_models", str(root / "diffusion_models"), is_default=True)
    folder_paths.filename_list_cache.clear()
    sd = flux2["sd"]
    loras = {"a.safetensors": lu.lora(sd, QUANTIZED_LAYERS + KEPT_LAYERS, seed=101),
             "b.safetensors": lu.lora(sd, list(lu.DIFFUSERS), fmt="diffusers", seed=102)}
    for name, lsd in loras.items():
        safetensors.torch.save_file({k: v.contiguous() for k, v in lsd.items()}, str(root / "loras" / name))

    def reference(*stack) -> torch.Tensor:
        """The BF16 model with the LoRAs ((name, strength) pairs) applied by ComfyUI's own LoRA code."""
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), disable_dynamic=True)
        key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
        for name, strength in stack:
            patcher.add_patches(comfy.lora.load_lora(comfy.lora_convert.convert_lora(loras[name]), key_map), strength)
        return run(patcher, flux2["inputs"])

    bf16 = write(root / "diffusion_models", "bf16.safetensors", sd)
    int8 = loader.load_file(bf16)
    out = {"root": root, "bf16": bf16, "int8": int8, "reference": reference, "inputs": flux2["inputs"]}
    out["s0"] = sqnr_db(flux2["ref"], run(int8, flux2["inputs"]))
    yield out
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()


def _save(model, prefix: str):
    from int8_w8a8.nodes import model_nodes

    return model_nodes.Int8SaveModel.execute(model, prefix)


def _saved(env, prefix: str) -> str:
    folder, _, stem = prefix.rpartition("/")
    files = sorted((env["root"] / "diffusion_models" / folder).glob(f"{stem}_*.safetensors"))
    assert len(files) == 1, files
    return str(files[0])


# ------------------------------------------------------------------------------------------------ LoRAs


def _with_lora(env, kind: str):
    """(model with LoRAs applied by the node of ``kind``, the LoRAs as (name, strength) pairs)."""
    from int8_w8a8.nodes import lora_nodes, model_nodes

    base = env["int8"]
    if kind == "merge":
        return lora_nodes.Int8LoraMerge.execute(base, "a.safetensors", 1.0).args[0], [("a.safetensors", 1.0)]
    if kind == "merge-stack":
        out = lora_nodes.Int8LoraMergeStack.execute(base, lora_1="a.safetensors", strength_1=0.7,
                                                    lora_2="b.safetensors", strength_2=-0.5)
        return out.args[0], [("a.safetensors", 0.7), ("b.safetensors", -0.5)]
    if kind == "dynamic":
        return lora_nodes.Int8LoraDynamic.execute(base, "a.safetensors", 1.0).args[0], [("a.safetensors", 1.0)]
    if kind == "dynamic-stack":
        out = lora_nodes.Int8LoraDynamicStack.execute(base, lora_1="a.safetensors", strength_1=0.7,
                                                      lora_2="b.safetensors", strength_2=0.5)
        return out.args[0], [("a.safetensors", 0.7), ("b.safetensors", 0.5)]
    if kind == "merge+dynamic":  # patches and low-rank terms on the same weights: one requantization
        merged = lora_nodes.Int8LoraMerge.execute(base, "a.safetensors", 0.6).args[0]
        return (lora_nodes.Int8LoraDynamic.execute(merged, "b.safetensors", 0.8).args[0],
                [("a.safetensors", 0.6), ("b.safetensors", 0.8)])
    if kind == "before-quantization":
        stack = lora_nodes.Int8LoraStack.execute(lora_1="a.safetensors", strength_1=1.0).args[0]
        out = model_nodes.Int8DiffusionModelLoader.execute("bf16.safetensors", "auto", "per-row", "0", lora_stack=stack)
        return out.args[0], [("a.safetensors", 1.0)]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["merge", "merge-stack", "dynamic", "dynamic-stack", "merge+dynamic",
                                  "before-quantization"])
def test_saved_file_carries_every_kind_of_lora(flux2, env, kind):
    """Each LoRA node's model, saved and run by stock ComfyUI without the pack, matches BF16 + LoRA as closely as
    the pack's own model does (dynamic terms merged into the weights, not dropped), and the node says so."""
    model, stack = _with_lora(env, kind)
    y_pack = run(model, env["inputs"])
    out = _save(model, f"lora/{kind}")
    y = forward(stock(_saved(env, f"lora/{kind}")), env["inputs"])
    ref, ref_lora = flux2["ref"], env["reference"](*stack)
    loss, without = env["s0"] - sqnr_db(ref_lora, y), sqnr_db(ref, y)
    print(f"{kind}: saved file {sqnr_db(ref_lora, y):.1f} dB against BF16+LoRA (loss {loss:.2f} dB), "
          f"{without:.1f} dB against BF16 without LoRA; pack before saving {sqnr_db(ref_lora, y_pack):.1f} dB")
    assert loss < 3.0 and sqnr_db(ref_lora, y) > without + 10
    assert sqnr_db(y_pack, y) >= 30
    text = out.ui["text"][0]
    assert text.startswith("saved ") and "LoRAs merged into" in text
    if "dynamic" in kind:
        assert "from dynamic LoRA nodes, requantized once" in text
        assert any(k.endswith(".int8_lora") for k in model.object_patches)  # the input model is left as it was


def test_dynamic_terms_are_merged_once_with_the_other_patches(env):
    """The saver turns the dynamic terms into ordinary patches on a clone: one patch list per weight (one
    rounding), the input model keeps its terms and no patches."""
    from int8_w8a8.nodes import lora_nodes
    from int8_w8a8.ops import lowrank, saving

    model = lora_nodes.Int8LoraDynamicStack.execute(env["int8"], lora_1="a.safetensors", strength_1=1.0,
                                                    lora_2="b.safetensors", strength_2=1.0).args[0]
    clone, n = saving.dynamic_terms_as_patches(model)
    assert n == len(QUANTIZED_LAYERS) + len(KEPT_LAYERS)
    assert not any(k.endswith(f".{lowrank.ATTR}") for k in clone.object_patches)
    assert all(len(v) == 1 for v in clone.patches.values()) and len(clone.patches) == n
    assert not model.patches and sum(k.endswith(f".{lowrank.ATTR}") for k in model.object_patches) == n
    assert saving.dynamic_terms_as_patches(env["int8"])[0] is env["int8"]


# ------------------------------------------------------------------------------------------------ variants

VARIANTS = {
    "per-row": ({}, None),
    "per-tensor": ({"per_row": False}, None),
    "convrot-64": ({"rotate_group": 64}, None),
    "convrot-256": ({"rotate_group": 256}, None),
    "per-tensor+merge": ({"per_row": False}, "merge"),
    "convrot-256+dynamic": ({"rotate_group": 256}, "dynamic"),
    "convrot-64+merge": ({"rotate_group": 64}, "merge"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_saved_variant_runs_in_stock_comfyui(flux2, env, variant):
    """Per-row, per-tensor, ConvRot 64/256, with LoRAs: the saved file loads and runs in stock ComfyUI (comfy-kitchen
    kernels, no pack) and gives what the pack's model gave."""
    from int8_w8a8.nodes import lora_nodes
    from int8_w8a8.ops import loader
    from int8_w8a8.ops.config import ConvertOptions

    convert, lora = VARIANTS[variant]
    model = loader.load_file(env["bf16"], loader.LoadOptions(convert=ConvertOptions(**convert)))
    ref = flux2["ref"]
    if lora == "merge":
        model = lora_nodes.Int8LoraMerge.execute(model, "a.safetensors", 1.0).args[0]
        ref = env["reference"](("a.safetensors", 1.0))
    elif lora == "dynamic":
        model = lora_nodes.Int8LoraDynamic.execute(model, "a.safetensors", 1.0).args[0]
        ref = env["reference"](("a.safetensors", 1.0))
    y_pack = run(model, env["inputs"])
    _save(model, f"variants/{variant}")
    path = _saved(env, f"variants/{variant}")
    with safetensors.safe_open(path, "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        assert len(layers) == QUANTIZED
        assert {c.get("convrot_groupsize") for c in layers.values()} == {convert.get("rotate_group")}
        scales = {f.get_slice(f"{name}.weight_scale").get_shape() != [] for name in layers}
    assert scales == ({True} if convert.get("per_row", True) or lora else {False})  # a merge rescales per row
    y = forward(stock(path), env["inputs"])
    print(f"{variant}: stock ComfyUI {sqnr_db(ref, y):.1f} dB against the reference, {sqnr_db(y_pack, y):.1f} dB "
          "against the pack's model")
    assert sqnr_db(ref, y) >= 25 and sqnr_db(y_pack, y) >= 30


def test_convrot_128_is_refused_with_what_to_choose(flux2, env):
    """Stock ComfyUI loads a ConvRot-128 file and fails at the first step (comfy-kitchen's Hadamard matrices are
    powers of 4); the save node refuses such a model before writing, naming the layers and the groups that work."""
    from int8_w8a8.ops import loader, saving
    from int8_w8a8.ops.config import ConvertOptions

    sd, meta = fu.native(flux2["sd"], quantized_layer, convrot=128)
    direct = write(env["root"], "convrot-128.safetensors", sd, meta)
    with pytest.raises(ValueError, match="power of 4, got 128"):
        forward(stock(direct), env["inputs"])
    model = loader.load_file(env["bf16"], loader.LoadOptions(convert=ConvertOptions(rotate_group=128)))
    with pytest.raises(saving.Int8SaveError, match=r"10 INT8 layer\(s\) use ConvRot group 128 \(first: double_blocks"
                                                   r".*Set convrot_group to 256 \(or 64, or 0\)"):
        _save(model, "variants/convrot-128")
    assert not list((env["root"] / "diffusion_models" / "variants").glob("convrot-128*"))


def test_smoothquant_models_are_refused(flux2, env):
    from int8_w8a8.ops import loader, saving

    sd, meta = fu.modelopt_smoothquant(flux2["sd"], quantized_layer)
    model = loader.load_file(write(env["root"], "sq.safetensors", sd, meta))
    with pytest.raises(saving.Int8SaveError, match=r"use SmoothQuant .*no smoothing vector"):
        _save(model, "variants/sq")


# ------------------------------------------------------------------------------------------------ where, how big


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kept_layers_keep_the_source_dtype(flux2, env, dtype):
    """Converted on the CPU, where ComfyUI holds the model in float32 (on a GPU, in the source's dtype): the layers
    kept in high precision (and norms) are written in the source's dtype, and the INT8 file is smaller than its
    source."""
    from int8_w8a8.ops import loader

    name = f"{str(dtype)[6:]}.safetensors"
    source = write(env["root"], name, {k: v.to(dtype) for k, v in flux2["sd"].items()})
    model = loader.load_file(source)
    if not HAS_CUDA:
        assert model.model.diffusion_model.img_in.weight.dtype == torch.float32  # what ComfyUI holds on the CPU
    text = _save(model, f"dtype/{name[:-12]}").ui["text"][0]
    path = _saved(env, f"dtype/{name[:-12]}")
    with safetensors.safe_open(path, "pt") as f:
        names = f.keys()
        floats = {k: f.get_slice(k).get_dtype() for k in names
                  if not k.endswith((".weight_scale", ".comfy_quant")) and f.get_slice(k).get_dtype() != "I8"}
    assert set(floats.values()) == {{torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]}, floats
    assert {k[:-7] for k in floats if k.endswith(".weight") and k[:-7] in KEPT_LAYERS} == set(KEPT_LAYERS)
    assert os.path.getsize(path) < 0.75 * os.path.getsize(source)
    assert f"kept in high precision: 9 in {'BF16' if dtype == torch.bfloat16 else 'FP16'}" in text


def test_saves_into_models_diffusion_models_and_says_where(env, tmp_path, monkeypatch):
    """ComfyUI lists models/unet before models/diffusion_models; the node writes where its documentation says
    (models/diffusion_models) and shows the full path and the name the loaders list it under."""
    import folder_paths

    from int8_w8a8.nodes import model_nodes

    models = tmp_path / "models"  # laid out as ComfyUI's folder_paths does for its own models folder
    folders = [str(models / "unet"), str(models / "diffusion_models")]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        (folders, folder_paths.supported_pt_extensions))
    assert model_nodes.output_folder() == str(models / "diffusion_models")
    text = _save(env["int8"], "int8/where").ui["text"]
    files = list((models / "diffusion_models" / "int8").glob("where_*.safetensors"))
    assert len(files) == 1 and not (models / "unet").exists()
    assert text[0].startswith(f"saved {files[0]} (") and text[1] == f"the loaders list it as int8/{files[0].name}"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models",
                        ([str(tmp_path / "mine"), str(models / "diffusion_models")], set()))
    assert model_nodes.output_folder() == str(tmp_path / "mine")  # a folder the user put first stays first

