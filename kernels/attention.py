"""8-bit attention: ``attention_8bit(q, k, v, *, scale=None)``, the rules that pick its implementation, and
its ``int8_w8a8::attention_8bit`` custom op (opaque to torch.compile, with a fake for shapes).

Rules, in order, decided once per device and logged once:

1. Tensors not on a CUDA device -> the torch twin (``reference_attention``: the same quantization, float32).
2. A GPU generation in ``TRITON_ARCHS`` (Hopper, SM 9.0: wgmma) with Triton usable (``dispatch``'s rules:
   importable, not disabled by ``INT8_W8A8_DISABLE_TRITON``) -> where Triton's Gluon runs (``dispatch.gluon_error``;
   ``INT8_W8A8_DISABLE_GLUON`` turns it off) the warp-specialized Gluon kernel (``gluon_attention_ws``: the same
   quantization and the same bits as the Triton kernel, 1.06-1.09x faster on the H200), else the Triton kernel
   (``triton_attention``) with that generation's configuration (``attention_configs.BY_ARCH``).
3. comfy-kitchen's ``int8_attention`` where ``KITCHEN_SPEEDUP_VS_SDPA`` records it measured faster than
   SDPA on that generation and its custom op is loaded (``torch.ops.comfy_kitchen``; ComfyUI imports
   comfy-kitchen at startup). No generation is recorded faster today, so this rule picks nothing yet.
4. Otherwise PyTorch's ``scaled_dot_product_attention`` (BF16/FP16, unquantized): where nothing 8-bit is
   measured faster, the 8-bit call must not be slower than the attention it replaces.

Callers with masks, causal attention, other head sizes or dtypes use ComfyUI's attention (the model-level
rule lives with the fused blocks, ``ops/blocks/attention_choice.py``); a direct call with them raises ``ValueError``.

Whether a model's ``auto`` attention choice runs this function at all is data too: ``auto_8bit(device)`` picks
8-bit only where the implementation the rules above choose was measured faster than SDPA's default backend on
that GPU generation (quantization included, at every size measured, or from a measured number of keys on) and
within ``REL_ERROR_BOUND`` (``TRITON_MEASURED``, ``KITCHEN_SPEEDUP_VS_SDPA``/``KITCHEN_REL_ERROR``). Nothing is measured
faster at every size today: on the H200 the Gluon kernel (INT8 Q K^T, 16-bit P V) runs at 0.91x (S = 4608) to 1.24x
(S = 14040) cuDNN with its quantization pass (the Triton kernel 0.77x to 1.04x), faster from 8192 keys on, so
``auto`` runs it there for calls with at least 8192 keys (Wan's video, images from about 1400x1400) and keeps
ComfyUI's attention for shorter ones. Updating the tables after a GPU run changes ``auto``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os

import torch

from . import reference_attention
from .attention_configs import HEAD_DIMS, config_for
from .custom_op import custom_op
from .dispatch import DISABLE_ENV, triton_import_error

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)
MAX_HEADS = 65535  # (batch, head) pairs: the second dimension of the kernels' launch grid

# GPU generations (SM major, minor) that run the Triton kernel. It is written for Hopper's wgmma; on
# other generations Triton would lower the same dots to other instructions, unmeasured.
TRITON_ARCHS = frozenset({(9, 0)})
# comfy-kitchen 0.2.40 int8_attention relative to SDPA's default backend (SDPA time / kitchen time) on
# the generations where both were measured; used only where > 1. H200 (issue 14): 0.550 ms (cuDNN) vs
# 1.120 ms at B=1, H=32, S=4608, D=128, and 7.31 vs 10.91 ms at S=16896.
KITCHEN_SPEEDUP_VS_SDPA: dict[tuple[int, int], float] = {(9, 0): 0.550 / 1.120}
KITCHEN_REL_ERROR = 0.0167  # vs float64 at S = 4608 (issue 14); 0.0161-0.0165 in bench/results/h200-bench-attention.txt

# Issue 14's accuracy bound for 8-bit attention: relative error vs float64 attention on Gaussian inputs.
REL_ERROR_BOUND = 0.02


@dataclasses.dataclass(frozen=True)
class Measured:
    """One 8-bit implementation measured against SDPA's default backend on one GPU generation.

    speedup: SDPA time / 8-bit time (quantization of Q, K, V included), the lowest over the sizes measured;
    rel_error: relative error vs float64 attention, the largest over those sizes;
    min_keys, speedup_from: where it is slower at short sequences only, the lowest speed-up over the sizes with at
        least ``min_keys`` keys (0: no such rule).
    """

    speedup: float
    rel_error: float
    min_keys: int = 0
    speedup_from: float = 0.0


# The Triton kernel per (GPU generation, ``AttentionConfig.name``): only the configuration ``config_for`` picks
# for a generation counts; one without an entry is unmeasured (``auto`` keeps ComfyUI's attention). H200,
# torch 2.11, B=1, H = 24 and 32, S = 4608 and 16896, D = 128, the lowest speed-up and largest error over two
# runs (bench/results/h200-bench-attention.txt and h200-bench-attention-switches.txt; SDPA default = cuDNN:
# 0.40-0.52 ms at 4608, 5.56-7.48 ms at 16896).
TRITON_MEASURED: dict[tuple[tuple[int, int], str], Measured] = {
    ((9, 0), "int8-128x128-w8-s2"): Measured(0.46, 0.0165),
    ((9, 0), "int8-128x128-w8-s3"): Measured(0.49, 0.0165),
    ((9, 0), "int8-128x64-w8-s3"): Measured(0.39, 0.0158),
    ((9, 0), "int8-64x128-w4-s3"): Measured(0.60, 0.0165),
    # the default since session 20 (bench/NOTES.md item 68, h200-bench-attention-16bit-session20.txt), kernel + pass
    # (flushed single calls): 0.516 ms against cuDNN's 0.399 at H = 24, S = 4608 (0.77x, the lowest; 0.668 vs 0.512 at
    # H = 32), 0.98x at H = 32, S = 16896, 1.03x at H = 40, S = 14040 (Wan)
    ((9, 0), "16bit-64x128-w4-s2"): Measured(0.77, 0.0118),
    # the warp-specialized Gluon kernel on the same pass (what attention_8bit runs on Hopper since session 21;
    # bench/NOTES.md item 74, h200-bench-attention-gluon-ws-session21.txt), kernel + pass, flushed single calls:
    # 0.489 ms against cuDNN's 0.408 at H = 24, S = 4608 (0.835x, the lowest; 0.84x at H = 32), 1.05x at H = 32,
    # S = 16896, 1.12x at H = 40, S = 14040 (Wan)
    ((9, 0), "gluon-ws-128x128-s4-defer"): Measured(0.83, 0.0118),
    # the same with the two consumers issuing their products in turns (``pingpong``) and each row's max taken over
    # the int32 scores, the default since session 22 (bench/NOTES.md item 75), kernel + pass, flushed single calls
    # (h200-bench-attention-gluon-imax-session22.txt, h200-bench-attention-lengths-session22.txt): 0.92x cuDNN at
    # S = 4608 (H = 24 and 32: the lowest; kernel alone 1.11-1.13x), 0.95x at 6144, 0.99x / 1.02x at 8192 (H 24 / 32);
    # from 10240 keys on faster: 1.11x at 10240, 1.06x at 12288, 1.19x at 14040 (H = 24), 1.18x at H = 40, S = 14040
    # (Wan), 1.15x at H = 32, S = 16896, so auto runs it for calls with at least 10240 keys
    ((9, 0), "gluon-ws-128x128-s4-defer-pp"): Measured(0.91, 0.0118, min_keys=10240, speedup_from=1.06),
    # the same with each row's sum in 8 partial sums (``row_sum_parts``), the default since session 23 (bench/NOTES.md
    # item 78): kernel alone 3.0 % / 4.6 % faster than the entry above at Wan's shape / H = 32, S = 16896; kernel +
    # pass, flushed single calls (h200-bench-attention-lengths-session23.txt): 0.91x / 0.92x cuDNN at S = 4608 (H = 24
    # / 32, the lowest), 0.97x at 6144; from 8192 keys on faster: 1.03x / 1.07x at 8192 (H = 24 / 32), 1.07x at 10240,
    # 1.15x at 12288, 1.24x at H = 40, S = 14040 (Wan), so auto runs it for calls with at least 8192 keys
    ((9, 0), "gluon-ws-128x128-s4-defer-pp-rs8"): Measured(0.91, 0.0118, min_keys=8192, speedup_from=1.03),
    # the default before: the same int8 kernel with the split quantization pass. Session 18 (bench/NOTES.md item 64,
    # h200-bench-attention-pass-final-session18.txt), kernel + pass: 0.600 ms against cuDNN's 0.398 at H = 24, S = 4608
    # (0.66x, the lowest), 0.95x at H = 40, S = 14040 (Wan; 1.00x queued back to back), 0.94x at H = 32, S = 16896
    ((9, 0), "int8-64x128-w4-s3-qsplit"): Measured(0.66, 0.0165),
    ((9, 0), "int8-64x64-w4-s3"): Measured(0.54, 0.0158),
    ((9, 0), "fp8-128x128-w8-s2"): Measured(0.53, 0.0387),
    ((9, 0), "fp8-64x128-w4-s3"): Measured(0.74, 0.0387),
}


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """The decision for one device: ``name`` is "gluon", "triton", "kitchen", "sdpa" or "reference"."""

    name: str
    reason: str
    arch: tuple[int, int] | None = None


def _kitchen_op():
    """comfy-kitchen's ``int8_attention`` custom op when comfy-kitchen is loaded in this process (ComfyUI imports it
    at startup; ``kernels`` never imports ComfyUI or comfy-kitchen itself), else None."""
    try:
        return torch.ops.comfy_kitchen.int8_attention
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def _decide(device_type: str, index: int) -> AttentionBackend:
    if device_type != "cuda":
        return AttentionBackend("reference", f"tensors are on {device_type}: the torch twin (8-bit numerics, float32)")
    device = torch.device("cuda", index if index >= 0 else torch.cuda.current_device())
    arch = tuple(torch.cuda.get_device_capability(device))
    gen = f"SM {arch[0]}.{arch[1]}"
    why_not_triton = f"{gen} is not a generation the Triton kernel is written for ({sorted(TRITON_ARCHS)})"
    if torch.version.hip is not None:
        why_not_triton = "ROCm: the Triton kernel is written for NVIDIA wgmma"
    elif arch in TRITON_ARCHS:
        if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
            why_not_triton = f"{DISABLE_ENV} is set"
        elif (err := triton_import_error()) is not None:
            why_not_triton = err
        else:
            cfg = config_for(arch)
            triton = f"Triton INT8 QK / {cfg.pv} PV on wgmma ({cfg.name})"
            if (why_not_gluon := _gluon_error(cfg)) is None:
                return AttentionBackend("gluon", f"{gen}: {gluon_name()} (warp-specialized Gluon; the numbers of "
                                                 f"{triton})", arch)
            return AttentionBackend("triton", f"{gen}: {triton}; not the Gluon kernel: {why_not_gluon}", arch)
    speedup = KITCHEN_SPEEDUP_VS_SDPA.get(arch)
    if speedup is None:
        return AttentionBackend("sdpa", f"{why_not_triton}; comfy-kitchen int8_attention is unmeasured on {gen}", arch)
    if speedup <= 1.0:
        return AttentionBackend("sdpa", f"{why_not_triton}; comfy-kitchen int8_attention measured {speedup:.2f}x "
                                        f"SDPA on {gen}", arch)
    if _kitchen_op() is None:
        return AttentionBackend("sdpa", f"{why_not_triton}; comfy-kitchen int8_attention is not loaded", arch)
    return AttentionBackend("kitchen", f"{gen}: comfy-kitchen int8_attention ({speedup:.2f}x SDPA measured)", arch)


def _gluon_error(cfg) -> str | None:
    """None when the warp-specialized Gluon kernel can run the configuration ``cfg`` quantizes for, else why not."""
    from .dispatch import gluon_error

    if (err := gluon_error()) is not None:
        return err
    try:
        from . import gluon_attention_ws
    except Exception as exc:  # a Gluon without warp specialization: ImportError, AttributeError
        return f"Triton's Gluon cannot build it ({type(exc).__name__}: {exc})"
    if (cfg.pv, cfg.block_n, cfg.rotate) != ("16bit", gluon_attention_ws.DEFAULT.block_n, True):
        return f"it takes the 16-bit P V form at block_n {gluon_attention_ws.DEFAULT.block_n}, not {cfg.name}"
    return None


def gluon_name() -> str:
    """The Gluon kernel's configuration name (``gluon_attention_ws.DEFAULT``)."""
    from .gluon_attention_ws import DEFAULT as GLUON_DEFAULT

    return GLUON_DEFAULT.name


@functools.cache
def _log_once(backend: AttentionBackend, device: str) -> None:
    logger.info("int8_w8a8: 8-bit attention on %s: %s (%s)", device, backend.name, backend.reason)


def choose_attention(device: torch.device) -> AttentionBackend:
    """Apply the rules above to ``device``; the decision is logged the first time it is made."""
    backend = _decide(device.type, device.index if device.index is not None else -1)
    _log_once(backend, str(device))
    return backend


@dataclasses.dataclass(frozen=True)
class AutoDecision:
    """What ``auto`` does on one device: ``eight_bit`` True runs ``attention_8bit`` (for calls with at least
    ``min_keys`` keys: 0 for every call); ``reason`` says why, with the measured numbers."""

    eight_bit: bool
    reason: str
    min_keys: int = 0


def _kernel_config_name(backend: AttentionBackend) -> str:
    """The configuration name of the pack's kernel that ``backend`` ("triton" or "gluon") runs: its key in
    ``TRITON_MEASURED``."""
    return gluon_name() if backend.name == "gluon" else config_for(backend.arch).name


def measured(backend: AttentionBackend) -> Measured | None:
    """The measurement of the implementation ``backend`` runs on its generation, or None where there is none."""
    if backend.name in ("triton", "gluon"):
        return TRITON_MEASURED.get((backend.arch, _kernel_config_name(backend)))
    if backend.name == "kitchen" and backend.arch in KITCHEN_SPEEDUP_VS_SDPA:
        return Measured(KITCHEN_SPEEDUP_VS_SDPA[backend.arch], KITCHEN_REL_ERROR)
    return None


@functools.cache
def _auto(device_type: str, index: int) -> AutoDecision:
    backend = _decide(device_type, index)
    if backend.name == "reference":
        return AutoDecision(False, f"{backend.reason}, slower than SDPA (no GPU measured)")
    if backend.name == "sdpa":
        return AutoDecision(False, f"no 8-bit attention runs here ({backend.reason})")
    gen = f"SM {backend.arch[0]}.{backend.arch[1]}"
    impl = (f"{backend.name.capitalize()} {_kernel_config_name(backend)}" if backend.name in ("triton", "gluon")
            else "comfy-kitchen int8_attention")
    m = measured(backend)
    if m is None:
        return AutoDecision(False, f"{impl} is unmeasured on {gen}")
    numbers = f"{impl} measured {m.speedup:.2f}x SDPA, rel. error {m.rel_error:.4f} on {gen}"
    if m.rel_error > REL_ERROR_BOUND:
        return AutoDecision(False, f"{numbers}: over the {REL_ERROR_BOUND} accuracy bound")
    if m.speedup > 1.0:
        return AutoDecision(True, numbers)
    if m.min_keys and m.speedup_from > 1.0:
        return AutoDecision(True, f"{numbers}, {m.speedup_from:.2f}x from {m.min_keys} keys on: 8-bit for calls with "
                                  f"at least {m.min_keys} keys", m.min_keys)
    return AutoDecision(False, f"{numbers}: not faster")


def auto_8bit(device: torch.device) -> AutoDecision:
    """The ``auto`` rule for ``device``: 8-bit only where the implementation ``choose_attention`` picks is measured
    faster than SDPA's default backend on that generation and within ``REL_ERROR_BOUND`` (at every size, or from
    ``Measured.min_keys`` keys on: then only for such calls, ``AutoDecision.min_keys``). Cached per device; callers
    log it (the fused blocks: once per reason)."""
    return _auto(device.type, device.index if device.index is not None else -1)


def reset() -> None:
    """Forget cached decisions (tests that change the environment)."""
    _decide.cache_clear()
    _log_once.cache_clear()
    _auto.cache_clear()


def check_attention_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
    attn_mask: torch.Tensor | None = None, is_causal: bool = False,
) -> None:
    """Metadata checks of ``attention_8bit`` (also run on fake tensors while tracing); ValueError naming the
    argument and what is supported."""
    problem = attention_problem(q, k, v, scale, attn_mask, is_causal)
    if problem is not None:
        raise ValueError(problem)


def attention_problem(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
    attn_mask: torch.Tensor | None = None, is_causal: bool = False,
) -> str | None:
    """The first argument ``attention_8bit`` does not take, in words (the argument and what is supported), or
    None: the rule callers apply before choosing 8-bit attention (metadata only, so it traces)."""
    if attn_mask is not None:
        return ("attn_mask: 8-bit attention takes no mask (supported: attn_mask=None); masked attention "
                "should run ComfyUI's attention")
    if is_causal:
        return "is_causal: 8-bit attention is non-causal only (supported: is_causal=False)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return f"{name}: expected a torch.Tensor [B, H, S, D], got {type(t).__name__}"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name}: expected dtype bfloat16 or float16, got {str(t.dtype).replace('torch.', '')}"
        if t.dim() != 4:
            return f"{name}: expected 4 dimensions [B, H, S, D], got shape {list(t.shape)}"
        if t.device != q.device:
            return f"{name}: is on {t.device} but q is on {q.device}; move q, k, v to one device"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"k, v: expected q's dtype {q.dtype} for all three, got k {k.dtype}, v {v.dtype}"
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return f"q: head size D={d} is not supported (supported: {', '.join(map(str, HEAD_DIMS))})"
    if tuple(k.shape[:2]) != tuple(q.shape[:2]) or k.shape[-1] != d:
        return (f"k: expected [B, H, S_kv, D] = [{q.shape[0]}, {q.shape[1]}, S_kv, {d}] (q's B, H and D; "
                f"no grouped heads), got {list(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        return f"v: expected k's shape {list(k.shape)}, got {list(v.shape)}"
    if k.shape[2] == 0:
        return "k: S_kv = 0 keys; attention needs at least one key"
    if q.shape[0] * q.shape[1] > MAX_HEADS:
        return (f"q: B * H = {q.shape[0] * q.shape[1]} exceeds the {MAX_HEADS} (batch, head) pairs one "
                f"launch covers; split the batch")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        return f"scale: expected a finite float > 0 (default 1/sqrt(D)), got {scale!r}"
    return None


def attention_8bit(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
    attn_mask: torch.Tensor | None = None, is_causal: bool = False,
) -> torch.Tensor:
    """Non-causal attention ``softmax(q k^T * scale) v`` with 8-bit tensor-core products where measured faster.

    Args:
        q: ``[B, H, S_q, D]`` bfloat16/float16, any strides; D = 64 or 128.
        k, v: ``[B, H, S_kv, D]``, q's dtype and device; S_kv >= 1 (S_kv may differ from S_q).
        scale: softmax scale, finite and > 0; default ``1 / sqrt(D)``.
        attn_mask, is_causal: must be None / False (ValueError otherwise).

    Returns:
        ``[B, H, S_q, D]`` in q's dtype, with q's strides when q is dense (``torch.empty_like(q)``, every path and
        the fake): for q a ``[B, H, S, D]`` view of a ``[B, S, H, D]`` buffer (the fused blocks'),
        ``out.transpose(1, 2).reshape(B, S, H * D)`` is a view, not a copy. A row of q holding NaN/Inf gives a
        NaN row and leaves the others alone.
    """
    check_attention_args(q, k, v, scale, attn_mask, is_causal)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling():
        return torch.ops.int8_w8a8.attention_8bit(q, k, v, sm_scale)
    return attention_8bit_impl(q, k, v, sm_scale)


def _like_q(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``out`` with the strides of ``torch.empty_like(q)`` (what the fake promises), copied only if needed."""
    if out.stride() == torch.empty_like(q, device="meta").stride() and out.dtype == q.dtype:
        return out
    return torch.empty_like(q).copy_(out)


def attention_8bit_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """``attention_8bit`` after its checks (eager, and the body of the custom op)."""
    backend = choose_attention(q.device)
    if q.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        return torch.empty_like(q)
    if backend.name == "triton":
        from . import triton_attention

        return triton_attention.attention(q, k, v, sm_scale, config_for(backend.arch))
    if backend.name == "gluon":
        from . import gluon_attention_ws, triton_attention

        cfg = gluon_attention_ws.DEFAULT
        qa = triton_attention.quantize(q, k, v, cfg.quant_config())
        return gluon_attention_ws.launch(qa, sm_scale, torch.empty_like(q), cfg)
    if backend.name == "reference":
        return _like_q(reference_attention.attention_8bit(q, k, v, scale=sm_scale, config=config_for(None)), q)
    if backend.name == "kitchen":
        return _like_q(_kitchen_op()(q, k, v, sm_scale), q)
    return _like_q(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sm_scale), q)


@custom_op("int8_w8a8::attention_8bit", mutates_args=())
def attention_8bit_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return attention_8bit_impl(q, k, v, scale)


@attention_8bit_op.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q)
