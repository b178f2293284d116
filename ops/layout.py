"""The pack's INT8 weight: a comfy-kitchen ``QuantizedTensor`` with layout ``Int8W8A8Layout``.

``Int8W8A8Layout`` subclasses kitchen's ``TensorWiseINT8Layout``, so everything in ComfyUI that
knows ``int8_tensorwise`` weights (dequantize/requantize for LoRA, offloading and DynamicVRAM casts,
``.to()``, torch.compile through ``__tensor_flatten__``, saving through ``state_dict``) accepts it
unchanged. What differs is where the arithmetic runs: quantizing, dequantizing and every matmul
the tensor takes part in go through ``int8_w8a8.kernels``.

Params (frozen): int8 data ``[N, K]`` beside it; ``scale`` float32 ``[N, 1]`` (per-row) or ``[]``
(per-tensor); ``convrot``/``convrot_groupsize`` (the weight is stored rotated, ``W_g @ H^T``);
``smooth`` (float32 ``[K]``, the weight is stored as ``W * smooth``, activations are divided by it).

Matmul handlers: ``F.linear`` on a tensor subclass decomposes before dispatch, into ``t`` + ``mm``/
``addmm`` for 2-D and foldable inputs and into ``t`` + ``expand`` + ``bmm`` for 3-D inputs whose
leading dims cannot be folded (FLUX's ``attn[:, txt_len:]`` slice feeding ``img_attn.proj``).
Kitchen dequantizes the whole weight on ``expand``; here ``expand`` of a transposed weight stays
lazy and ``bmm`` runs the INT8 kernel on the 3-D input.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch
from comfy_kitchen.tensor import QuantizedTensor, TensorWiseINT8Layout, register_layout_class, register_layout_op
from comfy_kitchen.tensor.base import dequantize_args

from .. import kernels

logger = logging.getLogger(__name__)

LAYOUT_NAME = "Int8W8A8Layout"
aten = torch.ops.aten


class Int8W8A8Layout(TensorWiseINT8Layout):
    """INT8 weights (per-row or per-tensor scale, optional ConvRot / SmoothQuant) on this pack's kernels."""

    @dataclass(frozen=True)
    class Params(TensorWiseINT8Layout.Params):
        smooth: torch.Tensor | None = None

        def _tensor_fields(self) -> list[str]:
            return ["scale", "smooth"] if self.smooth is not None else ["scale"]

    @classmethod
    def quantize(
        cls,
        tensor: torch.Tensor,
        scale: torch.Tensor | float | str | None = None,
        stochastic_rounding: int | None = 0,
        inplace_ops: bool = False,
        is_weight: bool = True,
        per_channel: bool = False,
        convrot: bool = False,
        convrot_groupsize: int = 256,
        smooth: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, Params]:
        """Kitchen's ``quantize`` signature on the pack's kernels.

        ``stochastic_rounding`` > 0 is the seed of reproducible stochastic rounding (ComfyUI passes a
        hash of the layer name when it requantizes after a LoRA); otherwise round-to-nearest-even.
        ``scale`` "recalculate"/None derive the scale from the data; a tensor fixes a per-tensor scale.
        """
        seed = int(stochastic_rounding) if stochastic_rounding and int(stochastic_rounding) > 0 else None
        if not is_weight:
            q, s = kernels.quantize_rows(tensor)
            return q, cls.Params(scale=s, orig_dtype=tensor.dtype, orig_shape=tuple(q.shape), is_weight=False)
        w = tensor if smooth is None else tensor.float() * smooth
        if convrot or per_channel:
            q, s = kernels.quantize_weight(w, per_row=True, seed=seed, rotate_group=convrot_groupsize if convrot else 0)
        else:
            fixed = scale if isinstance(scale, torch.Tensor) else (
                torch.tensor(float(scale), dtype=torch.float32, device=w.device)
                if isinstance(scale, (int, float)) else None)
            if fixed is not None:
                fixed = fixed.to(device=w.device, dtype=torch.float32).reshape(())
            q, s = kernels.quantize_weight(w, per_row=False, seed=seed, scale=fixed)
        params = cls.Params(scale=s, orig_dtype=tensor.dtype, orig_shape=tuple(tensor.shape), is_weight=True,
                            convrot=bool(convrot), convrot_groupsize=int(convrot_groupsize), smooth=smooth)
        return q, params

    @classmethod
    def dequantize(cls, qdata: torch.Tensor, params: Params) -> torch.Tensor:
        group = params.convrot_groupsize if params.convrot else 0
        if params.smooth is None:
            return kernels.dequantize(qdata, params.scale, params.orig_dtype, rotate_group=group, validate=False)
        w = kernels.dequantize(qdata, params.scale, torch.float32, rotate_group=group, validate=False)
        return (w / params.smooth.float()).to(params.orig_dtype)

    @classmethod
    def requantize_kwargs(cls, qtensor: QuantizedTensor) -> dict[str, object]:
        out = super().requantize_kwargs(qtensor)
        p = qtensor._params
        out["smooth"] = getattr(p, "smooth", None)
        if out["is_weight"] and len(p.orig_shape) == 2:
            # A patched (LoRA-merged) weight gets a recalculated scale per row, also when the file had one
            # per tensor: a LoRA changes rows unevenly, and the kernels run both kinds at the same speed.
            out["per_channel"] = True
        return out


register_layout_class(LAYOUT_NAME, Int8W8A8Layout)


# ------------------------------------------------------------------ compiled graphs: the subclass metadata guard
_KITCHEN_FLATTEN = getattr(QuantizedTensor.__tensor_flatten__, "kitchen_flatten", QuantizedTensor.__tensor_flatten__)
_FLAT = "_int8_w8a8_flat"  # instance attribute: (params, layout name, kitchen's answer)


def _flatten(self):
    """Kitchen's ``QuantizedTensor.__tensor_flatten__``, answered once per weight for the pack's layout.

    A compiled graph with a QuantizedTensor weight carries one Python guard per weight that calls
    ``__tensor_flatten__()`` and compares its metadata before every call of the graph, and the graph's inputs are
    flattened through it again. Kitchen's builds the answer afresh each time (its Params' dataclass fields walked,
    the tensor fields re-attached, ~3.6 us): with it answered once, the guard check of a compiled Z-Image step
    (150 INT8 weights) went 7.53 -> 3.10 ms on the H200 (bench/NOTES.md item 42, ``bench/guard_report.py``). The
    answer depends only on the params object (a frozen dataclass) and the layout name, so it is kept with the weight
    and given again while both are the same; the ``_param_*`` attributes the first call attached stay those params'
    tensors. Other layouts (ComfyUI's FP8,
    kitchen's INT8) get kitchen's function unchanged. Callers only read the answer (Dynamo deep-copies what it
    keeps; ``__tensor_unflatten__`` copies its dicts)."""
    layout, params = self._layout_cls, self._params
    if layout != LAYOUT_NAME:
        return _KITCHEN_FLATTEN(self)
    kept = self.__dict__.get(_FLAT)
    if kept is not None and kept[0] is params and kept[1] == layout:
        return kept[2]
    flat = _KITCHEN_FLATTEN(self)
    self.__dict__[_FLAT] = (params, layout, flat)
    return flat


_flatten.kitchen_flatten = _KITCHEN_FLATTEN
QuantizedTensor.__tensor_flatten__ = _flatten


# ------------------------------------------------------------------ constructors and accessors
def make_weight(
    q: torch.Tensor,
    scale: torch.Tensor,
    orig_dtype: torch.dtype,
    rotate_group: int = 0,
    smooth: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Wrap int8 ``q [N, K]`` and float32 ``scale [N, 1]`` or ``[]`` as the pack's QuantizedTensor."""
    params = Int8W8A8Layout.Params(
        scale=scale, orig_dtype=orig_dtype, orig_shape=tuple(q.shape), is_weight=True,
        convrot=rotate_group > 0, convrot_groupsize=rotate_group or 256, smooth=smooth,
    )
    return QuantizedTensor(q, LAYOUT_NAME, params)


def is_int8_weight(t: object) -> bool:
    """A QuantizedTensor whose layout is (a subclass of) kitchen's tensor-wise INT8 layout."""
    return isinstance(t, QuantizedTensor) and issubclass(t.layout_cls, TensorWiseINT8Layout)


def rotate_group_of(params) -> int:
    return int(params.convrot_groupsize) if getattr(params, "convrot", False) else 0


class TracedWeight(NamedTuple):
    """What a compiled graph reads of a resident INT8 weight: its parts as plain tensors.

    ``qdata`` int8 ``[N, K]`` and ``scale`` float32 ``[N, 1]`` or ``[]`` are the weight's own tensors (no copy);
    ``smooth`` float32 ``[K]`` or None; ``rotate_group`` the ConvRot group (0: none). Dynamo guards a plain tensor
    with one check, where a QuantizedTensor weight brings a subtree of guards per weight (its inner tensors, params,
    layout and flatten metadata: bench/NOTES.md items 48 and 50), checked before every call of the graph."""

    qdata: torch.Tensor
    scale: torch.Tensor
    smooth: torch.Tensor | None
    rotate_group: int


def traced_parts(weight: QuantizedTensor) -> TracedWeight:
    """The ``TracedWeight`` of an INT8 weight (``is_int8_weight``)."""
    return _parts(weight._qdata, weight._params)


def _parts(qdata: torch.Tensor, p) -> TracedWeight:
    return TracedWeight(qdata, p.scale, getattr(p, "smooth", None), rotate_group_of(p))


def linear(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None, out_dtype: torch.dtype | None = None,
           lora=None, quant_in_graph: bool = False):
    """``x @ W.T + bias [+ low-rank term]`` for an INT8 QuantizedTensor ``W [N, K]`` (not transposed).

    ``lora``: an ``ops.lowrank.LowRank`` (a, b) fused into the GEMM epilogue. ``quant_in_graph``: see
    ``kernels.int8_linear``. Values of the scale are not re-checked here (no host sync in forward):
    loaders validate them.
    """
    return _linear(x, weight._qdata, weight._params, bias, out_dtype, lora, quant_in_graph)


def linear_parts(x: torch.Tensor, parts: TracedWeight, bias: torch.Tensor | None, out_dtype: torch.dtype,
                 lora=None, quant_in_graph: bool = False):
    """``linear`` on a weight's ``TracedWeight`` (what compiled graphs read instead of the QuantizedTensor)."""
    return kernels.int8_linear(
        x, parts.qdata, parts.scale, bias, out_dtype=out_dtype, smooth=parts.smooth, rotate_group=parts.rotate_group,
        validate=False, lora_a=None if lora is None else lora.a, lora_b=None if lora is None else lora.b,
        quant_in_graph=quant_in_graph,
    )


def _linear(x, qdata: torch.Tensor, p, bias, out_dtype=None, lora=None, quant_in_graph: bool = False):
    """``linear`` on a weight's parts: int8 ``qdata [N, K]`` and its params (only the scale, smoothing vector
    and rotation are read, so the params of a transposed or expanded view of the weight serve as well; the
    aten handlers pass those instead of building an untransposed wrapper per call)."""
    if isinstance(x, QuantizedTensor):  # an already-quantized activation: per-token dynamic quant wants floats
        x = x.dequantize()
    return linear_parts(x, _parts(qdata, p), bias, out_dtype or x.dtype, lora, quant_in_graph)


# ------------------------------------------------------------------ aten handlers for the layout
def _ours(t: object) -> bool:
    return isinstance(t, QuantizedTensor) and t._layout_cls == LAYOUT_NAME


def _is_weight_t(t: object, ndim: int) -> bool:
    """Our weight, logically transposed (``W.t()``), with ``ndim`` logical dims."""
    return _ours(t) and getattr(t._params, "transposed", False) and len(t._params.orig_shape) == ndim


@register_layout_op(aten.t.default, Int8W8A8Layout)
def _handle_t(qt, args, kwargs):
    t = args[0]
    if not _ours(t) or len(t._params.orig_shape) != 2:
        return aten.t.default(*dequantize_args(args), **dequantize_args(kwargs))
    p = t._params
    return QuantizedTensor(t._qdata, LAYOUT_NAME, dataclasses.replace(
        p, orig_shape=(p.orig_shape[1], p.orig_shape[0]), transposed=not p.transposed))


def _untransposed(w: QuantizedTensor) -> QuantizedTensor:
    p = w._params
    n, k = w._qdata.shape
    return QuantizedTensor(w._qdata, LAYOUT_NAME, dataclasses.replace(p, orig_shape=(n, k), transposed=False))


@register_layout_op(aten.linear.default, Int8W8A8Layout)
def _handle_linear(qt, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if _ours(w) and not w._params.transposed and len(w._params.orig_shape) == 2 and not _ours(x):
        return linear(x, w, bias)
    return torch.nn.functional.linear(*dequantize_args(args), **dequantize_args(kwargs))


@register_layout_op(aten.mm.default, Int8W8A8Layout)
def _handle_mm(qt, args, kwargs):
    x, w = args
    if _is_weight_t(w, 2) and not _ours(x):
        return _linear(x, w._qdata, w._params, None)
    return aten.mm.default(*dequantize_args(args), **dequantize_args(kwargs))


@register_layout_op(aten.addmm.default, Int8W8A8Layout)
def _handle_addmm(qt, args, kwargs):
    bias, x, w = args[:3]
    beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    if _is_weight_t(w, 2) and not _ours(x) and beta == 1 and alpha == 1 and not _ours(bias) and bias.dim() <= 1:
        return _linear(x, w._qdata, w._params, bias)
    return aten.addmm.default(*dequantize_args(args), **dequantize_args(kwargs))


@register_layout_op(aten.expand.default, Int8W8A8Layout)
def _handle_expand(qt, args, kwargs):
    w, size = args[0], list(args[1])
    if _is_weight_t(w, 2) and len(size) == 3:
        k, n = w._params.orig_shape
        if size[1] in (k, -1) and size[2] in (n, -1) and size[0] > 0:
            return QuantizedTensor(w._qdata, LAYOUT_NAME, dataclasses.replace(w._params, orig_shape=(size[0], k, n)))
    return aten.expand.default(*dequantize_args(args), **dequantize_args(kwargs))


@register_layout_op(aten.view.default, Int8W8A8Layout)
@register_layout_op(aten._unsafe_view.default, Int8W8A8Layout)
def _handle_view(qt, args, kwargs):
    t, size = args[0], list(args[1])
    if _ours(t) and size == list(t._params.orig_shape):  # matmul re-views the expanded weight as itself
        return QuantizedTensor(t._qdata, LAYOUT_NAME, t._params)  # a new wrapper: views may not return self
    return aten.view.default(*dequantize_args(args), **dequantize_args(kwargs))


@register_layout_op(aten.bmm.default, Int8W8A8Layout)
def _handle_bmm(qt, args, kwargs):
    x, w = args
    if _is_weight_t(w, 3) and not _ours(x) and x.dim() == 3 and x.shape[0] == w._params.orig_shape[0]:
        return _linear(x, w._qdata, w._params, None)
    if _ours(w) and len(w._params.orig_shape) == 3:  # an expanded weight in an unexpected bmm: dequantize it
        k, n = w._params.orig_shape[1:]
        full = _untransposed(QuantizedTensor(w._qdata, LAYOUT_NAME, dataclasses.replace(
            w._params, orig_shape=(k, n)))).dequantize().t().expand(w._params.orig_shape)
        return aten.bmm.default(dequantize_args(x), full)
    return aten.bmm.default(*dequantize_args(args), **dequantize_args(kwargs))
