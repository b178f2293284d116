"""Integration tier: LoRA on INT8 models (merge, dynamic, before quantization) inside a real ComfyUI (CPU).

References are ComfyUI's own: the BF16 model with the same LoRA file applied by core's patcher
(``refL``). Fidelity is the SQNR lost against it relative to the INT8 model without LoRA against BF16:
``loss = SQNR(ref, int8) - SQNR(refL, int8 + LoRA)``.
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from . import formats_util as fu
from . import lora_util as lu
from .conftest import sqnr_db
from .tiny_flux2 import forward, quantized_layer, write

pytestmark = pytest.mark.integration

QUANTIZED_LAYERS = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.img_mlp.0",
                    "double_blocks.0.img_mlp.2", "double_blocks.0.txt_attn.qkv", "double_blocks.0.txt_attn.proj",
                    "double_blocks.0.txt_mlp.0", "double_blocks.0.txt_mlp.2", "single_blocks.0.linear1",
                    "single_blocks.0.linear2"]
KEPT_LAYERS = ["img_in", "final_layer.linear", "double_stream_modulation_img.lin"]


def run(env, patcher) -> torch.Tensor:
    """The model's output with its patches applied the way ComfyUI applies them for sampling."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    try:
        return forward(patcher, env["inputs"])
    finally:
        comfy.model_management.unload_all_models()


@pytest.fixture(scope="module")
def env(flux2, tmp_path_factory):
    """Files (BF16 model, native INT8 model), a LoRA folder and the INT8 model without LoRA."""
    import folder_paths

    from int8_w8a8.ops import loader

    root = tmp_path_factory.mktemp("lora")
    (root / "loras").mkdir()
    (root / "models").mkdir()
    folder_paths.add_model_folder_path("loras", str(root / "loras"), is_default=True)
    folder_paths.add_model_folder_path("diffusion_models", str(root / "models"), is_default=True)
    folder_paths.filename_list_cache.clear()
    bf16 = write(root / "models", "bf16.safetensors", flux2["sd"])
    native = write(root / "models", "native.safetensors", *fu.native(flux2["sd"], quantized_layer))
    out = {"root": root, "bf16": bf16, "native": native, "inputs": flux2["inputs"], "int8": loader.load_file(bf16)}
    out["y0"] = run(out, out["int8"])
    out["s0"] = sqnr_db(flux2["ref"], out["y0"])
    yield out
    for kind in ("loras", "diffusion_models"):
        paths = folder_paths.folder_names_and_paths[kind][0]
        paths[:] = [p for p in paths if not p.startswith(str(root))]
    folder_paths.filename_list_cache.clear()


def write_lora(env, name: str, sd: dict) -> str:
    import folder_paths

    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(env["root"] / "loras" / name))
    folder_paths.filename_list_cache.clear()
    return name


def reference(flux2, env, *loras) -> torch.Tensor:
    """The BF16 model with ``loras`` ((file name, strength) pairs) applied by ComfyUI's own LoRA code."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    import comfy.utils

    patcher = comfy.sd.load_diffusion_model_state_dict(dict(flux2["sd"]), disable_dynamic=True)
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    for name, strength in loras:
        sd = comfy.utils.load_torch_file(str(env["root"] / "loras" / name))
        patcher.add_patches(comfy.lora.load_lora(comfy.lora_convert.convert_lora(sd), key_map), strength)
    return run(env, patcher)


def loss(flux2, env, ref_lora: torch.Tensor, y: torch.Tensor) -> float:
    return env["s0"] - sqnr_db(ref_lora, y)


def _int8_state(patcher) -> dict:
    from int8_w8a8.ops import layout

    return {n: (m.weight._qdata.clone(), m.weight._params.scale.clone())
            for n, m in patcher.model.diffusion_model.named_modules()
            if layout.is_int8_weight(getattr(m, "weight", None))}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


# ------------------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize("fmt", ["comfy", "peft", "kohya", "diffusers"])
def test_key_formats_merge_and_dynamic(flux2, env, fmt):
    """BFL/ComfyUI, PEFT, kohya and diffusers keys (slices of qkv and linear1, layers kept in BF16) all match,
    the nodes report it, and merge and dynamic reproduce ComfyUI's BF16 result."""
    from int8_w8a8.nodes import lora_nodes

    layers = list(lu.DIFFUSERS) if fmt == "diffusers" else QUANTIZED_LAYERS + KEPT_LAYERS
    sd = lu.lora(flux2["sd"], layers, fmt=fmt, alpha=4.0 if fmt in ("comfy", "kohya") else None, seed=3)
    name = write_lora(env, f"{fmt}.safetensors", sd)
    ref = reference(flux2, env, (name, 1.0))
    merged = lora_nodes.Int8LoraMerge.execute(env["int8"], name, 1.0)
    dyn = lora_nodes.Int8LoraDynamic.execute(env["int8"], name, 1.0)
    for out in (merged, dyn):
        assert out.ui["text"][0].startswith(f"{name}: {len(sd)}/{len(sd)} LoRA keys matched")
    assert loss(flux2, env, ref, run(env, merged.args[0])) < 3.0
    assert loss(flux2, env, ref, run(env, dyn.args[0])) < 0.5


# ------------------------------------------------------------------------------------------------ merge


def _kitchen_int8(env):
    """The native file through ComfyUI's stock loader and comfy-kitchen's own INT8 layout (no pack code)."""
    import comfy.sd

    from int8_w8a8.ops import layout

    patcher = comfy.sd.load_diffusion_model(env["native"], disable_dynamic=True)
    layouts = {m.weight._layout_cls for m in patcher.model.diffusion_model.modules()
               if isinstance(getattr(m, "weight", None), torch.Tensor) and layout.is_int8_weight(m.weight)}
    assert layouts == {"TensorWiseINT8Layout"}
    return patcher


def _comfy_patch(patcher, env, name, strength=1.0):
    import comfy.lora
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(env["root"] / "loras" / name))
    patcher.add_patches(comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(patcher.model, {})), strength)
    return patcher


@pytest.mark.parametrize("seed", [0, 1])
def test_merge_loses_less_than_comfyuis_own_merge(flux2, env, seed):
    """Rank-8 LoRA on every quantized layer: the pack's merge (nearest) loses less than 3 dB and less than
    ComfyUI's own merge on comfy-kitchen's INT8 layout; the stochastic option stays under 3 dB."""
    from int8_w8a8.lora import loading, merge

    name = write_lora(env, f"rank8-{seed}.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS, seed=10 + seed))
    ref = reference(flux2, env, (name, 1.0))
    kitchen = _kitchen_int8(env)
    s0_kitchen = sqnr_db(flux2["ref"], run(env, kitchen))
    assert abs(s0_kitchen - env["s0"]) < 0.01  # the same INT8 weights
    comfy_loss = s0_kitchen - sqnr_db(ref, run(env, _comfy_patch(kitchen, env, name)))
    nearest = loss(flux2, env, ref, run(env, merge.merge(env["int8"], [loading.LoraSpec(name)])[0]))
    stochastic = loss(flux2, env, ref, run(env, merge.merge(env["int8"], [loading.LoraSpec(name)], "stochastic")[0]))
    print(f"merge loss: nearest {nearest:.2f} dB, stochastic {stochastic:.2f} dB, ComfyUI's own {comfy_loss:.2f} dB")
    assert nearest < 3.0 and nearest < comfy_loss - 0.3
    assert stochastic < 3.0  # ComfyUI's own rounding, on a per-row grid that keeps what still fits


def test_merge_runs_int8_and_unpatches_bit_exactly(flux2, env, monkeypatch):
    """Merged layers stay INT8 (no dequantization in the forward pass); unloading restores the original INT8
    tensors bit-exactly, and another strength merges from them again without reading the model file."""
    import comfy.model_management
    import comfy.utils

    from int8_w8a8.nodes import lora_nodes
    from int8_w8a8.ops import layout

    name = write_lora(env, "exact.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS + KEPT_LAYERS, seed=5))
    base = env["int8"]
    before = _int8_state(base)
    model = lora_nodes.Int8LoraMerge.execute(base, name, 1.0).args[0]
    comfy.model_management.load_models_gpu([model])
    merged = _int8_state(model)
    assert merged.keys() == before.keys()
    assert all(not torch.equal(merged[k][0], before[k][0]) for k in merged)  # every INT8 layer patched
    assert all(merged[k][1].shape == (merged[k][0].shape[0], 1) for k in merged)  # per-row scales
    calls = []
    original = layout.Int8W8A8Layout.dequantize.__func__
    monkeypatch.setattr(layout.Int8W8A8Layout, "dequantize",
                        classmethod(lambda cls, q, p: calls.append(1) or original(cls, q, p)))
    y1 = forward(model, flux2["inputs"])
    assert calls == []
    comfy.model_management.unload_all_models()
    assert _same_state(_int8_state(base), before)
    reads = []
    real_load = comfy.utils.load_torch_file
    monkeypatch.setattr(comfy.utils, "load_torch_file",
                        lambda path, *a, **k: reads.append(path) or real_load(path, *a, **k))
    y_half = run(env, lora_nodes.Int8LoraMerge.execute(base, name, 0.5).args[0])
    assert all(p.endswith(name) for p in reads)  # the LoRA, never the model
    assert sqnr_db(y1, y_half) < 40 and _same_state(_int8_state(base), before)
    assert torch.equal(run(env, base), env["y0"])


def test_merge_requantizes_per_tensor_files_per_row(flux2, env, tmp_path):
    """A file with one scale per weight: merged layers come back with recalculated per-row scales (a LoRA
    changes rows unevenly), and unpatch to the original per-tensor scales."""
    import comfy.model_management

    from int8_w8a8.nodes import lora_nodes
    from int8_w8a8.ops import loader

    base = loader.load_file(write(tmp_path, "per-tensor.safetensors",
                                  *fu.native(flux2["sd"], quantized_layer, per_row=False)))
    before = _int8_state(base)
    assert all(s.dim() == 0 for _, s in before.values())
    name = write_lora(env, "per-tensor-lora.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS, seed=7))
    model = lora_nodes.Int8LoraMerge.execute(base, name, 1.0).args[0]
    comfy.model_management.load_models_gpu([model])
    assert all(s.shape == (q.shape[0], 1) for q, s in _int8_state(model).values())
    y = forward(model, env["inputs"])
    comfy.model_management.unload_all_models()
    assert _same_state(_int8_state(base), before)
    s0 = sqnr_db(flux2["ref"], run(env, base))
    assert s0 - sqnr_db(reference(flux2, env, (name, 1.0)), y) < 3.0


def test_merge_stack_and_offload(flux2, env):
    """The stack node: several LoRAs with their own strengths, empty and zero slots skipped, requantized once;
    the same clone under lowvram offload (ComfyUI applies the patches in float on the fly) agrees."""
    import comfy.model_management

    from int8_w8a8.nodes import lora_nodes

    a = write_lora(env, "stack-a.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS, seed=21))
    b = write_lora(env, "stack-b.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS[:4] + KEPT_LAYERS, seed=22))
    ref = reference(flux2, env, (a, 0.7), (b, -0.4))
    out = lora_nodes.Int8LoraMergeStack.execute(env["int8"], lora_1=a, strength_1=0.7, lora_2="None", strength_2=1.0,
                                                 lora_3=b, strength_3=-0.4, lora_4=a, strength_4=0.0)
    assert len(out.ui["text"]) == 2
    model = out.args[0]
    assert all(len(v) <= 2 for v in model.patches.values())  # one patch list per weight, applied at once
    y = run(env, model)
    assert loss(flux2, env, ref, y) < 3.0
    model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    try:
        y_lowvram = forward(model, flux2["inputs"])
    finally:
        model.unpatch_model()
    assert loss(flux2, env, ref, y_lowvram) < 0.5  # float on the fly: no requantization
    assert sqnr_db(y_lowvram, y) > 25
    comfy.model_management.unload_all_models()


@pytest.mark.parametrize("kind", ["lokr", "loha", "dora"])
def test_merge_lycoris_and_dora(flux2, env, kind):
    """LoKr, LoHa and DoRA go through ComfyUI's calculate_weight like plain LoRAs; dynamic refuses them
    on INT8 weights, naming the merge node."""
    from int8_w8a8.lora import loading
    from int8_w8a8.nodes import lora_nodes

    sd = getattr(lu, kind)(flux2["sd"], QUANTIZED_LAYERS, seed=31)
    name = write_lora(env, f"{kind}.safetensors", sd)
    ref = reference(flux2, env, (name, 0.8))
    assert loss(flux2, env, ref, run(env, lora_nodes.Int8LoraMerge.execute(env["int8"], name, 0.8).args[0])) < 3.0
    with pytest.raises(loading.LoraError, match=r"cannot run as a dynamic LoRA.*Load LoRA \(INT8 merge\)"):
        lora_nodes.Int8LoraDynamic.execute(env["int8"], name, 0.8)


def test_merge_and_dynamic_on_smoothquant_layers(flux2, env, tmp_path):
    """A SmoothQuant file (weights stored as W * s, activations divided by s): a merged LoRA is requantized with
    the layer's smoothing vector, a dynamic one is added to the unsmoothed activations; both match BF16+LoRA."""
    from int8_w8a8.nodes import lora_nodes
    from int8_w8a8.ops import loader

    base = loader.load_file(write(tmp_path, "sq.safetensors", *fu.modelopt_smoothquant(flux2["sd"], quantized_layer)))
    s0 = sqnr_db(flux2["ref"], run(env, base))
    name = write_lora(env, "sq-lora.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS + KEPT_LAYERS, seed=9))
    ref = reference(flux2, env, (name, 1.0))
    merged = lora_nodes.Int8LoraMerge.execute(base, name, 1.0).args[0]
    dyn = lora_nodes.Int8LoraDynamic.execute(base, name, 1.0).args[0]
    assert s0 - sqnr_db(ref, run(env, merged)) < 3.0
    assert s0 - sqnr_db(ref, run(env, dyn)) < 0.5


# ------------------------------------------------------------------------------------------------ dynamic


def test_dynamic_leaves_weights_and_adds_up(flux2, env):
    """Dynamic LoRAs: the INT8 weights are not touched; chained nodes, the stack node and ComfyUI's BF16
    reference agree; a new strength takes effect; the term is gone after unloading."""
    import comfy.model_management

    from int8_w8a8.nodes import lora_nodes

    a = write_lora(env, "dyn-a.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS + KEPT_LAYERS, seed=41))
    b = write_lora(env, "dyn-b.safetensors", lu.lora(flux2["sd"], list(lu.DIFFUSERS), fmt="diffusers", seed=42))
    base = env["int8"]
    before = _int8_state(base)
    chained = lora_nodes.Int8LoraDynamic.execute(base, a, 1.0).args[0]
    chained = lora_nodes.Int8LoraDynamic.execute(chained, b, 0.5).args[0]
    stacked = lora_nodes.Int8LoraDynamicStack.execute(base, lora_1=a, strength_1=1.0, lora_2=b, strength_2=0.5).args[0]
    assert not chained.patches and not stacked.patches  # nothing to merge
    comfy.model_management.load_models_gpu([chained])
    assert _same_state(_int8_state(chained), before)
    y_chained = forward(chained, flux2["inputs"])
    comfy.model_management.unload_all_models()
    y_stacked = run(env, stacked)
    assert sqnr_db(y_stacked, y_chained) > 60
    assert loss(flux2, env, reference(flux2, env, (a, 1.0), (b, 0.5)), y_chained) < 0.5
    y_weak = run(env, lora_nodes.Int8LoraDynamic.execute(base, a, 0.3).args[0])
    assert loss(flux2, env, reference(flux2, env, (a, 0.3)), y_weak) < 0.5
    layer = base.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert layer.int8_lora is None and torch.equal(run(env, base), env["y0"])


def test_dynamic_state_is_per_clone(flux2, env):
    """Two branches on one base model with different LoRAs, run interleaved, each get their own result."""
    from int8_w8a8.nodes import lora_nodes

    a = write_lora(env, "clone-a.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS, seed=51))
    b = write_lora(env, "clone-b.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS, seed=52))
    base = env["int8"]
    model_a = lora_nodes.Int8LoraDynamic.execute(base, a, 1.0).args[0]
    model_b = lora_nodes.Int8LoraDynamic.execute(base, b, 1.0).args[0]
    y_a, y_b, y_a2, y_base = run(env, model_a), run(env, model_b), run(env, model_a), run(env, base)
    assert torch.equal(y_a, y_a2) and torch.equal(y_base, env["y0"])
    assert loss(flux2, env, reference(flux2, env, (a, 1.0)), y_a) < 0.5
    assert loss(flux2, env, reference(flux2, env, (b, 1.0)), y_b) < 0.5


def test_dynamic_on_the_stock_loader(flux2, env):
    """Models from ComfyUI's own loader (comfy-kitchen layout, ComfyUI's Linear) get a per-clone forward."""
    from int8_w8a8.nodes import lora_nodes

    name = write_lora(env, "stock.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS + KEPT_LAYERS, seed=61))
    kitchen = _kitchen_int8(env)
    y = run(env, lora_nodes.Int8LoraDynamic.execute(kitchen, name, 1.0).args[0])
    assert loss(flux2, env, reference(flux2, env, (name, 1.0)), y) < 0.5
    assert sqnr_db(env["y0"], run(env, kitchen)) > 60  # the stock model itself is unchanged


def test_dynamic_under_torch_compile(flux2, env, monkeypatch):
    """fullgraph compile of a model with a dynamic LoRA: one graph, the LoRA applied, and another clone with
    another strength through the same compiled module gets its own result (not a stale one)."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention
    import comfy.model_management
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from int8_w8a8.nodes import lora_nodes

    # ComfyUI's CPU attention asks psutil for free memory, which breaks graphs; GPUs use SDPA, as here
    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    name = write_lora(env, "compile.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS + KEPT_LAYERS, seed=71))
    strong = lora_nodes.Int8LoraDynamic.execute(env["int8"], name, 1.0).args[0]
    weak = lora_nodes.Int8LoraDynamic.execute(env["int8"], name, 0.25).args[0]
    eager = {m: run(env, m) for m in (strong, weak)}
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(env["int8"].model.diffusion_model, backend=backend, fullgraph=True)
    x, t, ctx = flux2["inputs"]
    dtype = env["int8"].model.manual_cast_dtype or env["int8"].model.get_dtype()
    for model in (strong, weak, strong):
        comfy.model_management.load_models_gpu([model])
        with torch.inference_mode():
            y = compiled(x.to(dtype), t.to(dtype), ctx.to(dtype)).float()
        comfy.model_management.unload_all_models()
        assert sqnr_db(eager[model], y) > 60
    assert not counters["graph_break"] and backend.frame_count <= 2
    assert sqnr_db(eager[strong], eager[weak]) < 40


# ------------------------------------------------------------------------------------------------ before quantization


def test_loader_lora_stack_applies_before_quantization(flux2, env):
    """LoRA Stack -> INT8 loader: converted weights get the LoRA before their only rounding (closer to BF16+LoRA
    than merging into INT8), kept layers get it as an ordinary patch; on an INT8 file it merges."""
    from int8_w8a8.nodes import lora_nodes, model_nodes

    a = write_lora(env, "pre-a.safetensors", lu.lora(flux2["sd"], QUANTIZED_LAYERS + KEPT_LAYERS, seed=81))
    b = write_lora(env, "pre-b.safetensors", lu.lora(flux2["sd"], list(lu.DIFFUSERS), fmt="diffusers", seed=82))
    stack = lora_nodes.Int8LoraStack.execute(lora_1=a, strength_1=1.0).args[0]
    stack = lora_nodes.Int8LoraStack.execute(lora_stack=stack, lora_1=b, strength_1=0.5, lora_2="None").args[0]
    assert [s.name for s in stack] == [a, b]
    ref = reference(flux2, env, (a, 1.0), (b, 0.5))
    out = model_nodes.Int8DiffusionModelLoader.execute("bf16.safetensors", "auto", "per-row", "0", lora_stack=stack)
    load, *matched = out.ui["text"]  # what was loaded and converted, then one line per LoRA
    assert "10 layers converted to INT8" in load and len(matched) == 2 and "LoRA keys matched" in matched[0]
    model = out.args[0]
    patched = {k[len("diffusion_model."):-len(".weight")] for k in model.patches}
    assert patched == set(KEPT_LAYERS)  # the quantized layers took it before quantization
    pre = loss(flux2, env, ref, run(env, model))
    merged = loss(flux2, env, ref, run(env, lora_nodes.Int8LoraMergeStack.execute(
        env["int8"], lora_1=a, strength_1=1.0, lora_2=b, strength_2=0.5).args[0]))
    print(f"loss before quantization {pre:.2f} dB, merged into INT8 {merged:.2f} dB")
    assert pre < 1.0 and pre < merged - 0.5
    int8_file = model_nodes.Int8DiffusionModelLoader.execute("native.safetensors", "auto", "per-row", "0",
                                                           lora_stack=stack).args[0]
    patched = {k[len("diffusion_model."):-len(".weight")] for k in int8_file.patches}
    assert patched == set(QUANTIZED_LAYERS + KEPT_LAYERS)
    assert loss(flux2, env, ref, run(env, int8_file)) < 3.0


# ------------------------------------------------------------------------------------------------ bad input


def _corrupt(env, name):
    path = env["root"] / "loras" / name
    path.write_bytes(path.read_bytes()[:100])
    return name


def test_bad_loras_fail_clearly_and_leave_the_model(flux2, env):
    from int8_w8a8.lora import loading
    from int8_w8a8.nodes import lora_nodes

    sd = flux2["sd"]
    other_arch = write_lora(env, "sdxl.safetensors", {
        "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": torch.zeros(320, 4),
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": torch.zeros(4, 320),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4),
    })
    big = lu.lora({k: torch.randn(2 * v.shape[0], v.shape[1]) if v.dim() == 2 else v for k, v in sd.items()},
                  QUANTIZED_LAYERS[:2])
    wrong_size = write_lora(env, "wrong-size.safetensors", big)
    rank = lu.lora(sd, QUANTIZED_LAYERS[:1])
    rank["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"] = torch.zeros(4, 256)
    bad_rank = write_lora(env, "bad-rank.safetensors", rank)
    broken = _corrupt(env, write_lora(env, "broken.safetensors", lu.lora(sd, QUANTIZED_LAYERS)))
    cases = [
        (other_arch, r"sdxl.safetensors: none of its 3 keys match this Flux2 model \(first keys: lora_te1"),
        (wrong_size, r"wrong-size.safetensors: 2 LoRA weight\(s\) do not fit the model: "
                     r"diffusion_model.double_blocks.0.img_attn.qkv.weight \(LoRA \[1536, 8\]"),
        (bad_rank, r"bad-rank.safetensors: 1 LoRA weight\(s\) do not fit.*LoRA \[768, 8\] x \[4, 256\]"),
        (broken, r"broken.safetensors: cannot be read .*download it again"),
    ]
    base = env["int8"]
    object_patches = dict(base.object_patches)  # the loader's own (the fused FLUX path's RoPE table)
    for name, message in cases:
        for node in (lora_nodes.Int8LoraMerge, lora_nodes.Int8LoraDynamic):
            with pytest.raises(loading.LoraError, match=message):
                node.execute(base, name, 1.0)
    assert not base.patches and base.object_patches == object_patches and torch.equal(run(env, base), env["y0"])


def test_partial_match_is_reported(flux2, env):
    from int8_w8a8.nodes import lora_nodes

    sd = lu.lora(flux2["sd"], QUANTIZED_LAYERS[:2])
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, 4)
    name = write_lora(env, "partial.safetensors", sd)
    text = lora_nodes.Int8LoraDynamic.execute(env["int8"], name, 1.0).ui["text"][0]
    assert text.startswith(f"{name}: 4/5 LoRA keys matched (2 weights); not matched: lora_te_text_model")

