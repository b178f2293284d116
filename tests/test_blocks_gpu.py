"""GPU tier: every architecture's fused blocks at the real widths, against ComfyUI's blocks and float64.

Per architecture (FLUX.2 klein 9B, Chroma1-HD, Qwen-Image, Z-Image Turbo, Wan 2.1 14B; widths and heads from
``bench/arch_models.py``, the table the step benchmarks use) ComfyUI's own model class is built at the real
hidden width, heads and MLP width with only one or two blocks (ComfyUI's detection counts the blocks from the
keys, so the file of a shallower model is detected like the real one: ``arch_models.check_detection``), random
BF16 weights made on the GPU, loaded through the pack's loader with and without the fused blocks. One step at
1024 image tokens and 154 text tokens (Wan: a 4-frame 32x32 latent, 1024 tokens):

- the fused blocks against ComfyUI's blocks on the same INT8 weights and both against the float64 twin
  (ComfyUI's class in float64 with the INT8 weights dequantized, run on the GPU), with the CPU tests' bounds,
  and the fused kernels counted (every block fused, none in ComfyUI's);
- a dynamic rank-16 LoRA on every block linear through the fused blocks (``lora/dynamic.py``) against the BF16
  model with the same LoRA file applied by ComfyUI's own LoRA code: the blocks stay fused, the LoRA costs no
  more fidelity than the INT8 model has without it, and the fused path is as close as ComfyUI's blocks with
  the same dynamic LoRA.

Each test stays under 40 GiB of GPU memory (asserted); ``bash bench/run_on_gpu.sh tests-blocks`` runs the module
with the other block tests. Without a GPU the module skips; ``INT8_W8A8_BLOCKS_CPU_SMOKE=1`` runs the same code
on the CPU at the table's tiny widths and a few tokens (the Triton kernels interpreted), bounds included, so
the GPU run only has to confirm the numbers.
"""

from __future__ import annotations

import contextlib
import gc
import os
import types
from dataclasses import dataclass, field

import pytest
import torch

from . import blocks_util as bu
from .conftest import HAS_CUDA, sqnr_db

SMOKE = os.environ.get("INT8_W8A8_BLOCKS_CPU_SMOKE", "0") not in ("", "0")
# the fused blocks take the SwiGLU GEMM (kernels.fused.glu_gemm_rule): opted in (INT8_W8A8_GLU_GEMM=1, as
# `run_on_gpu.sh glu` runs these tests) on an SM 9.x GPU whose table has the Gluon row
GLU_GEMM = (HAS_CUDA and not SMOKE and torch.cuda.get_device_capability()[0] == 9
            and os.environ.get("INT8_W8A8_GLU_GEMM", "0") not in ("", "0"))
DEVICE = "cuda" if HAS_CUDA else "cpu"
TEXT_TOKENS = 7 if SMOKE else 154  # 154: not a multiple of any tile, padded to 160 by Z-Image
PEAK_GIB = 40  # per test, so that `pytest -n 12` fits the H200's 139 GiB
LORA_RANK = 16

pytestmark = [
    pytest.mark.integration,
    *([] if SMOKE else [pytest.mark.gpu]),
    pytest.mark.skipif(not (HAS_CUDA or SMOKE), reason="GPU tier at real widths: needs a CUDA GPU "
                       "(INT8_W8A8_BLOCKS_CPU_SMOKE=1 runs the same code at tiny widths on the CPU)"),
]


@dataclass(frozen=True)
class Case:
    """One architecture of ``arch_models.ARCHS`` at reduced depth.

    depth: unet-config overrides (1-2 blocks; widths stay the table's).
    latent / smoke_latent: one sample's latent without the batch dim: 1024 image tokens at the real widths,
        32-64 in the CPU smoke run.
    blocks: name prefixes of the fused blocks' linears (the LoRA's layers).
    calls: fused-kernel calls of one step at this depth and Int8Linear calls on rows quantized before them
        (``run_quantized``), from the per-block counts of the CPU tests (tests/test_blocks_*.py); ``glu_calls``
        those where the SwiGLU GEMM runs (Hopper's Gluon row, rows above its 1024-row bucket, no LoRA term:
        ``kernels.fused.glu_gemm_rule``), None where it is the same.
    kwargs: the forward's extra arguments: ``guidance`` (Chroma), ``num_tokens`` (Z-Image).
    """

    depth: dict
    latent: tuple[int, ...]
    smoke_latent: tuple[int, ...]
    blocks: tuple[str, ...]
    calls: dict[str, int]
    kwargs: tuple[str, ...] = field(default=())
    glu_calls: dict[str, int] | None = None

    def want(self, lora: bool = False) -> dict[str, int]:
        """The calls of one step here: ``glu_calls`` where the SwiGLU GEMM runs and no LoRA term keeps two GEMMs."""
        return self.glu_calls if self.glu_calls is not None and GLU_GEMM and not lora else self.calls


def _flux_calls(activation: str, glu_gemm: bool = False) -> dict[str, int]:
    """One double block (2 streams x norm1/norm2, both MLPs) and one single block (pre_norm, its MLP); all 10
    INT8 linears of the two blocks run on rows a fused kernel quantized. ``glu_gemm``: the SwiGLU GEMM's form, where
    the single block's 1178 rows take ``split_glu_gemm`` (its linear1 not a ``run_quantized`` call; its
    ``glu_quantize`` the identity) and the double block's streams (1024 and 154 rows) keep the two-GEMM form."""
    calls = {"norm_modulate_quantize": 5, "glu_quantize": 3, f"glu_quantize:{activation}": 3, "qk_norm_rope": 3,
             "int8_gemm_residual": 5, "run_quantized": 10}
    if glu_gemm:
        calls.update({f"glu_quantize:{activation}": 2, "glu_quantize:identity": 1, "split_glu_gemm": 1,
                      "run_quantized": 9})
    return calls


def _times(per_block: dict[str, int], blocks: int) -> dict[str, int]:
    return {k: v * blocks for k, v in per_block.items()}


CASES: dict[str, Case] = {
    "klein9b": Case({"depth": 1, "depth_single_blocks": 1}, (128, 32, 32), (128, 8, 8),
                    ("double_blocks.", "single_blocks."), _flux_calls("swiglu"),
                    glu_calls=_flux_calls("swiglu", glu_gemm=True)),
    "chroma": Case({"depth": 1, "depth_single_blocks": 1}, (16, 64, 64), (16, 16, 16),
                   ("double_blocks.", "single_blocks."), _flux_calls("gelu_tanh"), ("guidance",)),
    # per block and stream: one modulated-norm quantization feeds q, k and v, one the MLP
    "qwen-image": Case({"num_layers": 2}, (16, 1, 64, 64), (16, 1, 16, 16), ("transformer_blocks.",),
                       _times({"norm_modulate_quantize": 4, "qk_norm_rope": 2, "glu_quantize": 2,
                               "glu_quantize:gelu_tanh": 2, "int8_gemm_residual": 4, "run_quantized": 12}, 2)),
    # per layer: the quantization for qkv, the attention's post-norm add with the (shared) w1/w3 quantization, SwiGLU
    # of the pair, the feed-forward's post-norm add
    "zimage": Case({"n_layers": 2}, (16, 64, 64), (16, 16, 16), ("layers.",),
                   _times({"norm_modulate_quantize": 1, "rms_norm_gate_add_quantize": 1, "qk_norm_rope": 1,
                           "glu_quantize": 1, "glu_quantize:swiglu": 1, "rms_norm_gate_add": 1, "run_quantized": 5},
                          2),
                   ("num_tokens",),
                   # w1 and w3 (1184 rows) as one glu_gemm, its h quantized by quantize_rows (not counted)
                   _times({"norm_modulate_quantize": 1, "rms_norm_gate_add_quantize": 1, "qk_norm_rope": 1,
                           "glu_gemm": 1, "rms_norm_gate_add": 1, "run_quantized": 3}, 2)),
    # per block: one quantization for self-attention's q/k/v, one for cross-attention's q (norm3 fused), one for the
    # FFN; cross-attention's k/v (text tokens) are ComfyUI's layers
    "wan14b": Case({"num_layers": 2}, (16, 4, 32, 32), (16, 2, 8, 8), ("blocks.",),
                   _times({"norm_modulate_quantize": 3, "qk_norm_rope": 1, "glu_quantize": 1,
                           "glu_quantize:gelu_tanh": 1, "int8_gemm_residual": 3, "run_quantized": 8}, 2)),
}


def inputs(key: str, seed: int = 7) -> tuple[tuple, dict]:
    """(x [1, *latent], timestep [1], context [1, TEXT_TOKENS, the text encoder's width]) and the kwargs."""
    from int8_w8a8.bench import arch_models

    case = CASES[key]
    gen = torch.Generator().manual_seed(seed)
    width = arch_models.ARCHS[key].step_shape(tiny=SMOKE).text[1]
    args = (torch.randn(1, *(case.smoke_latent if SMOKE else case.latent), generator=gen),
            torch.rand(1, generator=gen), torch.randn(1, TEXT_TOKENS, width, generator=gen))
    extra = {"guidance": torch.zeros(1), "num_tokens": TEXT_TOKENS}
    return args, {k: extra[k] for k in case.kwargs}


@contextlib.contextmanager
def detection(arch, sd: dict):
    """At the real widths ComfyUI's own detection (checked to build exactly ``sd``'s shapes); at the smoke
    run's tiny widths ``blocks_util.tiny_detection`` (the widths ComfyUI assumes for the real models read from
    the keys)."""
    from int8_w8a8.bench import arch_models

    if SMOKE:
        with bu.tiny_detection():
            yield
        return
    arch_models.check_detection(arch, sd)
    yield


def _free() -> None:
    """Unload every model and hand cached GPU memory back: the other test processes share the GPU."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    if HAS_CUDA:
        torch.cuda.empty_cache()


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request, comfyui):
    """One architecture at the real widths (tiny in the smoke run) and reduced depth: its random BF16 state
    dict (``sd``, on the GPU) and the pack's loads of it with (``fused``) and without (``plain``) fused blocks,
    inside ``detection`` for the fixture's scope."""
    from int8_w8a8.bench import arch_models

    arch, case = arch_models.ARCHS[request.param], CASES[request.param]
    sd = arch_models.random_state_dict(arch, tiny=SMOKE, device=DEVICE, seed=29, overrides=case.depth)
    with detection(arch, sd):
        fused, plain = (bu.load(sd, torch.bfloat16, fused_blocks=f) for f in (True, False))
        yield types.SimpleNamespace(key=request.param, arch=arch, case=case, sd=sd, fused=fused, plain=plain)
    del fused, plain, sd
    _free()


@pytest.fixture
def calls(monkeypatch):
    return bu.count_linear_calls(monkeypatch, bu.count_kernel_calls(monkeypatch), ("run_quantized",))


@pytest.fixture
def gpu_peak():
    """Resets the peak-memory counter; ``gpu_peak()`` asserts the test stayed under PEAK_GIB (GPU only)."""
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def check():
        if HAS_CUDA:
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"[gpu] peak {peak:.1f} GiB")
            assert peak < PEAK_GIB, f"the test took {peak:.1f} GiB of GPU memory (budget {PEAK_GIB} GiB per test)"

    return check


def test_fused_matches_comfyui_blocks_and_float64(model, calls, gpu_peak):
    """The fused blocks at the real widths: every block fused (the CPU tests' kernel counts), close to ComfyUI's
    blocks on the same INT8 weights, and at least as close as those to the float64 twin."""
    args, kwargs = inputs(model.key)
    comfy = bu.run(model.plain, args, kwargs)
    assert not calls, calls  # ComfyUI's blocks: no fused kernel, every INT8 layer quantizes its own input
    fused = bu.run(model.fused, args, kwargs)
    assert calls == model.case.want()
    assert bool(fused.isfinite().all())
    s = sqnr_db(comfy, fused)
    print(f"[{model.arch.title}] fused vs ComfyUI's blocks {s:.2f} dB, output {tuple(fused.shape)}")
    assert s > 30  # the same INT8 model, intermediates rounded differently
    truth = bu.float64_truth(model.fused, bu.comfy_class(model.fused), args, kwargs, device=model.fused.load_device)
    _free()  # the float64 twin's cached memory
    bu.check_against_float64(fused, comfy, truth, 25)
    gpu_peak()


def test_dynamic_lora_stays_fused_and_matches_bf16_lora(model, calls, gpu_peak, tmp_path, monkeypatch):
    """A dynamic rank-16 LoRA on every block linear: the same kernel calls as without it; against the BF16 model
    with the same LoRA file applied by ComfyUI, the fused model loses at most 1 dB of what it has without the
    LoRA against BF16, is as close as ComfyUI's blocks with the same dynamic LoRA, and the LoRA is there (the
    fused model without it is 10 dB further)."""
    args, kwargs = inputs(model.key)
    bf16 = bu.load_bf16(model.sd)
    ref = bu.run(bf16, args, kwargs)
    without = bu.run(model.fused, args, kwargs)
    assert calls == model.case.want()
    calls.clear()
    dyn, dyn_plain = bu.dynamic_lora([model.fused, model.plain], model.sd, model.case.blocks, tmp_path, monkeypatch,
                                     rank=LORA_RANK)
    y = bu.run(dyn, args, kwargs)
    assert calls == model.case.want(lora=True)  # still fused with the LoRA's terms (SwiGLU as two GEMMs)
    y_plain = bu.run(dyn_plain, args, kwargs)
    ref_lora = bu.run(bu.comfy_lora(bf16, tmp_path / bu.DYNAMIC_LORA), args, kwargs)
    del bf16, dyn, dyn_plain
    _free()
    s0, s, s_plain, s_without = (sqnr_db(ref, without), sqnr_db(ref_lora, y), sqnr_db(ref_lora, y_plain),
                                 sqnr_db(ref_lora, without))
    print(f"[{model.arch.title}] vs BF16: fused {s0:.2f} dB; vs BF16 + LoRA: fused + dynamic LoRA {s:.2f} dB, "
          f"ComfyUI's blocks + dynamic LoRA {s_plain:.2f} dB, fused without the LoRA {s_without:.2f} dB")
    assert s > s0 - 1.0 and s > s_plain - 0.5 and s > s_without + 10, (s0, s, s_plain, s_without)
    gpu_peak()
