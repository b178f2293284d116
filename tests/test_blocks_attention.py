"""Integration tier: the fused blocks' attention option (``LoadOptions.attention``; ops/blocks/attention_choice.py)
inside a real ComfyUI.

Tiny models (FLUX.2, Wan, Z-Image: heads of 128, BF16 activations) are loaded through the pack's loader with
``attention`` "bf16", "8-bit" and "auto". Checked: the choice lives in each clone's transformer options; "8-bit"
calls ``kernels.attention_8bit`` once per fused block (on the CPU its torch twin: the kernel's quantization and
blockwise arithmetic) and the step's SQNR against the BF16 model drops by at most 2 dB from the fused step with
ComfyUI's attention (issue 14's bound); "bf16" never calls it; "auto" on the CPU follows the rule (the twin is
not measured faster than SDPA, so ComfyUI's attention, the same output as "bf16"); masks, unsupported head sizes,
float32 activations and attention overrides use ComfyUI's attention with one log line; the 8-bit output
reshapes to ``[B, S, H * D]`` as a view; and a fused model with 8-bit attention compiles into one graph with the
op in it.
"""

from __future__ import annotations

import logging

import pytest
import torch

from . import blocks_util as bu
from .conftest import sqnr_db

pytestmark = pytest.mark.integration

CHOICES = ("bf16", "8-bit", "auto")
MAX_DROP_DB = 2.0  # issue 14: the step's SQNR vs BF16 drops by at most 2 dB with 8-bit attention


@pytest.fixture
def attn_calls(monkeypatch):
    """The outputs of every ``kernels.attention_8bit`` call (a recording wrapper around the pack's function; the
    fused blocks look it up on the ``kernels`` package at call time)."""
    from int8_w8a8 import kernels

    outputs: list[torch.Tensor] = []
    original = kernels.attention_8bit

    def recording(*a, **k):
        out = original(*a, **k)
        outputs.append(out)
        return out

    monkeypatch.setattr(kernels, "attention_8bit", recording)
    return outputs


@pytest.fixture
def fresh_log(monkeypatch):
    """The attention rule's once-per-process log memory emptied for the test."""
    from int8_w8a8.ops.blocks import attention_choice

    monkeypatch.setattr(attention_choice, "_LOGGED", set())


def _flux2_module(**kw):
    from .tiny_flux2 import flux2_module

    return flux2_module(**kw)


def _flux2_inputs():
    gen = torch.Generator().manual_seed(7)
    return (torch.randn(2, 128, 4, 6, generator=gen), torch.tensor([0.7, 0.3]),
            torch.randn(2, 8, 64, generator=gen)), {}


def _wan_inputs():
    from .test_blocks_wan import inputs

    return inputs(), {}


def _zimage_inputs():
    from .test_blocks_zimage import inputs

    return inputs()


def _wan_module(**kw):
    from .test_blocks_wan import wan_module

    return wan_module(**kw)


def _zimage_module(**kw):
    from .test_blocks_zimage import zimage_module

    return zimage_module(**kw)


# architecture -> (module builder, inputs, fused blocks with attention per step)
ARCHS = {"flux2": (_flux2_module, _flux2_inputs, 2), "wan": (_wan_module, _wan_inputs, 2),
         "zimage": (_zimage_module, _zimage_inputs, 2)}


def _loads(arch: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The BF16 model (ComfyUI's stock loader) and the pack's fused loads with each attention choice."""
    import comfy.sd

    build, _, _ = ARCHS[arch]
    sd = bu.random_state_dict(build(device="meta"), seed=23)
    with bu.tiny_detection():
        out = {c: bu.load(sd, dtype, attention=c) for c in CHOICES}
        out["ref"] = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": dtype},
                                                              disable_dynamic=True)
    return out


@pytest.fixture(scope="module")
def flux2(comfyui):
    return _loads("flux2")


def test_choice_is_per_clone_and_checked(flux2):
    from int8_w8a8.ops import loader
    from int8_w8a8.ops.blocks import attention_choice

    key = attention_choice.KEY
    for choice in CHOICES:
        assert flux2[choice].model_options["transformer_options"][key] == choice
    clone = flux2["8-bit"].clone()
    assert clone.model_options["transformer_options"][key] == "8-bit"
    attention_choice.set_choice(clone, "bf16")
    assert flux2["8-bit"].model_options["transformer_options"][key] == "8-bit"  # the original keeps its choice
    assert set(clone.model_options["transformer_options"]["patches_replace"]["dit"]) == {
        ("double_block", 0), ("single_block", 0)}
    with pytest.raises(ValueError, match=r"attention: expected one of auto, bf16, 8-bit, got 'fp8'"):
        loader.LoadOptions(attention="fp8")
    with pytest.raises(ValueError, match=r"attention: expected one of"):
        attention_choice.set_choice(clone, "int8")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_8bit_attention_step_against_bf16(comfyui, flux2, arch, attn_calls):
    """One step per choice: "8-bit" calls the op once per fused block and loses at most 2 dB of SQNR vs the BF16
    model; "bf16" never calls it; "auto" gives the output of the choice its rule makes (on the CPU: "bf16")."""
    from int8_w8a8.kernels import attention as attention_rules

    models = flux2 if arch == "flux2" else _loads(arch)
    _, make_inputs, blocks = ARCHS[arch]
    args, kwargs = make_inputs()
    ref = bu.run(models["ref"], args, kwargs)
    # the CPU rule: the twin is not measured faster than SDPA; on a GPU the table of its generation decides (a rule
    # from a number of keys on leaves these small models, a few hundred tokens, on ComfyUI's attention)
    decision = attention_rules.auto_8bit(torch.device(models["auto"].load_device))
    auto = decision.eight_bit and decision.min_keys == 0
    assert auto is False or torch.cuda.is_available()
    y = {}
    for choice in CHOICES:
        attn_calls.clear()
        y[choice] = bu.run(models[choice], args, kwargs)
        eight_bit = choice == "8-bit" or (choice == "auto" and auto)
        assert len(attn_calls) == (blocks if eight_bit else 0), (choice, len(attn_calls))
    assert torch.equal(y["auto"], y["8-bit" if auto else "bf16"])
    s16, s8, apart = sqnr_db(ref, y["bf16"]), sqnr_db(ref, y["8-bit"]), sqnr_db(y["bf16"], y["8-bit"])
    print(f"[sqnr vs BF16] {arch}: fused with ComfyUI's attention {s16:.2f} dB, with 8-bit attention {s8:.2f} dB "
          f"(the two {apart:.2f} dB apart)")
    assert s8 >= s16 - MAX_DROP_DB and s8 > 25, (s16, s8)
    assert 25 < apart < 80, apart  # 8-bit attention changed the step, by about its quantization error


def test_masked_call_runs_comfyuis_block_and_attention(flux2, attn_calls):
    """A FLUX.2 call with an attention mask runs ComfyUI's blocks (the fused blocks' mask rule), so no 8-bit
    attention: the output is the unfused model's bit for bit."""
    args, _ = _flux2_inputs()
    mask = torch.zeros(2, 1, 8 + 24, 8 + 24, dtype=torch.bfloat16)
    mask[:, :, :, 5:8] = -1e4
    y = bu.run(flux2["8-bit"], args, {"attention_mask": mask})
    assert not attn_calls
    assert torch.equal(y, bu.run(flux2["8-bit"], args, {"attention_mask": mask}, fused=False))


def _qkv(heads: int, head_dim: int, seq: int = 40, dtype=torch.bfloat16):
    """q, k, v as the fused blocks pass them: [B, H, S, D] views of [B, S, H, D] buffers, random values."""
    from int8_w8a8.ops.blocks import common

    x = torch.empty(2, seq, heads * head_dim, dtype=dtype)
    bufs = common.qkv_buffers(x, heads, head_dim, seq)
    gen = torch.Generator().manual_seed(3)
    for t in bufs:
        t.copy_(torch.randn(t.shape, generator=gen))
    return bufs


def _comfy(q, k, v, heads, mask=None):
    import comfy.ldm.modules.attention

    return comfy.ldm.modules.attention.optimized_attention(q, k, v, heads, mask=mask, skip_reshape=True)


def test_8bit_output_is_a_view_in_the_blocks_layout(comfyui, attn_calls, fresh_log, caplog):
    from int8_w8a8.ops.blocks import attention_choice

    q, k, v = _qkv(2, 128)
    with caplog.at_level(logging.INFO, logger=attention_choice.__name__):
        out = attention_choice.attention(q, k, v, 2, {attention_choice.KEY: "8-bit"})
        attention_choice.attention(q, k, v, 2, {attention_choice.KEY: "8-bit"})
    assert len(attn_calls) == 2 and out.shape == (2, 40, 256)
    # q's layout: the [B, S, H * D] result shares the op's output storage (no transposing copy)
    assert out.data_ptr() == attn_calls[0].data_ptr() and out.is_contiguous()
    rel = float((out.double() - _comfy(q, k, v, 2).double()).norm() / _comfy(q, k, v, 2).double().norm())
    assert rel < 0.03, rel
    assert [r.getMessage() for r in caplog.records] == [
        "int8_w8a8: fused blocks' attention (8-bit chosen): 8-bit attention"]


@pytest.mark.parametrize("case", ["head size 32", "head size 96", "mask", "float32", "override", "auto on cpu"])
def test_calls_8bit_cannot_take_use_comfyuis_attention_logged_once(comfyui, attn_calls, fresh_log, caplog, case):
    """Each rule: ComfyUI's attention (its output exactly), no 8-bit call, one log line naming the reason."""
    from int8_w8a8.ops.blocks import attention_choice

    head_dim = {"head size 32": 32, "head size 96": 96}.get(case, 128)
    q, k, v = _qkv(2, head_dim, dtype=torch.float32 if case == "float32" else torch.bfloat16)
    mask = torch.zeros(40, 40, dtype=q.dtype) if case == "mask" else None
    options = {attention_choice.KEY: "auto" if case == "auto on cpu" else "8-bit"}
    seen = []
    if case == "override":
        def override(func, *a, **kw):
            seen.append(func)
            return func(*a, **kw)
        options[attention_choice.OVERRIDE_KEY] = override
    with caplog.at_level(logging.INFO, logger=attention_choice.__name__):
        outs = [attention_choice.attention(q, k, v, 2, options, mask=mask) for _ in range(2)]
    assert not attn_calls
    want = _comfy(q, k, v, 2, mask=mask)
    assert all(torch.equal(o, want) for o in outs)
    reason = {"head size 32": "head size D=32 is not supported", "head size 96": "head size D=96",
              "mask": "attention mask present", "float32": "expected dtype bfloat16 or float16, got float32",
              "override": "another node overrides ComfyUI's attention", "auto on cpu": "auto: tensors are on cpu"}[case]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and reason in lines[0] and "ComfyUI's attention" in lines[0], lines
    assert not seen if case != "override" else len(seen) == 2  # ComfyUI applied the other node's override


def test_auto_from_a_number_of_keys(comfyui, attn_calls, fresh_log, caplog, monkeypatch):
    """Where ``auto`` is measured faster only from a number of keys on (the H200: 8192), shorter calls run
    ComfyUI's attention (one log line, no length in it) and longer ones the 8-bit kernel (here the twin, with the
    decision patched in for the CPU)."""
    from int8_w8a8.kernels import attention as attention_rules
    from int8_w8a8.ops.blocks import attention_choice

    monkeypatch.setattr(attention_rules, "auto_8bit",
                        lambda device: attention_rules.AutoDecision(True, "measured faster from 48 keys", 48))
    attention_choice.reset()
    try:
        options = {attention_choice.KEY: "auto"}
        with caplog.at_level(logging.INFO, logger=attention_choice.__name__):
            short = [attention_choice.attention(*_qkv(2, 64, seq=s), 2, options) for s in (40, 47)]
            assert not attn_calls
            long = attention_choice.attention(*_qkv(2, 64, seq=48), 2, options)
        assert len(attn_calls) == 1 and long.shape == (2, 48, 128)
        assert torch.equal(short[0], _comfy(*_qkv(2, 64, seq=40), 2))
        lines = [r.getMessage() for r in caplog.records]
        assert lines == ["int8_w8a8: fused blocks' attention (auto chosen): ComfyUI's attention: auto: 8-bit from 48 "
                         "keys on this GPU (measured slower than ComfyUI's below)",
                         "int8_w8a8: fused blocks' attention (auto chosen): 8-bit attention"], lines
    finally:
        monkeypatch.undo()
        attention_choice.reset()


def test_auto_from_a_number_of_keys_compiles(comfyui, monkeypatch):
    """The key-count rule under torch.compile(fullgraph=True): the decision is a constant, the count a comparison
    with the call's shape; below it the compiled call is ComfyUI's attention, from it the 8-bit op, each equal to
    the eager call."""
    from torch._dynamo.testing import CompileCounter

    from int8_w8a8.kernels import attention as attention_rules
    from int8_w8a8.ops.blocks import attention_choice

    bu.sdpa_attention(monkeypatch)
    monkeypatch.setattr(attention_rules, "auto_8bit",
                        lambda device: attention_rules.AutoDecision(True, "measured faster from 48 keys", 48))
    attention_choice.reset()
    try:
        options = {attention_choice.KEY: "auto"}
        counter = CompileCounter()
        compiled = torch.compile(lambda q, k, v: attention_choice.attention(q, k, v, 2, options), backend=counter,
                                 fullgraph=True)
        torch._dynamo.reset()
        for seq, eight_bit in ((40, False), (48, True)):
            q, k, v = _qkv(2, 64, seq=seq)
            want = attention_choice.attention(q, k, v, 2, options)
            assert torch.equal(compiled(q, k, v), want), seq
            assert torch.equal(want, _comfy(q, k, v, 2)) != eight_bit, seq
        assert counter.frame_count >= 1
    finally:
        monkeypatch.undo()
        attention_choice.reset()
        torch._dynamo.reset()


def test_float32_model_keeps_comfyuis_attention(comfyui, attn_calls):
    """8-bit attention takes bf16/fp16: a float32 model's fused blocks run ComfyUI's attention (same output as
    "bf16")."""
    build, make_inputs, _ = ARCHS["flux2"]
    sd = bu.random_state_dict(build(device="meta"), seed=23)
    patcher = bu.load(sd, torch.float32, attention="8-bit")
    args, kwargs = make_inputs()
    y = bu.run(patcher, args, kwargs)
    assert not attn_calls
    assert torch.equal(y, bu.run(bu.load(sd, torch.float32, attention="bf16"), args, kwargs))


def test_torch_compile_traces_8bit_attention_in_one_graph(flux2, monkeypatch):
    """A FLUX.2 model with 8-bit attention under torch.compile(fullgraph=True): one graph, the fused kernels and
    ``int8_w8a8::attention_8bit`` in it, and the eager output."""
    bu.sdpa_attention(monkeypatch)
    patcher = flux2["8-bit"]
    args, _ = _flux2_inputs()
    want = bu.run(patcher, args)
    y = bu.compiled_in_one_graph(patcher, args, options=dict(patcher.model_options["transformer_options"]),
                                 ops=(*bu.KERNELS, "flux_rope_table", "attention_8bit"))
    assert sqnr_db(want, y) > 60


def test_log_once_leaves_no_guard_in_compiled_graphs(comfyui, fresh_log, monkeypatch, caplog):
    """The fused blocks' log-once helpers test ``is_compiling()`` before their set: a traced membership test would
    become a guard on the set, and the first eager log line after the compile would recompile the graph."""
    from torch._dynamo.testing import CompileCounter

    from int8_w8a8.ops.blocks import attention_choice, common

    monkeypatch.setattr(common, "_LOGGED", set())
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(x):
        attention_choice._log_once("auto", "a test outcome")
        common.fallback("test", "a test reason")
        return x + 1

    torch._dynamo.reset()
    step(torch.ones(3))
    with caplog.at_level(logging.INFO, logger="int8_w8a8"):
        attention_choice._log_once("auto", "a test outcome")  # eager calls log once and fill the sets
        common.fallback("test", "a test reason")
    assert sum("a test" in r.getMessage() for r in caplog.records) == 2
    step(torch.ones(3))
    assert counter.frame_count == 1


def test_the_loader_says_which_attention_will_run(comfyui):
    """The loader's report (the node's text) says what the choice will run on the model's device in the dtype
    ComfyUI computes in, so a user who picked "8-bit" where it cannot run sees it on the node, not only in the log:
    on the CPU ComfyUI computes a BF16 model in float32 (its manual cast), so "8-bit" runs ComfyUI's attention;
    "auto" keeps ComfyUI's (the twin is not measured faster than SDPA); "bf16" adds nothing."""
    build, _, _ = ARCHS["flux2"]
    sd = bu.random_state_dict(build(device="meta"), seed=23)
    said = {}
    with bu.tiny_detection():
        for choice in CHOICES:
            texts = []
            model = bu.load(sd, torch.bfloat16, attention=choice, notify=texts.append)
            said[choice] = texts[0]
    assert model.model.manual_cast_dtype == torch.float32  # what ComfyUI's _apply_model casts the inputs to here
    assert said["8-bit"].endswith("; attention (8-bit chosen): ComfyUI's on cpu: the model computes in float32 "
                                  "there; 8-bit attention takes bf16 or fp16"), said["8-bit"]
    assert "; attention (auto chosen): ComfyUI's on cpu: tensors are on cpu: the torch twin" in said["auto"]
    assert "attention" not in said["bf16"].split("; ")[-1]
    # held in BF16 (the load's dtype), computed in float32: the kept layers' text stays the file's dtype
    # (test_nodes_ui: a load without a dtype, where ComfyUI holds them in FP32 and the text says so)
    assert said["bf16"].endswith("output layers unquantized): 9 in BF16")


def test_attention_said_by_device_and_dtype(comfyui, gpu, monkeypatch):
    """``attention_choice.describe_choice`` by the same rules as the calls: the twin for a BF16 model on the CPU;
    on a simulated Hopper GPU "auto" keeps ComfyUI's where no 8-bit kernel is measured faster and states the key
    count where one is measured faster from it."""
    from int8_w8a8.kernels import attention as attn
    from int8_w8a8.kernels.attention_configs import config_for
    from int8_w8a8.ops.blocks import attention_choice

    monkeypatch.setattr(attention_choice, "_device_rule_cached", _uncached(attention_choice._device_rule_cached))
    monkeypatch.setattr(attention_choice, "_auto_min_keys_cached", _uncached(attention_choice._auto_min_keys_cached))
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert attention_choice.describe_choice("bf16", cpu, torch.bfloat16) is None
    assert attention_choice.describe_choice("8-bit", cpu, torch.bfloat16) == (
        "attention (8-bit chosen): 8-bit on cpu (calls it cannot take run ComfyUI's, logged once)")
    assert attention_choice.describe_choice("8-bit", cuda, torch.float16).startswith("attention (8-bit chosen): 8-bit")
    assert "not faster" in attention_choice.describe_choice("auto", cuda, torch.bfloat16)
    key = ((9, 0), config_for((9, 0)).name)
    monkeypatch.setitem(attn.TRITON_MEASURED, key, attn.Measured(0.8, 0.012, min_keys=8192, speedup_from=1.1))
    attn.reset()
    assert attention_choice.describe_choice("auto", cuda, torch.bfloat16) == (
        "attention (auto chosen): 8-bit on cuda:0 for calls with at least 8192 keys, ComfyUI's for shorter ones "
        "(measured slower there)")


def _uncached(cached):
    """The function behind a ``functools.cache`` wrapper, so a test's simulated GPU is not kept for later tests."""
    return cached.__wrapped__
