"""``custom_op``: ``torch.library.custom_op`` whose eager call costs what a plain ``Library`` kernel costs.

``torch.library.custom_op`` registers two Python layers in front of the function: an Autograd kernel that
redispatches below autograd (``torch._library.autograd.autograd_impl``) and a backend kernel that checks, on
every call, that no output aliases an input (``backend_impl``). Measured on this CPU (torch 2.11, a no-op body):
6.6-7.6 us per call through ``torch.ops`` against 1.4-1.5 us for a kernel registered with ``Library.impl``.
A compiled FLUX-type step calls the pack's ops 300-700 times (every fused-block kernel and GEMM is one), so
those layers cost 2-4 ms of host time per step, where a compiled step is already partly host-bound.

The pack's ops run inference only, and their bodies return fresh tensors (the aliasing rule is tested with
``torch.library.opcheck`` in the test suite, not checked per call). So after ``custom_op`` has defined the op
(schema, fake, ADInplaceOrView for mutating ops, everything torch.compile reads), the function is registered
again as the op's CompositeExplicitAutograd kernel and the Autograd key falls through to it. The op still
traces, functionalizes and opchecks as before; gradients do not flow through it (they never did: no op has a
backward formula). A torch that refuses the override (no ``allow_override``) keeps ``custom_op``'s kernels,
logged once at debug level.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable

import torch

logger = logging.getLogger(__name__)

_LIBS: dict[str, torch.library.Library] = {}  # kept alive: a Library's registrations go with it


def custom_op(qualname: str, *, mutates_args: Iterable[str] | str = ()) -> Callable:
    """``torch.library.custom_op(qualname, mutates_args=...)`` with the lean eager kernel (module docstring)."""

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
            lib.impl(name, torch.library.fallthrough_kernel, "Autograd", allow_override=True)
    except (TypeError, RuntimeError) as exc:
        logger.debug("int8_w8a8: %s keeps torch.library.custom_op's kernels (%s)", qualname, exc)
