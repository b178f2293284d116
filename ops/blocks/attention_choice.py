"""The fused blocks' attention: ComfyUI's or the pack's 8-bit one, by the load's choice and the rules (ComfyUI glue).

The loader's ``attention`` choice (``ops.config.ATTENTION_CHOICES``: "auto", "bf16", "8-bit") is written into the
patcher's transformer options under ``KEY`` when the fused blocks are installed (``set_choice``): it belongs to
that ModelPatcher and its clones, like the block replacements beside it, and reaches every block call through
the transformer options ComfyUI's samplers pass down. Every fused block calls ``attention`` on its rotated
``[B, H, S, D]`` q/k/v, and these rules decide, in order, for each call:

1. choice "bf16", or none (fused blocks installed without one) -> ComfyUI's attention;
2. an attention mask -> ComfyUI's (the fused blocks hand masked calls to ComfyUI's blocks before this);
3. another node set ``optimized_attention_override`` on the model -> ComfyUI's, which applies it;
4. a device where ``attention_8bit`` would run SDPA (no 8-bit implementation measured worth running there,
   ``kernels.attention`` rule 4) -> ComfyUI's, which is the user's backend;
5. choice "auto": ``kernels.attention.auto_8bit`` -> ComfyUI's unless the 8-bit implementation of that GPU
   generation is measured faster than SDPA and within the accuracy bound; where it is faster only from a number of
   keys on (the H200: from 8192, 1.03-1.24x; 0.91-0.97x below), calls with fewer keys -> ComfyUI's;
6. arguments ``attention_8bit`` does not take (``kernels.attention.attention_problem``: dtype other than
   bf16/fp16, head size not 64 or 128, q/k/v shapes) -> ComfyUI's;
7. otherwise ``kernels.attention_8bit`` (Triton on Hopper, the torch twin on the CPU).

Each outcome is logged once per choice and reason, in eager calls (logging in a traced function would break
the graph). Rules 4 and 5 depend on the device only and are constants to torch.compile (but for rule 5's key
count, compared with the call's); they come before the shape checks, so a model whose choice resolves to
ComfyUI's attention adds no shape guards. Models, blocks or
calls that run ComfyUI's own code (fallbacks of the fused blocks, architectures without them, Wan's
cross-attention) keep ComfyUI's attention whatever the choice.
"""

from __future__ import annotations

import functools
import logging

import comfy.ldm.modules.attention
import torch

from ... import kernels
from ...kernels import attention as attention_rules
from ..config import ATTENTION_CHOICES
from .log_once import log_once

logger = logging.getLogger(__name__)

KEY = "int8_w8a8_attention"  # transformer-options key of the load's choice
OVERRIDE_KEY = "optimized_attention_override"  # ComfyUI's per-model attention override (``wrap_attn``)
_LOGGED: set[tuple[str, str]] = set()  # (choice, outcome) already logged (once per process)


def set_choice(patcher, choice: str) -> None:
    """Record ``choice`` (one of ``ATTENTION_CHOICES``) in ``patcher``'s transformer options (per clone)."""
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention: expected one of {', '.join(ATTENTION_CHOICES)}, got {choice!r}")
    patcher.model_options.setdefault("transformer_options", {})[KEY] = choice


@torch.compiler.assume_constant_result
def _device_rule(choice: str, device_type: str, index: int) -> str | None:
    """Rules 4 and 5 for a device: why ComfyUI's attention runs there, or None for 8-bit (a constant to
    torch.compile; cached: eager calls pay ~1 us for it, not the ~15 us of the rules)."""
    return _device_rule_cached(choice, device_type, index)


def reset() -> None:
    """Forget the cached device rules and the kernels' decisions (tests that change the environment)."""
    _device_rule_cached.cache_clear()
    _auto_min_keys_cached.cache_clear()
    attention_rules.reset()


@torch.compiler.assume_constant_result
def _auto_min_keys(choice: str, device_type: str, index: int) -> int:
    """Rule 5's key count for a device: "auto" runs 8-bit only for calls with at least this many keys (0: all)."""
    return _auto_min_keys_cached(choice, device_type, index)


def _device(device_type: str, index: int) -> torch.device:
    """The device of the cached rules' (type, index) key (index -1: none given)."""
    return torch.device(device_type, index) if index >= 0 else torch.device(device_type)


@functools.cache
def _auto_min_keys_cached(choice: str, device_type: str, index: int) -> int:
    return attention_rules.auto_8bit(_device(device_type, index)).min_keys if choice == "auto" else 0


@functools.cache
def _device_rule_cached(choice: str, device_type: str, index: int) -> str | None:
    device = _device(device_type, index)
    backend = attention_rules.choose_attention(device)
    if backend.name == "sdpa":
        return f"no 8-bit attention on {device} ({backend.reason})"
    if choice == "auto":
        auto = attention_rules.auto_8bit(device)
        if not auto.eight_bit:
            return f"auto: {auto.reason}"
    return None


def why_not_8bit(choice: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, options: dict) -> str | None:
    """Why this call runs ComfyUI's attention under ``choice`` (rules 1-6 above), or None for 8-bit."""
    if choice == "bf16":
        return "bf16 chosen"
    if choice not in ATTENTION_CHOICES:
        return f"unknown choice {choice!r} (expected one of {', '.join(ATTENTION_CHOICES)})"
    if mask is not None:
        return "attention mask present"
    if OVERRIDE_KEY in options:
        return "another node overrides ComfyUI's attention on this model"
    index = -1 if q.device.index is None else q.device.index
    why = _device_rule(choice, q.device.type, index)
    if why is not None:
        return why
    min_keys = _auto_min_keys(choice, q.device.type, index)
    if min_keys and k.shape[2] < min_keys:  # the reason names no length: logged once, not once per length
        return f"auto: 8-bit from {min_keys} keys on this GPU (measured slower than ComfyUI's below)"
    return attention_rules.attention_problem(q, k, v)


def describe_choice(choice: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """What the fused blocks' attention will be for a model that runs on ``device`` in ``dtype``, in words for the
    loader's report, from the rules that need no call (4 and 5, and rule 6's dtype); None for "bf16" (ComfyUI's, as
    chosen). So a user who picked "8-bit" sees on the node, not only in the log, where it cannot run."""
    if choice == "bf16":
        return None
    index = -1 if device.index is None else device.index
    why = _device_rule(choice, device.type, index)
    if why is None and dtype not in attention_rules.SUPPORTED_DTYPES:  # rule 6's dtype check, before any call
        why = f"the model computes in {str(dtype).replace('torch.', '')} there; 8-bit attention takes bf16 or fp16"
    if why is not None:
        return f"attention ({choice} chosen): ComfyUI's on {device}: {why.removeprefix('auto: ')}"
    min_keys = _auto_min_keys(choice, device.type, index)
    if min_keys:
        return (f"attention ({choice} chosen): 8-bit on {device} for calls with at least {min_keys} keys, ComfyUI's "
                "for shorter ones (measured slower there)")
    return f"attention ({choice} chosen): 8-bit on {device} (calls it cannot take run ComfyUI's, logged once)"


def _log_once(choice: str, outcome: str) -> None:
    log_once(logger, _LOGGED, (choice, outcome), "int8_w8a8: fused blocks' attention (%s chosen): %s", choice, outcome)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, transformer_options: dict,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a fused block: q ``[B, H, S_q, D]``, k/v ``[B, H, S_kv, D]`` (already normed and rotated; the
    blocks pass views of ``[B, S, H, D]`` buffers), bf16/fp16/fp32; returns ``[B, S_q, H * D]`` in q's dtype.

    ComfyUI's ``optimized_attention`` or ``kernels.attention_8bit`` by the rules of this module. Both write their
    output in q's layout, so for q a view of a ``[B, S, H, D]`` buffer the result is a view, not a copy.
    """
    choice = transformer_options.get(KEY, "bf16")
    why = why_not_8bit(choice, q, k, v, mask, transformer_options)
    if why is not None:
        _log_once(choice, "ComfyUI's attention" if choice == "bf16" else f"ComfyUI's attention: {why}")
        return comfy.ldm.modules.attention.optimized_attention(q, k, v, heads, mask=mask, skip_reshape=True,
                                                               transformer_options=transformer_options)
    _log_once(choice, "8-bit attention")
    b, h, s, d = q.shape
    return kernels.attention_8bit(q, k, v).transpose(1, 2).reshape(b, s, h * d)
