"""The eager hot path of one INT8 linear layer: checks hoisted, kernel launches recorded once and replayed.

``kernels.int8_linear`` validates its arguments, picks the backend, allocates the activation buffers, picks
the GEMM config and builds ~30 launch arguments (TMA descriptors, specialization keys) on every call: tens of
microseconds of host time per layer, more than the GPU needs for the batch-1 and text-token layers of a step
(bench/NOTES.md items 5 and 18). A ``LinearPlan`` holds one layer's weight and does that work once:

* per weight (the plan's lifetime): the weight's int8 data, scale, bias, smoothing vector and ConvRot group,
  and the backend decision for its device; the owner (``ops.comfy_ops.Int8Linear``) builds a new plan when
  the weight object changes (a LoRA merge, ``.to()``, unpatching);
* per input specialization (dtype, shape, strides and 16-byte alignment of ``x``, so every kernel argument
  but the addresses is fixed): the first call quantizes and multiplies through the normal launch path
  inside ``launch.recording()``; later calls replay those launches with the addresses of this call's input,
  activation buffers and output substituted.

The activation buffers (int8 rows and their float32 scales, consumed by the GEMM right after the quantizer
wrote them) live in one workspace per device and stream, shared by all plans: kernels on one stream run in
order, so a layer's quantizer cannot overwrite rows the previous layer's GEMM has not read yet. It grows to
the largest M x K seen (e.g. 14040 x 13824 bytes, 194 MB, for Wan 14B's FFN down projection) and is kept.
The output is a fresh tensor each call.

Rules, each an explicit fallback (``__call__`` returns None and the caller runs the general path):
* ``x`` is not a plain tensor, is on another device, has another last dimension, or is not float16/bfloat16/
  float32;
Otherwise, without replay (checks still hoisted: ``api.int8_linear_impl`` directly):
* CUDA graph capture (a captured replay would keep the workspace's address, which a later growth frees);
* the torch-twin backend (CPU, Turing, no Triton); an empty input; an input whose rows are not a view
  (``reshape`` would copy); launches that went around the direct launcher or whose arguments alias this
  call's buffers in a way the plan cannot map; a Triton whose launcher rejects the replay (logged once).
Dynamic LoRA terms: ``__call__`` does not take them; ``linear_lora`` does (the rows' quantization and the GEMM
with the term replayed, its down projection by torch, as in the public API); ``gemm`` and ``gemm_residual``
(pre-quantized rows) take the term's down projection and up matrix and replay with them.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch

from . import _checks, api
from .dispatch import Backend, choose_backend
from .reference import as_rows

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ALIGN = 256  # bytes between the int8 rows and the row scales in the workspace
# per-call tensors of a recorded launch: the input, the workspace's two regions, the output
_X, _XQ, _XS, _OUT = range(4)


# ---------------------------------------------------------------- shared activation workspace
_WORKSPACES: dict[tuple, torch.Tensor] = {}
# How often a call took the launch path to record a specialization ("recorded"), or because its
# specialization cannot be replayed ("unreplayed"), and how often a full table was emptied ("cleared"), summed
# over every plan and replayer. A benchmark reads them around each step (``counts``): a step that keeps
# re-recording (a table too small for its keys) shows up as counts, not only as host time.
_COUNTS = {"recorded": 0, "cleared": 0, "unreplayed": 0}


def counts() -> dict[str, int]:
    """A copy of the recording counters (see ``_COUNTS``)."""
    return dict(_COUNTS)


def stream_key(device: torch.device) -> tuple:
    """``(type, index, raw stream)`` of ``device``'s current stream (stream 0 off CUDA): the key of a buffer that
    kernels on one stream may share because they run in order (``workspace``, the GEMM's split-tail workspace)."""
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return device.type, index, torch._C._cuda_getCurrentRawStream(index) if device.type == "cuda" else 0


def workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 buffer of at least ``nbytes`` on ``device`` for the current stream (grown, never shrunk)."""
    key = stream_key(device)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < nbytes:
        # growing: the old buffer is freed in stream order (kernels queued on it still read valid memory)
        buf = _WORKSPACES[key] = torch.empty(max(nbytes, 2 * (buf.numel() if buf is not None else 0)),
                                             dtype=torch.uint8, device=device)
    return buf


def release_workspaces() -> None:
    """Free every workspace (tests; a process that stops running INT8 layers)."""
    _WORKSPACES.clear()


class _Address:
    """A device address where a Triton launcher or TMA descriptor expects a tensor (it only asks ``data_ptr``)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def data_ptr(self) -> int:
        return self.ptr


def _regions(m: int, k: int) -> tuple[int, int]:
    """(offset of the row scales, total bytes) of the workspace for M rows of K int8 values."""
    off = -(-(m * k) // _ALIGN) * _ALIGN
    return off, off + 4 * m


class _Replay:
    """The recorded launches of one input specialization and where the per-call tensors go in them."""

    __slots__ = ("k", "launches", "m", "n", "nbytes", "off", "out_dtype", "out_shape")

    def __init__(self, launches, m, k, n, out_shape, out_dtype):
        self.launches = launches  # [(Launch, template args, [(position, slot)], [(descriptor, slot)])]
        self.m, self.k, self.n = m, k, n
        self.off, self.nbytes = _regions(m, k)
        self.out_shape, self.out_dtype = out_shape, out_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buf = workspace(self.nbytes, x.device)
        out = torch.empty(self.out_shape, dtype=self.out_dtype, device=x.device)
        base = buf.data_ptr()
        values = (x.data_ptr(), base, base + self.off, out.data_ptr())
        views = None
        for rec, template, slots, descs in self.launches:
            args = list(template)
            if rec.kernel is None:  # launched through fn[grid] (the interpreter): tensors, not addresses
                if views is None:
                    views = (x, *self._views(buf), out)
                for pos, slot in slots:
                    args[pos] = views[slot]
                for desc, slot in descs:
                    desc.base = views[slot]
            else:
                for pos, slot in slots:
                    args[pos] = values[slot]
                for desc, slot in descs:
                    desc.base = _Address(values[slot])
            try:
                rec.replay(args)
            finally:
                for desc, _ in descs:  # the plan must not keep this call's output (or buffers) alive
                    desc.base = None
        return out

    def _views(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, k = self.m, self.k
        return buf[: m * k].view(torch.int8).view(m, k), buf[self.off: self.off + 4 * m].view(torch.float32)


_PERSISTENT = object()  # _replay_table's locate: a tensor the template keeps


def _replay_table(records, locate) -> tuple | None:
    """The replay table of ``records`` (the launches of one recorded call), or None when they cannot be replayed.

    Per launch ``(Launch, template args, slots, descs)``: ``slots`` as ``(position, *entry)`` for tensor arguments
    and ``descs`` as ``(TensorDescriptor, *entry)`` for descriptors whose base is a per-call tensor, where
    ``entry = locate(tensor, is_desc)`` says where the replay finds that tensor; ``locate`` returns
    ``_PERSISTENT`` for a tensor the template keeps, or None when the launches cannot be replayed. On success
    the records keep nothing of the recording call alive (the templates replace their arguments, the
    descriptors' bases are cleared)."""
    from .launch import TensorDescriptor

    table = []
    for rec in records:
        template, slots, descs, hold = list(rec.args), [], [], []
        for pos, arg in enumerate(rec.args):
            is_desc = isinstance(arg, TensorDescriptor)
            tensor = arg.base if is_desc else arg
            if not isinstance(tensor, torch.Tensor):
                continue
            entry = locate(tensor, is_desc)
            if entry is None:
                return None
            if entry is _PERSISTENT:
                if rec.kernel is not None and not is_desc:
                    # by address: Triton's launcher takes an int as is, a tensor costs a data_ptr() call and a
                    # driver query (cuPointerGetAttribute) per launch; the record keeps the tensor alive
                    template[pos] = tensor.data_ptr()
                    hold.append(tensor)
                continue
            if is_desc:
                descs.append((arg, *entry))
            else:
                slots.append((pos, *entry))
                template[pos] = None
        table.append((rec, tuple(template), tuple(slots), tuple(descs), tuple(hold)))
    for rec, template, _, descs, hold in table:  # keep nothing of this call alive: its input, buffers, output
        rec.args, rec.hold = template, hold
        for desc, *_ in descs:
            desc.base = None
    return tuple(entry[:4] for entry in table)


def _classify(records, x, xq, xs, out) -> tuple | None:
    """The replay table of recorded launches, or None when a tensor argument aliases a per-call buffer at an
    address the plan cannot map (a view at an offset)."""
    slot_of = {x.data_ptr(): _X, xq.data_ptr(): _XQ, xs.data_ptr(): _XS, out.data_ptr(): _OUT}
    per_call = {t.untyped_storage().data_ptr() for t in (x, xq, out)}

    def locate(tensor: torch.Tensor, is_desc: bool):
        slot = slot_of.get(tensor.data_ptr())
        if slot is None:
            # a persistent tensor (weight, scale, bias, Hadamard matrix) is kept by the template
            return None if tensor.untyped_storage().data_ptr() in per_call else _PERSISTENT
        if is_desc and (tensor.data_ptr() % 16 or slot == _X):
            return None
        return (slot,)  # a descriptor object is reused, its base replaced per call

    return _replay_table(records, locate)


class LinearPlan:
    """``y = x @ W.T + bias`` for one INT8 weight, eager, with the per-call host work done once.

    ``q`` int8 ``[N, K]``, ``scale`` float32 ``[]``/``[N]``/``[N, 1]`` (validated when the weight was built),
    ``bias`` ``[N]`` or None, ``smooth`` ``[K]`` or None, ``rotate_group`` the ConvRot group (0: none). Call with
    ``x [..., K]`` (float16/bfloat16/float32, on q's device) for ``y [..., N]`` in x's dtype, or None when the
    plan does not take ``x`` (see the module docstring). ``backend`` overrides the dispatch rule (tests).
    """

    MAX_SPECIALIZATIONS = 16  # input shapes remembered per layer (a workflow uses a few per resolution)

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 smooth: torch.Tensor | None = None, rotate_group: int = 0, backend: Backend | None = None):
        # the weight half of the public API's checks, once per weight instead of once per call
        self.n, self.k = _checks.check_int8_weight(q, "q")
        _checks.check_scale(scale, self.n, "scale")
        _checks.check_bias(bias, self.n)
        _checks.check_smooth(smooth, self.k)
        _checks.check_rotate_group(rotate_group, self.k)
        self.q, self.scale, self.bias, self.smooth, self.rotate_group = q, scale, bias, smooth, rotate_group
        self.device = q.device
        self.cuda = q.device.type == "cuda"
        self.backend = backend or choose_backend(q.device)
        self.replays: dict[tuple, _Replay | None] = {}
        self.biases: dict[torch.dtype, torch.Tensor | None] = {}

    def bias_for(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The bias in the output dtype (cast once per dtype, as ComfyUI's cast path does on every call)."""
        if dtype not in self.biases:
            self.biases[dtype] = None if self.bias is None else self.bias.to(dtype)
        return self.biases[dtype]

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.device != self.device or x.dtype not in _FLOAT_DTYPES or x.shape[-1] != self.k:
            return None
        if self.cuda and torch._C._cuda_isCurrentStreamCapturing():
            # a CUDA graph would bake in the workspace's address, which a later growth frees
            return self._direct(x)
        key = (x.dtype, x.shape, x.stride(), x.data_ptr() % 16 == 0)
        replay = self.replays.get(key, False)
        if replay:
            try:
                return replay(x)
            except (TypeError, AttributeError) as exc:  # this Triton's launcher takes other arguments
                logger.warning("int8_w8a8: replaying recorded launches failed (%s); using the launch path", exc)
                self.replays[key] = None
                return self._direct(x)
        if replay is None:
            _COUNTS["unreplayed"] += 1
            return self._direct(x)
        if len(self.replays) >= self.MAX_SPECIALIZATIONS:
            self.replays.clear()
            _COUNTS["cleared"] += 1
        _COUNTS["recorded"] += 1
        y, self.replays[key] = self._record(x)
        return y

    def linear_lora(self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor | None:
        """``x @ W.T + bias + (x @ lora_a.T) @ lora_b.T`` (a dynamic LoRA term, ``a [R, K]``, ``b [N, R]``) for ``x``
        as ``__call__`` takes it: the rows' quantization and the GEMM with the term in its epilogue replayed, ``h =
        x @ a.T`` by torch in x's dtype: the kernels and values of ``kernels.int8_linear`` with the term, without
        its ~100 us of launch path per call. None when the plan does not take ``x``, or for a smoothed weight (the
        public API then)."""
        if (x.device != self.device or x.dtype not in _FLOAT_DTYPES or x.shape[-1] != self.k
                or self.smooth is not None):
            return None
        from . import fused  # fused imports this module

        return fused.int8_linear_eager(x, self.q, self.scale, self.bias_for(x.dtype), x.dtype, self.rotate_group,
                                       lora_a, lora_b)

    def gemm(self, xq: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype, lora_h: torch.Tensor | None = None,
             lora_b: torch.Tensor | None = None) -> torch.Tensor | None:
        """``y [M, N]`` in ``out_dtype`` of rows a fused kernel quantized (``xq`` int8 ``[M, K]``, ``x_scale``
        float32 ``[M]``, rotated and without smoothing as the weight expects): ``fused.int8_gemm`` on this weight
        with its bias cast once per dtype; eager calls of it replay their launches (``Replayer``, one table per
        function: layers of one shape share a recording, their weight addresses substituted). ``lora_h [M, R]``,
        ``lora_b [N, R]``: a dynamic LoRA term added in the epilogue (``fused.int8_gemm``). None when ``xq`` is on
        another device."""
        if xq.device != self.device:
            return None
        from . import fused  # fused imports this module

        return fused.int8_gemm(xq, x_scale, self.q, self.scale, self.bias_for(out_dtype), out_dtype, lora_h, lora_b)

    def gemm_residual(self, xq: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype,
                      residual: torch.Tensor, gate: torch.Tensor, lora_h: torch.Tensor | None = None,
                      lora_b: torch.Tensor | None = None) -> torch.Tensor | None:
        """``residual [B, S, N] += gate [B, 1, N] * (xq @ W.T + bias [+ lora_h @ lora_b.T])`` in place (bias in
        ``out_dtype``): ``fused.int8_gemm_residual`` on this weight (checked and replayed as ``gemm``); returns
        ``residual``, or None when ``xq`` is on another device."""
        if xq.device != self.device:
            return None
        from . import fused

        return fused.int8_gemm_residual(xq, x_scale, self.q, self.scale, self.bias_for(out_dtype), residual, gate,
                                        lora_h, lora_b)

    def _direct(self, x: torch.Tensor) -> torch.Tensor:
        """The general implementation without the public API's checks (they were done for this weight)."""
        return api.int8_linear_impl(x, self.q, self.scale, self.bias_for(x.dtype), x.dtype, self.smooth,
                                    self.rotate_group, False)

    def _record(self, x: torch.Tensor) -> tuple[torch.Tensor, _Replay | None]:
        """Run the kernels once through the launch path, recording the launches: (y, replay or None)."""
        x2 = as_rows(x)
        m, k = x2.shape
        if self.backend.name != "triton" or m == 0 or k == 0 or x2.data_ptr() != x.data_ptr():
            return self._direct(x), None
        from . import launch, triton_ops, triton_quant  # Triton only here: importing the plan does not need it

        off, nbytes = _regions(m, k)
        buf = workspace(nbytes, x.device)
        xq = buf[: m * k].view(torch.int8).view(m, k)
        xs = buf[off: off + 4 * m].view(torch.float32)
        bias = self.bias_for(x.dtype)
        with launch.recording() as records:  # the launch sequence of triton_ops.int8_linear, into our buffers
            triton_quant.launch_quantize(x2, xq, xs, smooth=self.smooth, rotate_group=self.rotate_group)
            out = triton_ops.int8_gemm(xq, xs, self.q, self.scale, bias, x.dtype, self.backend)
        y = out.reshape(*x.shape[:-1], self.n)
        table = _classify(records, x, xq, xs, out) if records else None
        return y, None if table is None else _Replay(table, m, k, self.n, tuple(y.shape), x.dtype)


# ---------------------------------------------------------------- any eager kernel call: record once, replay
class _Recorded:
    """The launches of one specialization: ``launches`` as (Launch, template args, [(position, slot, byte offset,
    view)], [(descriptor, slot, byte offset, view)]); ``outputs`` the tensors the call allocates, as (shape,
    dtype); ``result`` how to build the return value (None, or a tuple of ("in", i) / ("out", j) items, with
    ``single`` when it is one tensor, not a tuple)."""

    __slots__ = ("launches", "outputs", "result", "single")

    def __init__(self, launches, outputs, result, single):
        self.launches, self.outputs, self.result, self.single = launches, outputs, result, single

    def __call__(self, tensors: tuple, device: torch.device):
        outs = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in self.outputs]
        sources = (*tensors, *outs)
        for rec, template, slots, descs in self.launches:
            args = list(template)
            if rec.kernel is None:  # launched through fn[grid] (the interpreter): tensors, not addresses
                for pos, slot, off, view in slots:
                    args[pos] = _view_at(sources[slot], off, view)
                for desc, slot, off, view in descs:
                    desc.base = _view_at(sources[slot], off, view)
            else:
                for pos, slot, off, _ in slots:
                    args[pos] = sources[slot].data_ptr() + off
                for desc, slot, off, _ in descs:
                    desc.base = _Address(sources[slot].data_ptr() + off)
            try:
                rec.replay(args)
            finally:
                for desc, *_ in descs:  # keep no per-call tensor alive
                    desc.base = None
        if self.result is None:
            return None
        built = tuple(tensors[i] if kind == "in" else outs[i] for kind, i in self.result)
        return built[0] if self.single else built


def _view_at(base: torch.Tensor, off: int, view: tuple) -> torch.Tensor:
    """The tensor (dtype, shape, strides) ``off`` bytes after ``base``'s first element, in its storage."""
    dtype, shape, stride = view
    start = base.storage_offset() * base.element_size() + off
    t = torch.empty(0, dtype=dtype, device=base.device)
    return t.set_(base.untyped_storage(), start // t.element_size(), shape, stride)


_REPLAYERS: weakref.WeakSet = weakref.WeakSet()  # every Replayer, for forget_recordings


def forget_recordings() -> None:
    """Drop every Replayer's recorded specializations (tests that patch the launch path; nothing else needs it:
    the launch path's choices are fixed per device for a process)."""
    for rep in list(_REPLAYERS):
        rep.table.clear()


class Replayer:
    """Eager calls of one kernel function with the per-call host work done once per specialization.

    ``replayer(tensors, static, check, impl)``: ``tensors`` the call's tensor arguments (None allowed) and
    ``static`` its other arguments (hashable); ``check()`` raises for bad arguments, ``impl()`` runs the function
    and returns None, a tensor or a tuple of tensors. The first call of a specialization (``static``, the device,
    and dtype, shape, strides and address mod 16 of every tensor: everything the checks, the launch path's choices
    and Triton's specialization read) runs ``check()`` and ``impl()`` inside ``launch.recording()``; later calls
    skip both, allocate the outputs and replay the recorded launches with this call's addresses substituted.

    Arguments that share a first address (in place) are part of the key (``_aliases``), so a launch reading that
    address is replayed with it whichever argument it came from.

    A specialization is not replayed (``impl()`` runs each call, without ``check()``) when its effects are not
    all in recorded direct launches: no launch (torch twins, empty tensors), or a launch that reads a tensor which
    is neither an argument (or a view into one), nor a returned allocation, nor declared persistent with
    ``launch.keep`` or ``keep`` here (a per-call copy such as ``.contiguous()``), or an address inside a storage
    two tensors share at other addresses (ambiguous), or a returned tensor that is not a fresh contiguous
    allocation.
    """

    MAX_SPECIALIZATIONS = 64

    def __init__(self, name: str, interpreted: bool = True) -> None:
        """``interpreted``: also record and replay under Triton's interpreter (``TRITON_INTERPRET=1``, the CPU
        test tier). A module-level replayer passes False: its table outlives the tests, which patch the launch
        path (forced kernels, simulated misfits); tests of the replay itself switch ``enabled`` on."""
        self.name = name
        self.enabled = interpreted or os.environ.get("TRITON_INTERPRET", "0") != "1"
        self.table: dict[tuple, _Recorded | None] = {}
        _REPLAYERS.add(self)

    def __call__(self, tensors: tuple, static: tuple, check, impl, keep: tuple = ()):
        if not self.enabled:
            check()
            return impl()
        device = tensors[0].device
        ptrs = [None if t is None else t.data_ptr() for t in tensors]
        key = (static, device, _aliases(ptrs), *[None if t is None else (t.dtype, t.shape, t.stride(), p % 16)
                                                 for t, p in zip(tensors, ptrs, strict=True)])
        entry = self.table.get(key, False)
        if entry:
            try:
                return entry(tensors, device)
            except (TypeError, AttributeError) as exc:  # this Triton's launcher takes other arguments
                logger.warning("int8_w8a8: replaying %s failed (%s); using the launch path", self.name, exc)
                self.table[key] = None
                return impl()
        if entry is None:
            _COUNTS["unreplayed"] += 1
            return impl()
        check()
        if len(self.table) >= self.MAX_SPECIALIZATIONS:
            self.table.clear()
            _COUNTS["cleared"] += 1
        _COUNTS["recorded"] += 1
        from . import launch

        with launch.recording() as records:
            result = impl()
        self.table[key] = _record(records, tensors, result, keep) if records else None
        return result


def _aliases(ptrs: list) -> tuple | None:
    """Which arguments share a first address (an in-place call: ``qk_norm_rope`` writing q into its own
    projection), as the index of the first argument at each one's address; None when no two do (the usual
    case). Part of a specialization's key, so a replay substitutes one address for all of them."""
    nones = ptrs.count(None)
    if len(set(ptrs)) == len(ptrs) - nones + (nones > 0):  # all addresses distinct: 0.5 us where the loop takes 1.7
        return None
    seen: dict[int, int] = {}
    return tuple(None if p is None else seen.setdefault(p, i) for i, p in enumerate(ptrs))


def _record(records, tensors: tuple, result, keep: tuple) -> _Recorded | None:
    """The replay of ``records`` made by a call on ``tensors`` that returned ``result``, or None (see Replayer)."""
    single = isinstance(result, torch.Tensor)
    returned = (result,) if single else tuple(result) if isinstance(result, (tuple, list)) else ()
    if result is not None and not single and not all(isinstance(t, torch.Tensor) for t in returned):
        return None
    ids = {id(t): i for i, t in enumerate(tensors) if t is not None}
    outputs, shape_of, spec = [], [], []
    for t in returned:
        if id(t) in ids:
            spec.append(("in", ids[id(t)]))
            continue
        if (t.storage_offset() or not t.is_contiguous()
                or t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.numel() == 0):
            return None
        spec.append(("out", len(outputs)))
        outputs.append(t)
        shape_of.append((tuple(t.shape), t.dtype))
    sources = [*tensors, *outputs]
    by_ptr: dict[int, list[int]] = {}
    by_storage: dict[int, list[int]] = {}
    for i, t in enumerate(sources):
        if t is not None:
            by_ptr.setdefault(t.data_ptr(), []).append(i)
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(i)
    kept = set(records.kept) | {t.untyped_storage().data_ptr() for t in keep if t is not None}

    def locate(tensor: torch.Tensor, is_desc: bool):
        ptr, storage = tensor.data_ptr(), tensor.untyped_storage().data_ptr()
        exact = by_ptr.get(ptr, ())
        if exact and all(i < len(tensors) for i in exact):
            candidates = exact[:1]  # arguments at this address share it in every call of this key (``_aliases``)
        else:
            candidates = exact or by_storage.get(storage, ())
        if len(candidates) > 1:
            return None  # two tensors in one storage at other addresses: which one a replay uses is unknown
        if not candidates:
            # persistent: the template keeps it; otherwise a per-call temporary (a copy made by the launch path)
            return _PERSISTENT if storage in kept else None
        slot = candidates[0]
        return slot, ptr - sources[slot].data_ptr(), (tensor.dtype, tuple(tensor.shape), tensor.stride())

    table = _replay_table(records, locate)
    if table is None:
        return None
    return _Recorded(table, tuple(shape_of), tuple(spec) if result is not None else None, single)

