"""Integration tier: FLUX.2 (and FLUX.1) blocks on the fused kernels (ops/blocks/flux.py) inside a real ComfyUI (CPU).

The fused blocks are registered as ComfyUI block replacements, which ComfyUI applies when the model
runs through ``apply_model`` with the patcher's transformer options (as samplers call it). Checked:
the fused model equals ComfyUI's block order of operations up to bf16 rounding (SQNR against each
other and against the BF16 model), every rule that must fall back does (and then the output is ComfyUI's
own bit for bit), a dynamic LoRA keeps the blocks fused (eager and traced), and models built without
``fused_blocks`` carry no replacements.
"""

from __future__ import annotations

import pytest
import torch

from int8_w8a8.kernels import fused as fused_kernels

from . import blocks_util as bu
from .conftest import sqnr_db

pytestmark = pytest.mark.integration


def step(patcher, inputs, fused: bool = True) -> torch.Tensor:
    """One ``apply_model`` call; ``fused=False`` drops the block replacements from the options."""
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher])
    x, sigma, ctx = (t.to(patcher.load_device) for t in inputs)  # CPU here, the GPU on the GPU machine
    options = comfy.patcher_extension.copy_nested_dicts(patcher.model_options.get("transformer_options", {}))
    if not fused:
        options.pop("patches_replace", None)
    options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
    dtype = patcher.model.get_dtype()
    with torch.inference_mode():
        return patcher.model.apply_model(x.to(dtype), sigma, c_crossattn=ctx.to(dtype),
                                         transformer_options=options).float()


@pytest.fixture
def calls(monkeypatch):
    """How often the fused kernels ran (a counting wrapper around the pack's own functions)."""
    counts = {"glu": 0, "norm": 0}

    def counting(name, fn):
        def wrapped(*a, **k):
            counts[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(fused_kernels, "glu_quantize", counting("glu", fused_kernels.glu_quantize))
    monkeypatch.setattr(fused_kernels, "norm_modulate_quantize", counting("norm", fused_kernels.norm_modulate_quantize))
    return counts


@pytest.fixture(scope="module")
def models(flux2):
    import comfy.sd

    from int8_w8a8.ops import formats, loader

    def int8(**kw):
        nsd, report = formats.normalize(dict(flux2["sd"]), None, "tiny")
        return loader.build(nsd, report, loader.LoadOptions(**kw), "tiny", disable_dynamic=True)

    gen = torch.Generator().manual_seed(7)
    inputs = (torch.randn(2, 128, 4, 6, generator=gen), torch.tensor([0.7, 0.3]),
              torch.randn(2, 8, 64, generator=gen))
    bf16 = comfy.sd.load_diffusion_model_state_dict(dict(flux2["sd"]), disable_dynamic=True)
    return {"fused": int8(), "plain": int8(fused_blocks=False), "inputs": inputs, "ref": step(bf16, inputs)}


def test_replacements_registered_only_when_asked(models):
    dit = models["fused"].model_options["transformer_options"]["patches_replace"]["dit"]
    assert set(dit) == {("double_block", 0), ("single_block", 0)}
    assert set(models["fused"].object_patches) == {"diffusion_model.pe_embedder"}
    assert "patches_replace" not in models["plain"].model_options.get("transformer_options", {})
    assert not models["plain"].object_patches


def test_rope_table_is_comfyuis_bit_for_bit(models):
    """The object-patched ``pe_embedder`` returns ComfyUI's ``EmbedND`` table exactly: called directly, through
    its custom op (what a traced model runs), and for positions FLUX.2 gives image, text and reference tokens."""
    from comfy.ldm.flux.layers import EmbedND

    from int8_w8a8.ops.blocks import common

    patcher, key = models["fused"], "diffusion_model.pe_embedder"
    table = patcher.object_patches[key]
    assert isinstance(table, common.EagerRopeTable)
    # ComfyUI's own module: on the model, or in the (clone-shared) backup while a loaded patcher applies the patch
    own = patcher.object_patches_backup.get(key, patcher.model.diffusion_model.pe_embedder)
    assert type(own) is EmbedND and table.embedder is own
    gen = torch.Generator().manual_seed(5)
    ids = torch.cat([torch.randint(0, 64, (2, 37, 4), generator=gen).float(),
                     torch.rand(2, 5, 4, generator=gen) * 1000], dim=1)
    want = own(ids)
    assert want.dtype == torch.float32 and want.shape == (2, 1, 42, sum(own.axes_dim) // 2, 2, 2)
    assert torch.equal(table(ids), want)
    op = torch.ops.int8_w8a8.flux_rope_table.default
    assert torch.equal(op(ids, own.theta, list(own.axes_dim)), want)
    torch.library.opcheck(op, (ids, float(own.theta), list(own.axes_dim)))


# (theta, axes_dim) of the architectures' EmbedND: FLUX.2, Chroma / FLUX.1, Qwen-Image, Z-Image, Wan 14B (head 128)
ROPE_AXES = [(2000, [32, 32, 32, 32]), (10000, [16, 56, 56]), (10000, (16, 56, 56)), (256.0, [32, 48, 48]),
             (10000.0, [44, 42, 42])]


@pytest.mark.parametrize("theta,axes_dim", ROPE_AXES, ids=str)
@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_rope_table_matches_embednd_bit_for_bit(theta, axes_dim, device):
    """``common.rope_table`` against ComfyUI's ``EmbedND`` at each architecture's axes: integer positions (image
    grids, text indices), negative and fractional ones (Qwen-Image centres its grid, FLUX.2 scales references), ids
    of a strided view and of another dtype; twice on one device (the cached frequencies)."""
    from comfy.ldm.flux.layers import EmbedND

    from int8_w8a8.ops.blocks import common

    gen = torch.Generator().manual_seed(11)
    n = len(axes_dim)
    ids = torch.cat([torch.randint(-64, 4096, (2, 40, n), generator=gen).float(),
                     (torch.rand(2, 9, n, generator=gen) - 0.5) * 300], dim=1).to(device)
    own = EmbedND(sum(axes_dim), theta, axes_dim)
    for x in (ids, torch.cat([ids, ids], dim=-1)[..., ::2], ids.double(), ids[:1, :1]):
        want = own(x)
        got = common.rope_table(x, theta, axes_dim)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), (x.shape, x.stride(), x.dtype)
    wrapped = common.EagerRopeTable(own)
    assert torch.equal(wrapped(ids), own(ids))
    assert torch.equal(wrapped(ids[..., :1]), own(ids[..., :1]))  # fewer axes than the table: ComfyUI's module


def test_fused_matches_comfyui_blocks(models, calls):
    inputs, ref = models["inputs"], models["ref"]
    unfused = step(models["fused"], inputs, fused=False)
    assert calls == {"glu": 0, "norm": 0}
    fused = step(models["fused"], inputs)
    # double block: 2 streams x (norm1, norm2), single block: pre_norm; SwiGLU: 2 streams + single block
    assert calls == {"norm": 5, "glu": 3}
    assert torch.equal(unfused, step(models["plain"], inputs))
    assert sqnr_db(unfused, fused) > 30  # the same INT8 model, bf16 intermediates rounded differently
    s_fused, s_unfused = sqnr_db(ref, fused), sqnr_db(ref, unfused)
    assert s_fused > 25 and s_fused > s_unfused - 0.5, (s_fused, s_unfused)
    gen = torch.Generator().manual_seed(8)
    other = tuple(torch.randn(t.shape, generator=gen) if t.dim() > 1 else torch.rand(t.shape, generator=gen)
                  for t in inputs)
    bu.check_batch_entries(lambda a: step(models["fused"], a), inputs, other, fused, ref)


def test_glu_gemm_form_matches_the_two_gemm_form(models, calls, monkeypatch):
    """Hopper's SwiGLU GEMM form of the blocks (``glu_gemm``: the double blocks' MLP input layer, and the single
    blocks' linear1 split into its q/k/v rows and a GEMM writing only ``silu(g) * u``, which ``glu_quantize``
    takes as activated rows), run here through ``glu_gemm``'s two-GEMM body by replacing its rule: as close to
    the BF16 model as the two-GEMM form (h is rounded to bf16 before its quantization), the same batch rules."""
    inputs, ref = models["inputs"], models["ref"]
    two = step(models["fused"], inputs)
    seen = []
    monkeypatch.setattr(fused_kernels, "glu_gemm_rule", lambda *a: None)
    def recording(name, fn):
        return lambda *a, **k: seen.append(name) or fn(*a, **k)

    for name in ("glu_gemm", "split_glu_gemm"):
        monkeypatch.setattr(fused_kernels, name, recording(name, getattr(fused_kernels, name)))
    calls.update(glu=0, norm=0)
    one = step(models["fused"], inputs)
    # the double block's 2 streams, then the single block's q/k/v and SwiGLU in one; its glu_quantize
    assert seen == ["glu_gemm", "glu_gemm", "split_glu_gemm"] and calls == {"norm": 5, "glu": 1}
    assert sqnr_db(two, one) > 35
    s_one, s_two = sqnr_db(ref, one), sqnr_db(ref, two)
    assert s_one > 25 and s_one > s_two - 0.5, (s_one, s_two)


@pytest.mark.parametrize("group", [64, 256])
def test_convrot_model_stays_fused(flux2, models, calls, group, monkeypatch):
    """ConvRot weights keep the fused blocks: each fused quantizer rotates its rows by the group of the layer
    it feeds, and the output matches ComfyUI's blocks on the same rotated weights (which rotate inside their
    own activation quantization)."""
    from int8_w8a8.ops import formats, loader
    from int8_w8a8.ops.config import ConvertOptions

    nsd, report = formats.normalize(dict(flux2["sd"]), None, "tiny")
    rotated = loader.build(nsd, report, loader.LoadOptions(convert=ConvertOptions(rotate_group=group)), "tiny",
                           disable_dynamic=True)
    fed = [m for name, m in rotated.model.diffusion_model.named_modules()  # the linears fused kernels feed
           if name.endswith(("qkv", "proj", "mlp.0", "mlp.2", "linear1", "linear2"))]
    assert len(fed) == 10 and all(m.input_rotation() == group and m.fusable() for m in fed)
    inputs, ref = models["inputs"], models["ref"]
    unfused = step(rotated, inputs, fused=False)
    assert calls == {"glu": 0, "norm": 0}
    fused = step(rotated, inputs)
    assert calls == {"norm": 5, "glu": 3}
    assert sqnr_db(unfused, fused) > 30
    s_fused, s_unfused = sqnr_db(ref, fused), sqnr_db(ref, unfused)
    assert s_fused > 25 and s_fused > s_unfused - 0.5, (s_fused, s_unfused)
    # traced: the groups are constants of the graph, which equals eager fused
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention
    from torch._dynamo.utils import counters

    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    monkeypatch.setattr(comfy.ldm.modules.attention, "optimized_attention",
                        comfy.ldm.modules.attention.attention_pytorch)
    torch._dynamo.reset()
    counters.clear()
    model = rotated.model.diffusion_model
    dtype = rotated.model.get_dtype()
    args = tuple(t.to(rotated.load_device, dtype) for t in inputs)
    options = rotated.model_options["transformer_options"]
    with torch.inference_mode():
        want = model(*args, transformer_options=dict(options)).float()
        y = torch.compile(model, backend="aot_eager", fullgraph=True)(*args, transformer_options=dict(options))
    assert not counters["graph_break"] and sqnr_db(want, y.float()) > 60


def test_attention_patch_falls_back(models, calls):
    fused = models["fused"].clone()
    seen = []

    def attn1_patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        seen.append(q.shape)
        return {"q": q, "k": k, "v": v}

    fused.set_model_attn1_patch(attn1_patch)
    y = step(fused, models["inputs"])
    assert seen and calls == {"glu": 0, "norm": 0}
    assert torch.equal(y, step(models["plain"], models["inputs"]))


def test_dynamic_and_merged_lora_stay_fused(models, calls, tmp_path, monkeypatch, flux2):
    """A dynamic LoRA on every linear of the blocks (through lora/dynamic.py, as the node applies it) keeps both
    blocks fused and matches ComfyUI's blocks with the same LoRA; the LoRA merged instead stays fused too."""
    from int8_w8a8.lora import loading, merge

    without = step(models["fused"], models["inputs"])
    assert calls == {"norm": 5, "glu": 3}
    dyn, plain = bu.dynamic_lora([models["fused"], models["plain"]], flux2["sd"], ("double_blocks.", "single_blocks."),
                                 tmp_path, monkeypatch)
    y_dyn = step(dyn, models["inputs"])
    assert calls == {"norm": 10, "glu": 6}
    bu.check_dynamic_lora(y_dyn, step(plain, models["inputs"]), without)
    assert calls == {"norm": 10, "glu": 6}  # the plain model runs ComfyUI's blocks
    merged, _ = merge.merge(models["fused"], [loading.LoraSpec("dyn.safetensors", 1.0)])
    y_merged = step(merged, models["inputs"])
    assert calls == {"norm": 15, "glu": 9}
    assert sqnr_db(y_dyn, y_merged) > 25
    assert sqnr_db(step(merged, models["inputs"], fused=False), y_merged) > 30


@pytest.mark.parametrize("form", ["plain", "dynamic-lora", "glu-gemm"])
def test_torch_compile_traces_fused_blocks_in_one_graph(models, calls, monkeypatch, tmp_path, flux2, form):
    """Under torch.compile the fused blocks are traced (their kernels are custom ops): one graph, no breaks,
    the fused kernels in it, and the eager fused model's output; also with a dynamic LoRA on every block linear
    (its down projections and epilogue terms are the same custom ops), and in Hopper's SwiGLU GEMM form (its rule
    replaced: ``glu_gemm``'s op, traced weights split into the single blocks' q/k/v and MLP parts)."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention
    import comfy.model_management
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    # ComfyUI's CPU attention asks psutil for free memory, which breaks graphs; GPUs use SDPA, as here
    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    monkeypatch.setattr(comfy.ldm.modules.attention, "optimized_attention",
                        comfy.ldm.modules.attention.attention_pytorch)
    patcher = models["fused"]
    if form == "dynamic-lora":
        (patcher,) = bu.dynamic_lora([patcher], flux2["sd"], ("double_blocks.", "single_blocks."), tmp_path,
                                     monkeypatch)
    if form == "glu-gemm":
        monkeypatch.setattr(fused_kernels, "glu_gemm_rule", lambda *a: None)
    x, sigma, ctx = models["inputs"]
    options = patcher.model_options["transformer_options"]
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(patcher.model.diffusion_model, backend=backend, fullgraph=True)
    comfy.model_management.load_models_gpu([patcher])
    dtype = patcher.model.get_dtype()
    args = tuple(t.to(patcher.load_device, dtype) for t in (x, sigma, ctx))
    with torch.inference_mode():
        want = patcher.model.diffusion_model(*args, transformer_options=dict(options)).float()
        eager_calls = dict(calls)
        y = compiled(*args, transformer_options=dict(options)).float()
        unfused = patcher.model.diffusion_model(*args).float()
    # the SwiGLU GEMM form: one glu_quantize (the single block's attention output and activated MLP rows)
    assert eager_calls == {"norm": 5, "glu": 1 if form == "glu-gemm" else 3}
    assert not counters["graph_break"] and backend.frame_count == 1
    ops = {str(n.target) for g in backend.graphs for n in g.graph.nodes if n.op == "call_function"}
    for op in ("norm_modulate_quantize", "glu_quantize", "qk_norm_rope", "int8_gemm_residual", "flux_rope_table",
               *(("glu_gemm", "split_glu_gemm") if form == "glu-gemm" else ())):
        assert any(op in name for name in ops), (op, sorted(ops))
    assert sqnr_db(want, y) > 60
    assert sqnr_db(unfused, y) > 30


def test_torch_compile_dynamic_shapes(models, monkeypatch):
    """Compiled with dynamic shapes, a second image size gives the eager fused model's output, with no more
    compilations than ComfyUI's own blocks need (Flux's forward specializes on the image size itself: the
    fused ops' fakes and checks work on symbolic sizes and add no recompiles)."""
    import comfy.ldm.flux.math
    import comfy.ldm.modules.attention
    import comfy.model_management
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    monkeypatch.setattr(comfy.ldm.flux.math, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)
    monkeypatch.setattr(comfy.ldm.modules.attention, "optimized_attention",
                        comfy.ldm.modules.attention.attention_pytorch)
    _, sigma, ctx = models["inputs"]
    frames = {}
    for name in ("plain", "fused"):
        patcher = models[name]
        options = patcher.model_options.get("transformer_options", {})
        torch._dynamo.reset()
        counters.clear()
        backend = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(patcher.model.diffusion_model, backend=backend, dynamic=True, fullgraph=True)
        comfy.model_management.load_models_gpu([patcher])
        dtype = patcher.model.get_dtype()
        gen = torch.Generator().manual_seed(3)
        with torch.inference_mode():
            for h, w in ((4, 6), (6, 8), (8, 8)):
                args = tuple(t.to(patcher.load_device, dtype)
                             for t in (torch.randn(2, 128, h, w, generator=gen), sigma, ctx))
                want = patcher.model.diffusion_model(*args, transformer_options=dict(options)).float()
                y = compiled(*args, transformer_options=dict(options)).float()
                assert sqnr_db(want, y) > 60, (name, h, w)
        assert not counters["graph_break"]
        frames[name] = backend.frame_count
    assert frames["fused"] == frames["plain"], frames


def flux1_module(dtype=torch.float32, device="cpu", operations=None):
    """A tiny FLUX.1 (dev-like: guidance embedding, pooled vector; GELU-tanh MLPs, modulation in each block)."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    return Flux(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[],
                dtype=dtype, device=device, operations=operations or comfy.ops.disable_weight_init)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
def test_flux1_native_int8_file_runs_fused_gelu_blocks(comfyui, monkeypatch, dtype):
    """FLUX.1 (no conversion profile; its INT8 files load pre-quantized) runs the same fused blocks with GELU-tanh
    MLPs and the modulation computed inside each block: against ComfyUI's blocks and the float64 twin."""
    from int8_w8a8.ops import formats, loader

    from . import formats_util

    calls = bu.count_kernel_calls(monkeypatch)
    sd = bu.random_state_dict(flux1_module(device="meta"), seed=21)
    nsd, meta = formats_util.native(sd, lambda layer: layer.startswith(("double_blocks.", "single_blocks.")))
    nsd, report = formats.normalize(nsd, meta, "tiny-flux1.safetensors")
    patcher = loader.build(nsd, report, loader.LoadOptions(), "tiny-flux1", model_options={"dtype": dtype},
                           disable_dynamic=True)
    assert set(patcher.model_options["transformer_options"]["patches_replace"]["dit"]) == {
        ("double_block", 0), ("single_block", 0)}
    gen = torch.Generator().manual_seed(4)
    args = (torch.randn(2, 16, 8, 8, generator=gen), torch.rand(2, generator=gen), torch.randn(2, 8, 64, generator=gen))
    # ComfyUI hands the guidance over in the model's dtype and its embedding scales it by 1000 in that dtype:
    # 3.5 would be 3504 in bf16, which the float64 twin does not follow; 4.0 is 4000 in both
    kwargs = {"y": torch.randn(2, 32, generator=gen).to(dtype), "guidance": torch.full((2,), 4.0)}
    comfy = bu.run(patcher, args, kwargs, fused=False)
    fused = bu.run(patcher, args, kwargs)
    assert calls["glu_quantize:gelu_tanh"] == 3 and calls["norm_modulate_quantize"] == 5
    assert sqnr_db(comfy, fused) > 30
    truth = bu.float64_truth(patcher, flux1_module, args, kwargs)
    bu.check_against_float64(fused, comfy, truth, 25)
