"""``custom_op``: ``torch.library.custom_op`` whose calls skip its per-call output check.

``torch.library.custom_op`` registers the function behind a backend kernel that checks, on every call, that no
output aliases an input (``backend_impl``), and an Autograd kernel that redispatches below autograd. ComfyUI runs
models under ``torch.inference_mode()``, where the Autograd keys are skipped, so the check is what a call pays:
measured on this CPU (torch 2.11, a no-op body, inference mode) 3.4 us per call through ``torch.ops`` against 1.6 us
for the function registered as a plain ``Library.impl`` kernel. A compiled FLUX-type step calls the pack's ops
300-700 times (every fused-block kernel and GEMM is one).

The pack's op bodies return fresh tensors (the aliasing rule is tested with ``torch.library.opcheck`` in the test
suite, not checked per call). So after ``custom_op`` has defined the op (schema, fake, ADInplaceOrView for mutating
ops, the Autograd kernel: everything torch.compile reads, and a clear error when a gradient is asked through an op
that has no backward), the function is registered again as its CompositeExplicitAutograd kernel. A torch that
refuses the override (no ``allow_override``) keeps ``custom_op``'s kernel, logged once at debug level.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable

import torch

logger = logging.getLogger(__name__)

_LIBS: dict[str, torch.library.Library] = {}  # kept alive: a Library's registrations go with it


def custom_op(qualname: str, *, mutates_args: Iterable[str] | str = ()) -> Callable:
    """``torch.library.custom_op(qualname, mutates_args=...)`` with the lean backend kernel (module docstring)."""

    def wrap(fn: Callable):
        op = torch.library.custom_op(qualname, mutates_args=mutates_args)(fn)
        _register_lean(qualname, fn)
        return op

    return wrap


def _register_lean(qualname: str, fn: Callable) -> None:
    namespace, name = qualname.split("::")
    lib = _LIBS.get(namespace)
    if lib is None:
        lib = _LIBS[namespace] = torch.library.Library(namespace, "FRAGMENT")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Overriding a previously registered kernel": the point
            lib.impl(name, fn, "CompositeExplicitAutograd", allow_override=True)
    except (TypeError, RuntimeError) as exc:
        logger.debug("int8_w8a8: %s keeps torch.library.custom_op's kernel (%s)", qualname, exc)
