"""Argument validation shared by the Triton kernels and their torch twins.

Every check raises ``ValueError`` naming the argument and what was expected, so a bad call fails
in Python with a readable message instead of inside a kernel. Shape and dtype checks read metadata
only and run in the public functions, also while torch.compile traces them. Value checks (finite,
positive scales; finite weights) need a host sync: they run in the implementations, which execute
at run time even inside a compiled graph, and for scales once per tensor version.
"""

from __future__ import annotations

import contextlib

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ROTATE_GROUPS = (0, 64, 128, 256)

# Attribute set on a scale/smooth tensor once its values passed the check, holding the tensor's
# version counter at that time. An in-place write bumps the version and forces a new check.
_CHECKED_ATTR = "_int8_w8a8_checked_version"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_float_input(x: torch.Tensor, name: str) -> None:
    """``x`` is a float16/bfloat16/float32 tensor with at least one dimension."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float16, bfloat16 or float32, got {_dtype_name(x.dtype)}")
    if x.dim() < 1:
        raise ValueError(f"{name}: expected at least 1 dimension [..., K], got a 0-d tensor")


def check_int8_weight(q: torch.Tensor, name: str = "q") -> tuple[int, int]:
    """``q`` is a 2-D int8 tensor [N, K]; returns (N, K)."""
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(q).__name__}")
    if q.dtype != torch.int8:
        raise ValueError(f"{name}: expected dtype int8, got {_dtype_name(q.dtype)}")
    if q.dim() != 2:
        raise ValueError(f"{name}: expected shape [N, K], got {list(q.shape)}")
    return q.shape[0], q.shape[1]


def check_scale(scale: torch.Tensor, n: int, name: str = "scale") -> bool:
    """``scale`` is float32 of shape [], [N] or [N, 1]; returns True when it is per-row."""
    if not isinstance(scale, torch.Tensor):
        raise ValueError(
            f"{name}: expected a float32 tensor of shape [], [{n}] or [{n}, 1], got {type(scale).__name__}"
        )
    if scale.dtype != torch.float32:
        raise ValueError(f"{name}: expected dtype float32, got {_dtype_name(scale.dtype)}")
    shape = tuple(scale.shape)
    if shape == ():
        return False
    if shape in ((n,), (n, 1)):
        return True
    raise ValueError(f"{name}: expected shape [] (per-tensor), [{n}] or [{n}, 1] (per-row), got {list(shape)}")


def check_positive_finite(t: torch.Tensor, name: str) -> None:
    """All values of ``t`` are finite and > 0. One host sync per tensor version."""
    if t.numel() == 0:
        return
    # inference tensors (made under torch.inference_mode, e.g. a LoRA merged on cast) have no version
    # counter: they are checked every time
    version = None if t.is_inference() else t._version
    if version is not None and getattr(t, _CHECKED_ATTR, None) == version:
        return
    ok = torch.isfinite(t) & (t > 0)
    if not bool(ok.all()):
        bad = (~ok).flatten().nonzero()[:5].flatten().tolist()
        raise ValueError(
            f"{name}: every value must be finite and > 0; found {int((~ok).sum())} bad value(s), "
            f"first at flat index {bad}. Re-quantize the weight or fix the file that provided it."
        )
    # tensor subclasses that refuse attributes are simply checked on every call
    if version is not None:
        with contextlib.suppress(AttributeError, RuntimeError):
            setattr(t, _CHECKED_ATTR, version)


def check_bias(bias: torch.Tensor | None, n: int) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or bias.dtype not in FLOAT_DTYPES:
        raise ValueError(f"bias: expected a float16/bfloat16/float32 tensor of shape [{n}]")
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias: expected shape [{n}], got {list(bias.shape)}")


def check_smooth(smooth: torch.Tensor | None, k: int) -> None:
    if smooth is None:
        return
    if not isinstance(smooth, torch.Tensor) or smooth.dtype not in FLOAT_DTYPES:
        raise ValueError(f"smooth: expected a float16/bfloat16/float32 tensor of shape [{k}]")
    if tuple(smooth.shape) != (k,):
        raise ValueError(f"smooth: expected shape [{k}] (one divisor per input channel), got {list(smooth.shape)}")


def check_rotate_group(rotate_group: int, k: int) -> None:
    if rotate_group not in ROTATE_GROUPS:
        raise ValueError(f"rotate_group: expected one of {ROTATE_GROUPS} (0 = no rotation), got {rotate_group}")
    if rotate_group and k % rotate_group:
        raise ValueError(f"rotate_group: {rotate_group} does not divide K={k}; ConvRot needs K % group == 0")


def check_out_dtype(out_dtype: torch.dtype | None, default: torch.dtype) -> torch.dtype:
    dtype = default if out_dtype is None else out_dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype: expected float16, bfloat16 or float32, got {dtype}")
    return dtype


def check_lora(lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, n: int, k: int, device) -> None:
    """A low-rank term: both or neither, lora_a [R, K], lora_b [N, R], float, on the input's device."""
    if lora_a is None and lora_b is None:
        return
    if lora_a is None or lora_b is None:
        raise ValueError("lora_a, lora_b: give both (lora_a [R, K] and lora_b [N, R]) or neither")
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES or t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D float16/bfloat16/float32 tensor")
        if t.device != device:
            raise ValueError(f"{name}: is on {t.device} but x is on {device}")
    r = lora_a.shape[0]
    if lora_a.shape[1] != k or tuple(lora_b.shape) != (n, r) or r == 0:
        raise ValueError(f"lora_a, lora_b: expected [R, {k}] and [{n}, R] with R >= 1, got {list(lora_a.shape)} "
                         f"and {list(lora_b.shape)}")


def check_linear_args(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    smooth: torch.Tensor | None,
    rotate_group: int,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
) -> tuple[int, int, bool, torch.dtype]:
    """Validate ``int8_linear`` metadata; returns (N, K, per_row, out_dtype). Values: ``check_values``."""
    check_float_input(x, "x")
    n, k = check_int8_weight(q, "q")
    if x.shape[-1] != k:
        raise ValueError(f"x: last dimension must equal K={k} (from q [N, K] = {list(q.shape)}), got x {list(x.shape)}")
    if x.device != q.device:
        raise ValueError(f"x is on {x.device} but q is on {q.device}; move both to the same device")
    per_row = check_scale(scale, n, "scale")
    check_bias(bias, n)
    check_smooth(smooth, k)
    check_rotate_group(rotate_group, k)
    check_lora(lora_a, lora_b, n, k, x.device)
    return n, k, per_row, check_out_dtype(out_dtype, x.dtype)


def check_values(scale: torch.Tensor | None = None, smooth: torch.Tensor | None = None) -> None:
    """Value checks of a weight scale and a smoothing vector (host sync, cached per tensor version)."""
    if scale is not None:
        check_positive_finite(scale, "scale")
    if smooth is not None:
        check_positive_finite(smooth, "smooth")
