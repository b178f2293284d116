"""The eager hot path of an INT8 linear: kernels/direct.py's LinearPlan and Int8Linear's choice of path.

Kernel tier (Triton under TRITON_INTERPRET=1 on the CPU, compiled on a GPU): a plan's first call records the
quantizer and GEMM launches, later calls replay them with this call's tensors; every result must equal the
launch path's bit for bit, for the GEMM configs the rules pick (generic at M <= 16, TMA above), rotations,
smoothing, strided inputs and a workspace that grows and is shared. Integration tier (a real ComfyUI): which
path ``Int8Linear.forward`` takes (resident plan vs ComfyUI's cast path) in every state ComfyUI puts a layer
in, and that both give the same output.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from int8_w8a8.kernels import direct, triton_ops
from int8_w8a8.kernels import reference as ref
from int8_w8a8.kernels.dispatch import Backend

from .conftest import INTERPRETED, KERNEL_DEVICE, ulp_diff

DEV = KERNEL_DEVICE
HOPPER = Backend("triton", "test", (9, 0))


def _assert_equal(out: torch.Tensor, expect: torch.Tensor) -> None:
    """Bitwise equal, except bf16 under the interpreter (truncating cast, see test_kernels.py): one ulp."""
    assert out.shape == expect.shape and out.dtype == expect.dtype
    if INTERPRETED and out.dtype == torch.bfloat16:
        assert ulp_diff(out, expect) <= 1
    else:
        assert torch.equal(out, expect)


def _weight(n: int, k: int, group: int = 0, smooth: bool = False):
    w = torch.randn(n, k, device=DEV) * 0.05
    s = torch.rand(k, device=DEV) + 0.5 if smooth else None
    q, scale = ref.quantize_weight(w * s if smooth else w, rotate_group=group)
    return q, scale, s


# ---------------------------------------------------------------------------------------------------- kernels
@pytest.mark.kernels
@pytest.mark.parametrize("lead", [(1,), (2, 8), (1, 17), (3, 40)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_replay_equals_launch_path(seed, lead, dtype, with_bias):
    k, n = 96, 40
    q, scale, _ = _weight(n, k)
    bias = torch.randn(n, device=DEV, dtype=torch.bfloat16) if with_bias else None
    plan = direct.LinearPlan(q, scale, bias, backend=HOPPER)
    for call in range(3):  # record, then replay twice with fresh inputs
        x = torch.randn(*lead, k, device=DEV, dtype=dtype)
        y = plan(x)
        b = None if bias is None else bias.to(dtype)
        _assert_equal(y, triton_ops.int8_linear(x, q, scale, b, dtype, None, 0, HOPPER))
        assert isinstance(plan.replays[(dtype, x.shape, x.stride(), True)], direct._Replay), call


@pytest.mark.kernels
@pytest.mark.parametrize("group,smooth", [(64, False), (256, False), (0, True)])
def test_replay_with_rotation_and_smoothing(seed, group, smooth):
    k, n = 512, 48
    q, scale, s = _weight(n, k, group, smooth)
    plan = direct.LinearPlan(q, scale, None, smooth=s, rotate_group=group, backend=HOPPER)
    for _ in range(2):
        x = torch.randn(20, k, device=DEV, dtype=torch.float32)
        _assert_equal(plan(x), triton_ops.int8_linear(x, q, scale, None, torch.float32, s, group, HOPPER))
    assert isinstance(next(iter(plan.replays.values())), direct._Replay)


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda" or INTERPRETED or not torch.cuda.is_available()
                    or torch.cuda.get_device_capability() != (9, 0), reason="Hopper's warp-specialized GEMM row")
def test_warp_specialized_gemm_replays_through_the_c_launcher(seed):
    """Hopper's large-M row (the warp-specialized GEMM) makes its TMA descriptors in the kernel: global scratch at
    every launch. Its replays keep Triton's C launcher (``launch._CLaunch`` allocates the scratch) and equal the
    launch path bit for bit, call after call (fresh inputs, so fresh scratch and output addresses)."""
    k, n = 384, 512
    q, scale, _ = _weight(n, k)
    from int8_w8a8.kernels import configs

    ws = Backend("triton", "test", (9, 0), table=configs.HOPPER_TABLE)  # (the dispatch's table has the Gluon row)
    plan = direct.LinearPlan(q, scale, None, backend=ws)
    for _ in range(3):
        x = torch.randn(1100, k, device=DEV, dtype=torch.bfloat16)  # M > 1024: the warp-specialized row
        _assert_equal(plan(x), triton_ops.int8_linear(x, q, scale, None, torch.bfloat16, None, 0, ws))
    replay = next(iter(plan.replays.values()))
    assert isinstance(replay, direct._Replay)
    scratch = [rec.claunch for rec, *_ in replay.launches if rec.scratch]
    assert scratch and all(c is not None and c.scratch > 0 for c in scratch)


@pytest.mark.kernels
def test_shared_workspace_grows_and_serves_every_plan(seed):
    """Two layers share one workspace; a larger M grows it between replays of a plan recorded on the small one."""
    direct.release_workspaces()
    k, n = 64, 32
    plans = []
    for _ in range(2):
        q, scale, _ = _weight(n, k)
        plans.append((direct.LinearPlan(q, scale, None, backend=HOPPER), q, scale))
    for m in (4, 4, 300, 4, 300):
        for plan, q, scale in plans:
            x = torch.randn(m, k, device=DEV)
            _assert_equal(plan(x), triton_ops.int8_linear(x, q, scale, None, torch.float32, None, 0, HOPPER))
    assert direct.workspace(1, torch.device(DEV)).numel() >= 300 * k + 4 * 300
    direct.release_workspaces()


@pytest.mark.kernels
def test_plan_keeps_no_input_or_output_alive(seed):
    """Recorded launches hold the weight's tensors only: a layer's input and output (hundreds of MB at video
    sizes) must be freed when the model drops them, after the recording call and after replays."""
    k, n = 64, 40
    q, scale, _ = _weight(n, k)
    plan = direct.LinearPlan(q, scale, None, backend=HOPPER)
    for m in (3, 3, 40, 40):  # record and replay, generic kernel and TMA kernel
        x = torch.randn(m, k, device=DEV)
        y = plan(x)
        storages = {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
        for replay in plan.replays.values():
            for rec, template, _, descs in replay.launches:
                held = [a for a in (*rec.args, *template) if isinstance(a, torch.Tensor)]
                held += [d.base for d, _ in descs if d.base is not None]
                assert not storages & {t.untyped_storage().data_ptr() for t in held}, m
        refs = (weakref.ref(x), weakref.ref(y))
        del x, y
        gc.collect()
        assert [r() for r in refs] == [None, None], m


@pytest.mark.kernels
def test_inputs_the_plan_declines_or_does_not_replay(seed):
    k, n = 64, 24
    q, scale, _ = _weight(n, k)
    plan = direct.LinearPlan(q, scale, None, backend=HOPPER)
    assert plan(torch.randn(3, k + 16, device=DEV)) is None  # another K
    assert plan(torch.randint(0, 5, (3, k), device=DEV)) is None  # not a float input
    assert plan(torch.randn(3, k, device="meta")) is None  # another device
    # rows that are not a view (reshape would copy): the launch path, not recorded
    x = torch.randn(6, k, 4, device=DEV).transpose(1, 2)[:, ::2]
    for _ in range(2):
        _assert_equal(plan(x), triton_ops.int8_linear(x, q, scale, None, torch.float32, None, 0, HOPPER))
    assert plan.replays[(torch.float32, x.shape, x.stride(), x.data_ptr() % 16 == 0)] is None
    # an unaligned input gets its own specialization (Triton specializes pointers on 16-byte alignment)
    base = torch.randn(5 * k + 1, device=DEV)
    x_odd = base[1:].view(5, k)
    _assert_equal(plan(x_odd), triton_ops.int8_linear(x_odd, q, scale, None, torch.float32, None, 0, HOPPER))
    assert (torch.float32, x_odd.shape, x_odd.stride(), False) in plan.replays


@pytest.mark.unit
def test_plan_checks_the_weight_once(seed):
    q, scale, _ = _weight(8, 32)
    with pytest.raises(ValueError, match="scale: expected shape"):
        direct.LinearPlan(q, scale[:4], None)
    with pytest.raises(ValueError, match="bias: expected shape"):
        direct.LinearPlan(q, scale, torch.zeros(9, device=DEV))
    with pytest.raises(ValueError, match="rotate_group"):
        direct.LinearPlan(q, scale, None, rotate_group=64)  # does not divide K = 32
    with pytest.raises(ValueError, match="q: expected dtype int8"):
        direct.LinearPlan(q.float(), scale, None)


@pytest.mark.kernels
def test_replay_failure_falls_back_to_the_launch_path(seed, caplog):
    k, n = 64, 24
    q, scale, _ = _weight(n, k)
    plan = direct.LinearPlan(q, scale, None, backend=HOPPER)
    x = torch.randn(5, k, device=DEV)
    plan(x)
    key = next(iter(plan.replays))

    class Rejected:  # what a Triton whose launcher takes other arguments does
        def __call__(self, x):
            raise TypeError("launch() takes 12 positional arguments")

    plan.replays[key] = Rejected()
    _assert_equal(plan(x), triton_ops.int8_linear(x, q, scale, None, torch.float32, None, 0, HOPPER))
    assert plan.replays[key] is None and "replaying recorded launches failed" in caplog.text


@pytest.mark.kernels
def test_launches_aliasing_per_call_buffers_are_not_replayed(seed):
    """A launch argument that views this call's buffers at an offset cannot be mapped to the next call's."""
    from int8_w8a8.kernels import launch

    x = torch.randn(4, 32, device=DEV)
    xq, xs = torch.empty(4, 32, dtype=torch.int8, device=DEV), torch.empty(4, device=DEV)
    out = torch.empty(4, 8, device=DEV)
    ok = launch.Launch(launch.FastLauncher(None, True), (1,), (x, xq, xs, out, 7), {}, None, None)
    assert direct._classify([ok], x, xq, xs, out)[0][2] == ((0, direct._X), (1, direct._XQ), (2, direct._XS),
                                                            (3, direct._OUT))
    shifted = launch.Launch(launch.FastLauncher(None, True), (1,), (x, xq[1:]), {}, None, None)
    assert direct._classify([shifted], x, xq, xs, out) is None


@pytest.mark.gpu
def test_cuda_graph_capture_takes_the_launch_path(seed):
    """Captured replays would bake in the shared workspace's address; under capture the plan launches normally
    (buffers from the graph's pool) and the graph replays correct results."""
    from int8_w8a8.kernels.dispatch import choose_backend

    k, n = 256, 96
    q, scale, _ = _weight(n, k)
    plan = direct.LinearPlan(q, scale, None)
    x = torch.randn(40, k, device="cuda")
    plan(x), plan(x)  # recorded, replayed
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        plan(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = plan(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    _assert_equal(y, triton_ops.int8_linear(x, q, scale, None, torch.float32, None, 0, choose_backend(x.device)))


@pytest.mark.unit
def test_torch_twin_backend_runs_without_replay(seed):
    k, n = 48, 16
    q, scale, _ = _weight(n, k)
    q, scale = q.cpu(), scale.cpu()
    bias = torch.randn(n, dtype=torch.bfloat16)
    plan = direct.LinearPlan(q, scale, bias)  # the CPU: the torch twin
    x = torch.randn(2, 3, k, dtype=torch.bfloat16)
    for _ in range(2):
        assert torch.equal(plan(x), ref.int8_linear(x, q, scale, bias, out_dtype=torch.bfloat16))
    assert list(plan.replays.values()) == [None]


# ---------------------------------------------------------------------------------------------------- ComfyUI
def _layer(k: int = 64, n: int = 48, bias: bool = True):
    """One Int8Linear as the pack's loader builds it (INT8 weight, BF16 bias), resident where the test runs."""
    from int8_w8a8.ops import layout
    from int8_w8a8.ops.comfy_ops import make_operations
    from int8_w8a8.ops.config import ConvertOptions, LoadConfig

    ops = make_operations(LoadConfig(profile=None, convert=ConvertOptions(), source="test"))
    layer = ops.Linear(k, n, bias=bias, device=DEV, dtype=torch.bfloat16)
    q, scale, _ = _weight(n, k)
    layer.weight = torch.nn.Parameter(layout.make_weight(q, scale, torch.bfloat16), requires_grad=False)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n, device=DEV, dtype=torch.bfloat16), requires_grad=False)
    return layer


def _plan_of(layer):
    from int8_w8a8.ops import comfy_ops

    entry = comfy_ops._PLANS.get(id(layer.weight))
    return entry[2] if entry is not None and entry[0]() is layer.weight else None


@pytest.mark.integration
def test_resident_layer_takes_the_plan_and_matches_the_cast_path(seed, cast_calls):
    layer = _layer()
    x = torch.randn(2, 5, 64, device=DEV, dtype=torch.bfloat16)
    with torch.inference_mode():
        y = layer(x)
        assert cast_calls == [] and _plan_of(layer) is not None
        y_cast = layer._forward_cast(x)
    assert cast_calls == [layer]
    assert torch.equal(y, y_cast)


@pytest.mark.integration
@pytest.mark.parametrize("state", ["comfy_cast_weights", "weight_function", "bias_function", "force_cast"])
def test_offloaded_or_patched_layers_take_the_cast_path(seed, cast_calls, state):
    """What ComfyUI sets on a layer it offloads (lowvram: comfy_cast_weights), patches on the fly (lowvram LoRA:
    weight_function) or forces to cast: ComfyUI's cast path, with the patch applied."""
    layer = _layer()
    x = torch.randn(3, 64, device=DEV, dtype=torch.bfloat16)
    y0 = layer(x)
    if state == "comfy_cast_weights":
        layer.comfy_cast_weights = True
    elif state == "weight_function":
        layer.weight_function = [lambda w: w * 2]
    elif state == "bias_function":
        layer.bias_function = [lambda b: b + 1]
    else:
        layer.comfy_force_cast_weights = True
    y = layer(x)
    assert cast_calls == [layer]
    if state == "weight_function":  # dequantized, doubled, float matmul
        assert torch.allclose(y.float(), 2 * (y0.float() - layer.bias.float()) + layer.bias.float(), atol=0.1)
    elif state == "bias_function":
        assert torch.allclose(y.float(), y0.float() + 1, atol=0.05)
    elif state == "force_cast":  # dequantized weight, float matmul
        assert torch.allclose(y.float(), y0.float(), atol=0.05)
    else:  # cast to the device as it is, INT8 kernel
        assert torch.equal(y, y0)


@pytest.mark.integration
def test_dynamic_lora_term_skips_the_cast_but_not_the_term(seed, cast_calls):
    from int8_w8a8.ops.lowrank import LowRank

    layer = _layer()
    x = torch.randn(4, 64, device=DEV, dtype=torch.bfloat16)
    y0 = layer(x)
    layer.int8_lora = LowRank((torch.randn(16, 64, device=DEV) * 0.1).to(torch.bfloat16),
                              (torch.randn(48, 16, device=DEV) * 0.1).to(torch.bfloat16))
    y = layer(x)
    y_cast = layer._forward_cast(x)
    assert cast_calls == [layer]  # only the explicit cast-path call
    assert torch.equal(y, y_cast) and not torch.equal(y, y0)


@pytest.mark.integration
def test_other_inputs_take_the_cast_path(seed, cast_calls):
    from int8_w8a8.ops import layout

    layer = _layer(bias=False)
    x = torch.randn(3, 64, device=DEV, dtype=torch.bfloat16)
    qx = layout.QuantizedTensor.from_float(x, "TensorWiseINT8Layout")  # an activation ComfyUI quantized
    y = layer(qx)
    assert cast_calls == [layer] and y.shape == (3, 48)


@pytest.mark.integration
def test_plan_follows_the_weight_object(seed, cast_calls):
    """A new weight object (a LoRA merge through ComfyUI's set_weight, unpatching, .to()) gets a new plan; the
    old plan, and the device tensors it holds, go with the old weight."""
    layer = _layer()
    x = torch.randn(3, 64, device=DEV, dtype=torch.bfloat16)
    y0 = layer(x)
    first = _plan_of(layer)
    old = layer.weight
    merged = old.dequantize().float() * 1.5
    layer.set_weight(merged)  # what ComfyUI's patcher calls after adding a LoRA in float
    y1 = layer(x)
    assert _plan_of(layer) is not first and torch.allclose(y1.float(), 1.5 * y0.float() - 0.5 * layer.bias.float(),
                                                           rtol=0.05, atol=0.05)
    from int8_w8a8.ops import comfy_ops

    key = id(old)
    assert key in comfy_ops._PLANS
    del old, first
    gc.collect()
    assert key not in comfy_ops._PLANS or comfy_ops._PLANS[key][0]() is not None
    layer.bias = torch.nn.Parameter(layer.bias + 1, requires_grad=False)  # a patched bias: a new plan too
    assert torch.allclose(layer(x).float(), y1.float() + 1, atol=0.05)
    assert cast_calls == []


@pytest.mark.integration
def test_compile_after_eager_runs_stays_one_graph(seed):
    """Eager calls leave plans behind; torch.compile then traces the cast path into one graph (custom ops)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    layer = _layer()
    x = torch.randn(2, 7, 64, device=DEV, dtype=torch.bfloat16)
    y = layer(x)
    assert _plan_of(layer) is not None
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    y_compiled = compiled(x)
    assert backend.frame_count == 1
    assert torch.equal(y_compiled, y)
    torch._dynamo.reset()


@pytest.mark.integration
def test_model_step_in_every_memory_mode(flux2, tmp_path, cast_calls):
    """A whole tiny FLUX.2: fully loaded (resident plans, no casts), then lowvram (every layer cast), same output."""
    import comfy.model_management

    from int8_w8a8.ops import loader

    from .tiny_flux2 import QUANTIZED, forward, write

    patcher = loader.load_file(write(tmp_path, "bf16.safetensors", flux2["sd"]),
                               loader.LoadOptions(fused_blocks=False))
    from int8_w8a8.ops import layout

    def int8_casts():
        return [m for m in cast_calls if layout.is_int8_weight(getattr(m, "weight", None))]

    inputs = tuple(i.to(DEV) for i in flux2["inputs"])  # where the model runs (CPU inputs would pull every layer
    # through ComfyUI's cast path to the CPU)
    comfy.model_management.load_models_gpu([patcher])
    y_full = forward(patcher, inputs)
    # on failure: why each layer took the cast path (the flags ComfyUI set on it, where its weight is)
    why = [(type(m).__name__, m.comfy_cast_weights, m.comfy_force_cast_weights, bool(m.weight_function),
            bool(m.bias_function), str(m.weight.device)) for m in int8_casts()]
    assert why == [], f"{patcher.model.model_loaded_weight_memory=} {patcher.model.lowvram_patch_counter=}"
    comfy.model_management.unload_all_models()
    patcher.patch_model(device_to=torch.device(DEV), lowvram_model_memory=1)
    y_lowvram = forward(patcher, inputs)
    assert len(int8_casts()) >= QUANTIZED
    patcher.unpatch_model()
    assert torch.equal(y_full, y_lowvram)


# ------------------------------------------------------------------------------ Triton's C launcher, called directly
def _fake_kernel(launch_fn, scratch: int = 0):
    """What ``launch._CLaunch`` reads of a compiled Triton 3.6 kernel, around a stand-in launcher."""
    from types import SimpleNamespace

    run = SimpleNamespace(launch=launch_fn, launch_cooperative_grid=False, launch_pdl=False, num_ctas=1)
    meta = SimpleNamespace(global_scratch_size=scratch, profile_scratch_size=0)
    return SimpleNamespace(_run=run, metadata=meta, function=1234, packed_metadata=(4, 1, 0))


class _Recorder:
    """Stands in for the compiled ``__triton_launcher.launch``: records its arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append(args)


def _addresses(args) -> list:
    return [a.data_ptr() if hasattr(a, "data_ptr") else a for a in args]


@pytest.mark.unit
@pytest.mark.parametrize("with_meta", [False, True], ids=["decomposed", "tma-map"])
def test_c_launch_passes_what_tritons_launcher_passes(with_meta, monkeypatch):
    """``_CLaunch`` hands the C launcher exactly the arguments Triton's descriptor wrapper would (descriptors expanded
    in place, the rest as given), expands each descriptor once per base address, and keeps no tensor."""
    driver = pytest.importorskip("triton.backends.nvidia.driver")
    from triton.tools.tensor_descriptor import TensorDescriptor

    from int8_w8a8.kernels import launch

    expansions = []
    if with_meta:  # the TMA-map form needs the CUDA driver: a stand-in encoder with the same output layout
        def fake_expand(arg, meta):
            expansions.append(arg.base.data_ptr())
            return [("map", arg.base.data_ptr(), meta["block_size"]), *arg.shape, *arg.strides]
    else:
        real = driver.make_tensordesc_arg

        def fake_expand(arg, meta):
            expansions.append(arg.base.data_ptr())
            return real(arg, meta)
    monkeypatch.setattr(driver, "make_tensordesc_arg", fake_expand)
    signature = {"a": "*i8", "d1": "tensordesc<i8[16, 32]>", "n": "i32", "d2": "tensordesc<bf16[16, 16]>",
                 "BLOCK": "constexpr"}
    metas = [{"block_size": [16, 32]}, {"block_size": [16, 16]}] if with_meta else None
    rec = _Recorder()
    kernel = _fake_kernel(driver.wrap_handle_tensordesc(rec, signature, metas))
    claunch = launch._CLaunch.for_kernel(kernel)
    assert claunch is not None and claunch.fn is rec
    w, out = torch.zeros(64, 32, dtype=torch.int8), torch.zeros(64, 16, dtype=torch.bfloat16)
    d1, d2 = TensorDescriptor.from_tensor(w, [16, 32]), TensorDescriptor.from_tensor(out, [16, 16])
    head = (1234, False, False, None, None, (4, 1, 0), None, None, None)
    for b1, b2 in [(4096, 8192), (4096, 8192), (4096, 12288)]:
        d1.base, d2.base = direct._Address(b1), direct._Address(b2)
        args = [777, d1, 64, d2, 32]
        kernel._run.launch(2, 3, 1, 5, *head, *args)  # Triton's own path
        claunch((2, 3, 1), 5, list(args))
        theirs, ours = rec.calls[-2], rec.calls[-1]
        assert _addresses(ours) == _addresses(theirs)
        assert not any(isinstance(a, (torch.Tensor, direct._Address)) for a in ours)
    # Triton's path expands both descriptors on each of its 3 calls; ours once per new base address: 2 + 1
    assert len(expansions) == 3 * 2 + 3
    # a shared recording cycling through the weights of 60 layers (a fused GEMM's replay table) expands each once
    expansions.clear()
    for _ in range(3):
        for layer in range(60):
            d1.base = direct._Address((1 << 20) + layer * 4096)
            claunch((2, 3, 1), 5, [777, d1, 64, d2, 32])
    assert len(expansions) == 60


@pytest.mark.unit
def test_c_launch_declines_layouts_it_does_not_know():
    from int8_w8a8.kernels import launch

    assert launch._CLaunch.for_kernel(_fake_kernel(_Recorder())) is not None  # no descriptors: the C launcher as is

    def python_layer(*args):  # a Python wrapper of another shape
        return None

    assert launch._CLaunch.for_kernel(_fake_kernel(python_layer)) is None
    outer = 3

    def inner(*args):  # a closure with other free variables
        return outer

    assert launch._CLaunch.for_kernel(_fake_kernel(inner)) is None
    profiled = _fake_kernel(_Recorder())
    profiled.metadata.profile_scratch_size = 64  # Triton's profiler scratch: its own allocator, kept on its path
    assert launch._CLaunch.for_kernel(profiled) is None


@pytest.mark.unit
def test_c_launch_allocates_global_scratch_per_launch():
    """A kernel that makes its TMA descriptors itself (global scratch, the warp-specialized GEMM) keeps the C launcher:
    each launch gets ``grid * global_scratch_size`` fresh bytes in the launcher's scratch slot, as Triton's allocator
    would give, and nothing else of the head changes."""
    from int8_w8a8.kernels import launch

    rec = _Recorder()
    claunch = launch._CLaunch.for_kernel(_fake_kernel(rec, scratch=384))
    assert claunch is not None and claunch.scratch == 384
    claunch((5, 3, 1), 7, [11, 22], device="cpu")
    claunch((2, 1, 1), 7, [11, 22], device="cpu")
    for call, programs in zip(rec.calls, (15, 2), strict=True):
        grid_stream, head, args = call[:4], call[4:13], call[13:]
        assert grid_stream[3] == 7 and list(args) == [11, 22]
        buf = head[3]
        assert isinstance(buf, torch.Tensor) and buf.dtype == torch.int8 and buf.numel() == programs * 384
        assert head[:3] == (1234, False, False) and head[4:] == (None, (4, 1, 0), None, None, None)
