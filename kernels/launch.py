"""Low-overhead launches of compiled Triton kernels.

``kernel[grid](*args)`` costs 20-30 us of Python per launch in Triton 3.6 (argument binding,
specialization, cache key, knob lookups), measured on the H200 machine (bench/profile_host.py).
A batch-1 layer takes tens of microseconds on the GPU, so that overhead decides whether it beats
BF16. After the first launch of a given specialization, ``FastLauncher`` calls the compiled
kernel's launcher directly.

The reuse key covers everything Triton specializes a compilation on: for tensors the dtype and
16-byte alignment of the data pointer; for integers equality to 1, divisibility by 16 and the
32/64-bit range; for TensorDescriptors (Triton's and Gluon's) the dtype, block shape, padding, base
alignment, the same integer properties of shape and strides and a Gluon descriptor's layout; constexprs and
launch options verbatim; the device.
Launch hooks (profilers such as proton) only see the first launch of each specialization. The
interpreter, and any Triton whose launcher does not take these arguments, use the normal path
(decided once, logged).

``first_fit`` is the one rule for a launch the GPU rejects for resources (Triton's OutOfResources:
shared memory, tensor memory or threads per block, raised when a specialization is first loaded):
the next smaller config of the same kernel, then the caller's torch twin for that call only.

``recording()`` collects the launches made inside it (kernel, grid, arguments) as ``Launch`` records, which
``Launch.replay`` launches again with some arguments replaced: the eager INT8 linear records its two
launches once per input specialization and replays them (``kernels/direct.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import types
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

try:
    from triton.tools.tensor_descriptor import TensorDescriptor as _TritonDescriptor
except ImportError:  # Triton < 3.4: no host descriptors, so no TMA kernels either
    _TritonDescriptor = None
try:  # a Gluon kernel's host descriptor (kernels/gluon_gemm.py): the same fields and a shared-memory layout
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _GluonDescriptor
except ImportError:  # a Triton without Gluon: no Gluon kernels either
    _GluonDescriptor = None
# the host tensor-descriptor classes a launch may take (``isinstance`` with the tuple; empty: none)
TensorDescriptor = tuple(c for c in (_TritonDescriptor, _GluonDescriptor) if c is not None)
try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # no Triton: nothing is launched, nothing can run out of resources
    class OutOfResources(RuntimeError):  # noqa: N818  (Triton's name)
        pass

C = TypeVar("C", bound=Hashable)


def tma_ok(t: torch.Tensor) -> bool:
    """Whether a TMA descriptor can read or write ``t`` as it is (any rank): a 16-byte aligned base, unit last
    stride, every other stride a multiple of 16 bytes (Triton's host descriptor asserts this for every dimension,
    size 1 included) and no zero stride on a dimension of size > 1 (a broadcast: TMA boxes would read one row as
    many). The one rule for the TMA kernels' operands; what fails it is copied to a contiguous tensor (or the
    launch takes a pointer-load kernel)."""
    # a plain loop: this runs for every GEMM call that takes the launch path (a generator cost 3x the time)
    strides = t.stride()
    if not strides or strides[-1] != 1 or t.data_ptr() % 16:
        return False
    size, shape = t.element_size(), t.shape
    for i in range(len(strides) - 1):
        st = strides[i]
        if (st * size) % 16 or (st <= 0 and shape[i] != 1):
            return False
    return True


class TileTooLargeError(RuntimeError):
    """No config of a kernel fits this GPU's resources; the caller runs the torch twin for this call."""


# (kernel, specialization, config) triples this process found over the GPU's resources: never compiled or
# tried again. Mutated only by ``first_fit``; empty on every GPU whose tables fit (the fast path checks that).
_MISFITS: set[tuple] = set()


def first_fit(kernel: str, spec: Hashable, config: C, smaller: Callable[[C], C | None],
              launch: Callable[[C], object], fallback: str) -> C:
    """``launch(config)``; when the GPU rejects it for resources, ``launch(smaller(config))``, and so on.

    Returns the config that ran. ``spec``: what else the compiled kernel depends on (dtypes, epilogue,
    rotation group), so a misfit is remembered for exactly that specialization. Each misfit is logged once
    (naming the kernel, config, the resource and, when no smaller config is left, ``fallback``: what the
    caller does instead) and skipped from then on. Raises TileTooLargeError when no config fits.
    """
    cfg = config
    while cfg is not None:
        if not _MISFITS or (kernel, spec, cfg) not in _MISFITS:  # the first test keeps the common path cheap
            try:
                launch(cfg)
                return cfg
            except OutOfResources as exc:
                _MISFITS.add((kernel, spec, cfg))
                nxt = smaller(cfg)
                logger.warning("int8_w8a8: %s %s: %s does not fit this GPU (%s); %s", kernel, spec, cfg, exc,
                               f"using the next smaller config {nxt}" if nxt is not None
                               else f"no smaller config: {fallback}")
        cfg = smaller(cfg)
    raise TileTooLargeError(f"{kernel} {spec}: no config fits this GPU ({fallback})")


def no_smaller(cfg) -> None:
    """``first_fit``'s ``smaller`` for kernels with one config per specialization."""
    return None


def _int_key(v: int) -> tuple:
    return (v == 1, v % 16 == 0, -(2**31) <= v < 2**31)


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool) or a is None or isinstance(a, float):
        return a if not isinstance(a, float) else "f"
    if isinstance(a, int):
        return _int_key(a)
    if TensorDescriptor and isinstance(a, TensorDescriptor):
        return (a.base.dtype, tuple(a.block_shape), a.padding, a.base.data_ptr() % 16 == 0,
                tuple(_int_key(int(s)) for s in a.shape), tuple(_int_key(int(s)) for s in a.strides),
                getattr(a, "layout", None))  # a Gluon descriptor's shared layout (frozen, hashable)
    return a  # constexpr values (ints/floats/bools passed by keyword are handled by the caller)


class FastLauncher:
    """Launch ``fn`` (a ``@triton.jit`` function) with cached compiled kernels.

    Call as ``launcher(grid, *args, **kwargs)`` with the same arguments as ``fn[grid](*args, **kwargs)``:
    positional runtime arguments in signature order, constexprs and options by keyword.
    """

    def __init__(self, fn, interpreted: bool) -> None:
        self.fn = fn
        self.names = list(getattr(fn, "arg_names", ()))
        self.enabled = not interpreted and bool(self.names)
        self.cache: dict[tuple, object] = {}

    def __call__(self, grid: tuple, *args, **kwargs) -> None:
        records = _RECORDING.get()
        if not self.enabled:
            self.fn[grid](*args, **kwargs)
            if records is not None:
                records.append(Launch(self, grid, args, kwargs, None, None))
            return
        device = torch.cuda.current_device()
        key = (device, tuple(_arg_key(a) for a in args), tuple(kwargs.items()))
        kernel = self.cache.get(key)
        if kernel is None:
            kernel = self.cache[key] = self.fn[grid](*args, **kwargs)
            if records is not None:
                records.append(Launch(self, grid, args, kwargs, kernel, device))
            return
        if records is not None:
            records.append(Launch(self, grid, args, kwargs, kernel, device))
        full = list(args)
        full.extend(kwargs[name] for name in self.names[len(args):])
        try:
            kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                       torch._C._cuda_getCurrentRawStream(device), kernel.function, kernel.packed_metadata,
                       None, None, None, *full)
        except (TypeError, AttributeError) as exc:  # a Triton whose launcher differs: use its own path
            logger.warning("int8_w8a8: direct Triton launches unavailable (%s); using kernel[grid](...)", exc)
            self.enabled = False
            self.fn[grid](*args, **kwargs)


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Triton's runtime allocator: global scratch for descriptors made in a kernel (torch's caching allocator,
    aligned to its 512 bytes, over the 128 a tensor map needs)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextlib.contextmanager
def device_descriptors(enabled: bool = True):
    """Within the block, launches of kernels that make TMA descriptors themselves (``tl.make_tensor_descriptor``)
    get their global scratch (Triton asks its allocator at every launch for 128 bytes per descriptor and
    program): Triton's allocator context variable is set to torch's caching allocator for this block only,
    when the caller has set none. ``enabled=False``: nothing is set (the common path, no cost)."""
    if not enabled:
        yield
        return
    from triton.runtime import _allocation

    token = _allocation._allocator.set(_scratch) if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR \
        else None
    try:
        yield
    finally:
        if token is not None:
            _allocation._allocator.reset(token)


# ---- recorded launches, replayed with some arguments replaced (the eager INT8 linear's hot path) ----
_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("int8_w8a8_launch_recording", default=None)


class Records(list):
    """The ``Launch`` records of one ``recording()`` block, and ``kept``: the storage addresses of tensors the
    launch code declared persistent with ``keep`` (cached across calls, e.g. Hadamard matrices)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: set[int] = set()


@contextlib.contextmanager
def recording():
    """Collect the ``FastLauncher`` launches made inside the block; yields the ``Records`` list."""
    records = Records()
    token = _RECORDING.set(records)
    try:
        yield records
    finally:
        _RECORDING.reset(token)


def keep(t: torch.Tensor | None) -> None:
    """Declare ``t`` persistent (a tensor cached across calls that a launch reads) to the recording in progress,
    if any: a replay may keep its address (``direct.Replayer``). Costs a context variable read otherwise."""
    records = _RECORDING.get()
    if records is not None and t is not None and isinstance(records, Records):
        records.kept.add(t.untyped_storage().data_ptr())


class _CLaunch:
    """Triton's C launcher of one compiled kernel, called without its Python layers (Triton 3.6's ``CudaLauncher``).

    ``kernel.run(...)`` is a Python object whose call allocates scratch through two closures and, for a kernel
    with host TensorDescriptor arguments, a wrapper that expands each descriptor on every launch: a Python loop
    over all arguments and one ``cuTensorMapEncodeTiled`` per descriptor (``make_tensordesc_arg``). A replayed
    launch has the same specialization every time and its descriptors differ only in their base address, so
    this calls the C function directly and keeps each descriptor's expansion per base address (a TMA map is a
    by-value kernel parameter: reusing the Python object is reusing 128 bytes). Built only for the layout this
    module knows (``inner``'s closure names ``launcher``, ``tensordesc_indices``, ``tensordesc_meta``; no profile
    scratch, one CTA per program); anything else keeps ``kernel.run`` (``for_kernel`` returns None).

    A kernel that makes TMA descriptors itself (``tl.make_tensor_descriptor``: the warp-specialized GEMM) needs
    ``global_scratch_size`` bytes of global memory per program at each launch. Triton's Python launcher asks its
    allocator for them; this allocates the same ``grid * global_scratch_size`` bytes from torch's caching
    allocator (what ``device_descriptors`` installs as that allocator) and passes the tensor in the C launcher's
    scratch slot. Freed when the call returns, the block is reused only by work queued later on the same stream:
    the kernel has run by then."""

    # expansions kept per descriptor argument: a fused block's replay table shares one recording among the layers
    # of one shape (``direct.Replayer``), so a weight descriptor cycles through up to ~60-120 weights a step (Qwen-
    # Image's 60 blocks); per-call outputs come back at a few addresses. 128 bytes each; cleared when full.
    MAX_BASES = 256

    __slots__ = ("descs", "expand", "fn", "head", "scratch")

    def __init__(self, fn, head: tuple, descs: tuple, expand=None, scratch: int = 0) -> None:
        self.fn, self.head, self.descs, self.expand, self.scratch = fn, head, descs, expand, scratch

    @classmethod
    def for_kernel(cls, kernel) -> _CLaunch | None:
        run = getattr(kernel, "_run", None)
        meta = getattr(kernel, "metadata", None)
        if run is None or meta is None or getattr(meta, "profile_scratch_size", 0) or getattr(run, "num_ctas", 1) != 1:
            return None
        scratch = int(getattr(meta, "global_scratch_size", 0) or 0)
        fn = getattr(run, "launch", None)
        closure = getattr(fn, "__closure__", None)
        descs: tuple = ()
        expand = None
        if closure:  # wrap_handle_tensordesc's inner(*args): the C launcher and the descriptor positions
            cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in closure), strict=True))
            if set(cells) != {"launcher", "tensordesc_indices", "tensordesc_meta"}:
                return None
            try:
                from triton.backends.nvidia.driver import make_tensordesc_arg as expand
            except ImportError:
                return None
            fn = cells["launcher"]
            metas = list(cells["tensordesc_meta"])
            descs = tuple((i, metas[n], {}) for n, i in enumerate(sorted(cells["tensordesc_indices"])))
        if isinstance(fn, types.FunctionType) or not callable(fn):  # another Python layer this module does not know
            return None
        head = (kernel.function, bool(run.launch_cooperative_grid), bool(run.launch_pdl), None, None,
                kernel.packed_metadata, None, None, None)
        return cls(fn, head, descs, expand, scratch)

    def __call__(self, grid: tuple, stream: int, args: list, device: int | None = None) -> None:
        """Launch on ``grid`` (3 ints) on ``stream`` (a raw CUDA stream) with ``args`` (positional, constexprs
        included); ``device``: the CUDA device index, needed only for a kernel with global scratch."""
        head = self.head
        if self.scratch:  # kept in this frame until the launch call has returned (see the class docstring)
            buf = torch.empty(grid[0] * grid[1] * grid[2] * self.scratch, dtype=torch.int8,
                              device="cuda" if device is None else device)
            head = (*head[:3], buf, *head[4:])
        if not self.descs:
            self.fn(grid[0], grid[1], grid[2], stream, *head, *args)
            return
        full, prev = [], 0
        for i, meta, cache in self.descs:
            desc = args[i]
            base = desc.base.data_ptr()
            expanded = cache.get(base)
            if expanded is None:
                if len(cache) >= self.MAX_BASES:
                    cache.clear()
                expanded = self.expand(desc, meta)
                if meta is None:  # a descriptor the kernel takes as pointer, shape, strides: keep no tensor
                    expanded[0] = base
                cache[base] = expanded
            full += args[prev:i]
            full += expanded
            prev = i + 1
        full += args[prev:]
        self.fn(grid[0], grid[1], grid[2], stream, *head, *full)


@dataclass
class Launch:
    """One kernel launch as made: ``launcher`` (its ``FastLauncher``), ``grid``, positional ``args`` and keyword
    ``kwargs`` (constexprs, options), and the compiled ``kernel`` on CUDA ``device`` (None when the launch went
    through ``fn[grid]``: the interpreter, or a Triton whose launcher the direct path does not know).
    ``hold``: tensors a replay table passes by address (``direct._replay_table``), kept alive with the record."""

    launcher: FastLauncher
    grid: tuple
    args: tuple
    kwargs: dict
    kernel: object | None
    device: int | None
    tail: list = field(init=False, repr=False)  # constexprs in signature order, after the positional arguments
    scratch: bool = field(init=False, repr=False)  # the kernel makes descriptors: global scratch at each launch
    claunch: _CLaunch | None = field(init=False, repr=False)  # the C launcher, where this Triton's layout is known
    hold: tuple = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        self.tail = [self.kwargs[name] for name in self.launcher.names[len(self.args):]] if self.kernel else []
        self.scratch = bool(getattr(getattr(self.kernel, "metadata", None), "global_scratch_size", 0))
        self.claunch = _CLaunch.for_kernel(self.kernel) if self.kernel is not None else None
        self.grid = tuple(self.grid) + (1,) * (3 - len(self.grid))

    def replay(self, args: list) -> None:
        """Launch again with ``args`` (positional, as recorded, some replaced: same dtypes, alignment and
        integer values, so the same specialization; a pointer argument may be a plain int address).

        Raises ``TypeError``/``AttributeError`` where this Triton's launcher takes other arguments; callers then
        stop replaying (the FastLauncher has the same rule)."""
        if self.kernel is None:
            self.launcher.fn[self.grid](*args, **self.kwargs)
            return
        if self.claunch is not None:
            args.extend(self.tail)
            self.claunch(self.grid, torch._C._cuda_getCurrentRawStream(self.device), args, self.device)
            return
        if self.scratch:
            with device_descriptors():
                self._run(args)
            return
        self._run(args)

    def _run(self, args: list) -> None:
        grid, kernel = self.grid, self.kernel
        kernel.run(grid[0], grid[1], grid[2], torch._C._cuda_getCurrentRawStream(self.device), kernel.function,
                   kernel.packed_metadata, None, None, None, *args, *self.tail)
