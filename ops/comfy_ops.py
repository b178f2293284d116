"""``Int8Linear`` and the operations class handed to ComfyUI's model constructor (ComfyUI glue).

ComfyUI builds a model's layers from an "operations" namespace (``comfy.ops.manual_cast`` and
friends). ``make_operations(config)`` returns one whose ``Linear`` is ``Int8Linear`` bound to a
frozen ``LoadConfig``; everything else (norms, convolutions, embeddings) is ComfyUI's.

``Int8Linear`` holds either the pack's INT8 ``QuantizedTensor`` or a float weight:
* loading (``_load_from_state_dict``): takes one layer of a normalized state dict (see formats.py):
  INT8 data and scale are wrapped as they are; float and FP8 weights of layers the profile
  quantizes are converted here, one layer at a time, on the GPU when there is one;
* forward: a resident layer (where ComfyUI's own Linear would call F.linear directly) runs the weight's
  ``kernels.direct.LinearPlan`` (checks once per weight, launches recorded and replayed: the eager hot
  path), and so does ``run_quantized`` (the GEMMs of fused blocks); everything else goes through
  ``cast_bias_weight(..., offloadable=True, want_requant=True)`` so that ComfyUI's offloading, DynamicVRAM
  and LoRA-on-cast work, then the pack's kernel op. With weight functions attached (legacy lowvram LoRA) or
  forced casting it runs the float fallback;
* torch.compile: a resident layer hands the graph its weight's parts as plain tensors (``_traced``, a
  ``layout.TracedWeight`` kept in step with the weight by ``register_parameter``), so Dynamo guards two tensors
  per layer instead of a QuantizedTensor's subtree; other layers trace the cast path;
* LoRA merge (``convert_weight``/``set_weight``), saving (``state_dict``) and ``.to()`` (``_apply``)
  follow ComfyUI's mixed-precision ops, so core's patcher and savers treat it like a native layer.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import weakref

import comfy.model_management
import comfy.ops
import torch

from .. import kernels
from ..kernels.direct import LinearPlan
from . import layout
from .config import LoadConfig
from .formats import FP8_FORMATS, INT8_FORMAT, SMOOTH, Int8FormatError
from .lowrank import LowRank, stacked_down

logger = logging.getLogger(__name__)

_FP8_DTYPES = {name: dtype for dtype, name in FP8_FORMATS.items()}
# id(weight) -> (weak reference to the weight, bias, LinearPlan) of resident layers (Int8Linear._resident_plan);
# an entry goes when its weight is freed. (A WeakKeyDictionary would compare tensors with ==, and torch's
# WeakIdKeyDictionary costs ~7 us per lookup on a slow host: half a linear's budget.)
_PLANS: dict[int, tuple] = {}


def _drop_plan(key: int, ref: weakref.ref) -> None:
    entry = _PLANS.get(key)
    if entry is not None and entry[0] is ref:
        del _PLANS[key]


class Int8Linear(torch.nn.Module, comfy.ops.CastWeightBiasOp):
    """A Linear whose weight is the pack's INT8 QuantizedTensor or, for kept layers, a float tensor."""

    config: LoadConfig  # set on the per-load subclass made by make_operations
    int8_lora: LowRank | None = None  # a dynamic LoRA term, set per model clone by an object patch
    # How a merged (LoRA-patched) weight is requantized: "nearest" or "stochastic" (seeded by ComfyUI with a
    # hash of the layer name); set per clone by an object patch. Nearest is the default because it loses
    # ~1 dB less SQNR on a merge (bench/NOTES.md, "LoRA merge").
    int8_merge_rounding: str = "nearest"
    # ComfyUI sets this per instance (ModelPatcher.force_cast_weights) and reads it with getattr(..., False); the
    # class default makes that read a plain attribute lookup on every forward instead of nn.Module.__getattr__'s
    # failed search (an AttributeError raised and caught: ~2 us of a resident layer's host time)
    comfy_force_cast_weights: bool = False
    # CastWeightBiasOp's default, again here: a compiled graph that reads it guards every class of the MRO up to
    # the one that defines it (Module and CastWeightBiasOp add two dict checks per layer and read)
    comfy_cast_weights: bool = False
    # The weight's parts as plain tensors, for compiled graphs (``_traced_now``); kept in step with the weight by
    # ``register_parameter`` (every way ComfyUI and torch replace a weight: assignment, set_attr_param, ``.to()``
    # through ``_apply``, loading); absent for a float weight and when the load's ``traced_weights`` is off.
    _traced: layout.TracedWeight | None = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.factory_kwargs = {"device": device, "dtype": dtype}
        self.weight = None  # created by _load_from_state_dict: int8 or float, decided per layer
        self.quant_format = None
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self):
        return None

    def register_parameter(self, name: str, param) -> None:
        super().register_parameter(name, param)
        if name == "weight":
            self._refresh_traced()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        if name == "weight":
            self._refresh_traced()

    def _refresh_traced(self) -> None:
        """Rebuild ``_traced`` from the registered weight (dropped for a float or no weight, and when the load's
        ``traced_weights`` is off). The parts are the weight's own tensors: kitchen's in-place ``copy_`` of a weight
        copies into them and keeps them right."""
        w = self._parameters.get("weight")
        config = getattr(type(self), "config", None)
        if layout.is_int8_weight(w) and (config is None or config.traced_weights):
            self.__dict__["_traced"] = layout.traced_parts(w)
        else:
            self.__dict__.pop("_traced", None)

    # ---------------------------------------------------------------- loading
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        layer = prefix[:-1]
        weight = state_dict.pop(f"{prefix}weight", None)
        scale = state_dict.pop(f"{prefix}weight_scale", None)
        conf = state_dict.pop(f"{prefix}comfy_quant", None)
        smooth = state_dict.pop(f"{prefix}{SMOOTH}", None)
        state_dict.pop(f"{prefix}input_scale", None)
        if weight is not None:
            built = self._build_weight(layer, weight, scale, conf, smooth)
            self.weight = torch.nn.Parameter(built, requires_grad=False)
            self.quant_format = INT8_FORMAT if layout.is_int8_weight(built) else None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if weight is not None and f"{prefix}weight" in missing_keys:
            missing_keys.remove(f"{prefix}weight")

    def _build_weight(self, layer: str, weight: torch.Tensor, scale, conf, smooth=None) -> torch.Tensor:
        cfg = self.config
        info = json.loads(bytes(conf.to(torch.uint8).cpu().numpy().tobytes())) if conf is not None else {}
        fmt = info.get("format")
        target = self.factory_kwargs["device"] or weight.device
        logical = self.factory_kwargs["dtype"] or torch.bfloat16
        if fmt == INT8_FORMAT:
            group = int(info.get("convrot_groupsize", 256)) if info.get("convrot") else 0
            return layout.make_weight(weight.to(target), scale.to(target, torch.float32), logical, rotate_group=group,
                                      smooth=None if smooth is None else smooth.to(target, torch.float32))
        if fmt in _FP8_DTYPES:  # scaled FP8: back to float first
            device = cfg.compute_device or weight.device
            weight = weight.to(device).float() * scale.to(device, torch.float32)
        if weight.is_floating_point() and weight.dim() == 2 and cfg.converts(layer):
            return self._convert(layer, weight, target, logical)
        return weight.to(device=target, dtype=logical if weight.is_floating_point() else weight.dtype)

    def _convert(self, layer: str, weight: torch.Tensor, target, logical: torch.dtype):
        cfg = self.config
        opts = cfg.convert
        group = opts.rotate_group if opts.rotate_group and weight.shape[1] % opts.rotate_group == 0 else 0
        if opts.rotate_group and not group:
            logger.info("int8_w8a8: %s: ConvRot group %d does not divide %d input features; no rotation",
                        layer, opts.rotate_group, weight.shape[1])
        try:
            w = weight.to(cfg.compute_device or weight.device)
            if cfg.prepare is not None:
                w = cfg.prepare(layer, w)
            q, s = kernels.quantize_weight(w, per_row=opts.per_row, seed=opts.seed, rotate_group=group)
        except ValueError as exc:
            raise Int8FormatError(f"{cfg.source}: layer '{layer}': cannot quantize: {exc}") from exc
        if cfg.progress is not None:
            cfg.progress(layer)
        return layout.make_weight(q.to(target), s.to(target), logical, rotate_group=group)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]``. Two paths, chosen per call:

        * resident (the weight is where ComfyUI keeps it, ``comfy_cast_weights`` off, no weight/bias functions,
          no forced casting, eager, a plain tensor input): ComfyUI's cast path would hand the weight over
          unchanged (``disable_weight_init.Linear`` calls ``F.linear`` directly in that case), so the layer's
          ``kernels.direct.LinearPlan`` runs the kernels with the per-call checks hoisted and the launches
          replayed; with a dynamic LoRA term, ``LinearPlan.linear_lora`` (the term's down projection by torch, as
          in the public kernel API, its up projection in the replayed GEMM's epilogue);
        * traced (torch.compile, the same rule): the kernel op on the weight's plain
          parts (``_traced``), with the dynamic LoRA term in the epilogue;
        * cast (offloaded, lowvram, DynamicVRAM, lowvram LoRA patches, anything the plan declines):
          ``cast_bias_weight(..., offloadable=True, want_requant=True)``, then the kernel op.
        """
        comfy.ops.run_every_op()
        if torch.compiler.is_compiling():
            traced = self._traced_now()
            if traced is not None and traced.qdata.device == x.device and type(x) is torch.Tensor:
                bias = self.bias
                return layout.linear_parts(x, traced, None if bias is None else bias.to(x.dtype), x.dtype,
                                           lora=self.int8_lora, quant_in_graph=self.config.quant_in_graph)
        elif type(x) is torch.Tensor:
            plan = self._plan_if_resident()
            if plan is not None:
                term = self.int8_lora
                if term is None:
                    y = plan(x)
                elif x.device == plan.device:
                    y = plan.linear_lora(x, term.a, term.b)
                    if y is None:  # a smoothed weight: the public API
                        y = layout.linear(x, self.weight, plan.bias_for(x.dtype), x.dtype, lora=term)
                else:
                    y = None
                if y is not None:
                    return y
        return self._forward_cast(x)

    def _plan_if_resident(self) -> LinearPlan | None:
        """The weight's ``LinearPlan`` when ComfyUI's cast path would hand the weight over unchanged (eager,
        ``comfy_cast_weights`` off, no weight/bias functions, no forced casting, an INT8 weight), else None."""
        if torch.compiler.is_compiling() or _streamed(self):
            return None
        return self._resident_plan()

    def _traced_now(self) -> layout.TracedWeight | None:
        """While torch.compile traces: the weight's ``TracedWeight`` when ComfyUI's cast path would hand the weight
        over unchanged (``_plan_if_resident``'s rule), else None. The graph then reads two plain tensors per layer
        instead of the QuantizedTensor; the caller checks the device.

        DynamicVRAM needs no rule of its own: ComfyUI gives a layer its VBAR buffer ``_v`` only in
        ``ModelPatcherDynamic.load``, right after setting ``comfy_cast_weights``, which it never clears. Reading
        ``_v`` would cost every call of the graph a ``hasattr`` guard per layer (nn.Module.__getattr__ raising,
        ~2 us; Dynamo does not guard the cheap ``"_v" in __dict__`` at all: bench/NOTES.md item 54)."""
        if _streamed(self):
            return None
        return self._traced

    def _resident_plan(self) -> LinearPlan | None:
        """The ``LinearPlan`` of the current INT8 weight and bias, or None for a float weight.

        Plans are kept per weight object, never on the module, and dropped with their weight: a replaced weight
        (a LoRA merge, unpatching, ``.to()`` when ComfyUI offloads) frees its plan, and with it the device
        tensors the plan references, as soon as ComfyUI drops the weight."""
        params = self._parameters
        w, bias = params.get("weight"), params.get("bias")
        entry = _PLANS.get(id(w))
        if entry is not None and entry[0]() is w and entry[1] is bias:
            return entry[2]
        if not layout.is_int8_weight(w):
            return None
        p = w._params
        plan = LinearPlan(w._qdata, p.scale, bias, getattr(p, "smooth", None), layout.rotate_group_of(p))
        key = id(w)
        _PLANS[key] = (weakref.ref(w, functools.partial(_drop_plan, key)), bias, plan)
        return plan

    def _forward_cast(self, x: torch.Tensor) -> torch.Tensor:
        """Through ComfyUI's cast path: offloading, DynamicVRAM and LoRA-on-cast work (see the class docstring)."""
        w = self.weight
        fast = (layout.is_int8_weight(w) and not self.weight_function and not self.bias_function
                and not self.comfy_force_cast_weights)
        if fast:
            weight, bias, offload = comfy.ops.cast_bias_weight(
                self, input=None, dtype=w.dtype, device=x.device, bias_dtype=x.dtype, offloadable=True,
                compute_dtype=x.dtype, want_requant=True)
            term = self.int8_lora
            if layout.is_int8_weight(weight):
                # the LoRA term is fused into the GEMM epilogue
                y = layout.linear(x, weight, bias, x.dtype, lora=term, quant_in_graph=self.config.quant_in_graph)
                term = None
            else:  # a cast path that returned floats (e.g. a DynamicVRAM layer run on the CPU)
                y = torch.nn.functional.linear(x, weight.to(x.dtype), bias)
        else:
            weight, bias, offload = comfy.ops.cast_bias_weight(self, x, offloadable=True)
            y = torch.nn.functional.linear(x, weight, bias)
            term = self.int8_lora
        comfy.ops.uncast_bias_weight(self, weight, bias, offload)
        return y if term is None else term.apply(x, y)

    def fusable(self) -> bool:
        """Whether a fused block may feed this layer pre-quantized rows (``run_quantized``): an INT8 weight
        without smoothing and no weight functions (lowvram LoRA) or forced casting. A ConvRot weight is fusable:
        the rows must then be rotated by ``input_rotation()`` before they are quantized. A dynamic LoRA term
        (``int8_lora``) is fusable too: ``run_quantized`` adds it."""
        if torch.compiler.is_compiling():
            traced = self._traced_now()
            if traced is not None:
                return traced.smooth is None
        w = self.weight
        if not layout.is_int8_weight(w) or self.weight_function or self.bias_function:
            return False
        return not self.comfy_force_cast_weights and getattr(w._params, "smooth", None) is None

    def input_rotation(self) -> int:
        """The ConvRot group the rows given to ``run_quantized`` must be rotated by (0: none)."""
        if torch.compiler.is_compiling():
            traced = self._traced_now()
            if traced is not None:
                return traced.rotate_group
        w = self.weight
        return layout.rotate_group_of(w._params) if layout.is_int8_weight(w) else 0

    def run_quantized(self, xq: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype,
                      residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                      lora_h: torch.Tensor | None = None) -> torch.Tensor:
        """The layer on rows a fused kernel already quantized (only when ``fusable()``; rotated by
        ``input_rotation()``, as the stored weight is).

        xq int8 [M, K], x_scale float32 [M] -> y [M, N] in out_dtype; with ``residual`` ([B, S, N],
        contiguous) and ``gate`` ([B, 1, N]) it returns ``residual += gate * y`` computed in the GEMM's
        epilogue, in place. A resident layer (``forward``'s rule) runs its ``LinearPlan`` (launches recorded once
        per input specialization and replayed); otherwise the weight comes through ComfyUI's cast path, so
        offloading, lowvram and DynamicVRAM work.

        A dynamic LoRA term (``int8_lora``: ``a [R, K]``, ``b [N, R]``) is part of ``y`` (inside the gate) on both
        paths: its down projection runs on the same int8 rows, ``h = (xq @ a_q.T) * x_scale * a_scale`` with ``a``
        rotated by the layer's group and quantized per rank (``LowRank.int8_down``; one INT8 GEMM of R columns,
        ``kernels.fused.lora_down``), and ``h @ b.T`` is accumulated in the GEMM's float32 epilogue, so the
        output is still written once. h thus sees the layer's own activation quantization (as the main product
        does) plus the rounding of ``a`` to int8 (~40 dB for Gaussian rows; bench/NOTES.md, "Dynamic LoRA in the
        fused blocks"). ``lora_h``: that ``h [M, R]`` computed already (``run_quantized_shared``), or None.
        """
        comfy.ops.run_every_op()
        term = self.int8_lora
        if term is None:
            lora_h = lora_b = None
        else:
            lora_b = term.b
            if lora_h is None:
                # the rotation is read only where it is used (a few us a call, 12 calls a Qwen-Image block)
                a_q, a_scale = term.int8_down(self.input_rotation())
                lora_h = kernels.fused.lora_down(xq, x_scale, a_q, a_scale, lora_b.dtype)
        traced = _traced_operands(self, xq.device, out_dtype)
        if traced is not None:
            return _gemm_quantized(xq, x_scale, *traced, out_dtype, residual, gate, lora_h, lora_b)
        plan = self._plan_if_resident()
        if plan is not None:
            y = (plan.gemm(xq, x_scale, out_dtype, lora_h, lora_b) if residual is None
                 else plan.gemm_residual(xq, x_scale, out_dtype, residual, gate, lora_h, lora_b))
            if y is not None:
                return y
        weight, bias, offload = _cast_for_rows(self, xq.device, out_dtype)
        if layout.is_int8_weight(weight):
            y = _gemm_quantized(xq, x_scale, weight._qdata, weight._params.scale, bias, out_dtype, residual, gate,
                                lora_h, lora_b)
        else:  # a cast path that returned floats (a DynamicVRAM layer run on the CPU), the rotation undone
            x = kernels.dequantize(xq, x_scale.reshape(-1, 1).float(), out_dtype, rotate_group=self.input_rotation())
            y = torch.nn.functional.linear(x, weight.to(out_dtype), bias)
            if term is not None:
                y = term.apply(x, y)
            if residual is not None:
                y = residual.add_((gate * y.view(residual.shape)).to(residual.dtype))
        comfy.ops.uncast_bias_weight(self, weight, bias, offload)
        return y

    # ---------------------------------------------------------------- patcher / saving hooks
    def convert_weight(self, weight, inplace=False, **kwargs):
        return weight.dequantize() if layout.is_int8_weight(weight) else weight

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        if layout.is_int8_weight(self.weight):
            seed = seed if self.int8_merge_rounding == "stochastic" else None
            weight = self.weight.requantize_from_float(weight, scale="recalculate", stochastic_rounding=seed,
                                                       inplace_ops=True).to(self.weight.dtype)
        else:
            weight = weight.to(self.weight.dtype)
        if return_weight:
            return weight
        assert inplace_update is False  # ComfyUI never patches these layers in place
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def state_dict(self, *args, destination=None, prefix="", **kwargs):
        sd = destination if destination is not None else {}
        return comfy.ops._quantized_weight_state_dict(self, sd, prefix)

    def _apply(self, fn, recurse=True):
        return comfy.ops._quantized_apply(self, fn, recurse)


def _streamed(layer: Int8Linear) -> bool:
    """Whether ComfyUI's cast path may hand ``layer``'s weight over changed: cast per call (``comfy_cast_weights``:
    lowvram, DynamicVRAM), weight or bias functions (LoRA on cast), forced casting. Otherwise it hands the stored
    weight over as it is, and the layer's resident forms (``LinearPlan``, ``_traced``) give the same answer. A
    function, not a method: a compiled read of a method guards each layer's instance dict for it."""
    return bool(layer.comfy_cast_weights or layer.weight_function or layer.bias_function
                or layer.comfy_force_cast_weights)


def _traced_operands(layer: Int8Linear, device: torch.device, out_dtype: torch.dtype) -> tuple | None:
    """While torch.compile traces: ``(q [N, K], scale, bias in out_dtype)`` of ``layer``'s weight as the graph reads
    it (``Int8Linear._traced_now``) when it is on ``device``; else None (eager, or a weight the cast path streams)."""
    traced = layer._traced_now() if torch.compiler.is_compiling() else None
    if traced is None or traced.qdata.device != device:
        return None
    return traced.qdata, traced.scale, None if layer.bias is None else layer.bias.to(out_dtype)


def _cast_for_rows(layer: Int8Linear, device: torch.device, out_dtype: torch.dtype) -> tuple:
    """ComfyUI's cast path for a GEMM on rows quantized before it (offloading, lowvram, DynamicVRAM): ``(weight,
    bias in out_dtype, offload)``, an INT8 weight handed over as it is; ``comfy.ops.uncast_bias_weight`` releases it."""
    return comfy.ops.cast_bias_weight(layer, input=None, dtype=layer.weight.dtype, device=device, bias_dtype=out_dtype,
                                      offloadable=True, compute_dtype=out_dtype, want_requant=True)


def _gemm_quantized(xq, x_scale, q, scale, bias, out_dtype, residual, gate, lora_h, lora_b) -> torch.Tensor:
    """``Int8Linear.run_quantized``'s GEMM on a weight's int8 ``q [N, K]`` and ``scale``: ``y [M, N]``, or
    ``residual += gate * y`` in place when ``residual`` is given."""
    if residual is not None:
        return kernels.fused.int8_gemm_residual(xq, x_scale, q, scale, bias, residual, gate, lora_h, lora_b)
    return kernels.fused.int8_gemm(xq, x_scale, q, scale, bias, out_dtype, lora_h, lora_b)


def run_quantized_shared(layers, xq: torch.Tensor, x_scale: torch.Tensor,
                         out_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """``layer.run_quantized(xq, x_scale, out_dtype)`` for each of ``layers`` (``Int8Linear``, fusable, one ConvRot
    group), which read one quantization of the same rows (q/k/v, w1/w3), with their dynamic LoRA terms' down
    projections in one INT8 GEMM: ``h`` of every term at once (``lowrank.stacked_down``), each layer given its
    columns. Bit-identical to one GEMM per term; one launch of a GEMM too narrow to fill the GPU instead of one per
    layer. Layers without a term run as they are; fewer than two terms, or a traced call, take the per-layer path."""
    terms = [layer.int8_lora for layer in layers]
    with_term = [t for t in terms if t is not None]
    if len(with_term) < 2 or torch.compiler.is_compiling() or len({t.b.dtype for t in with_term}) != 1:
        return tuple(layer.run_quantized(xq, x_scale, out_dtype) for layer in layers)
    a_q, a_scale = stacked_down(with_term, layers[0].input_rotation())
    h = kernels.fused.lora_down(xq, x_scale, a_q, a_scale, with_term[0].b.dtype)
    out, col = [], 0
    for layer, term in zip(layers, terms, strict=True):
        if term is None:
            out.append(layer.run_quantized(xq, x_scale, out_dtype))
            continue
        r = term.a.shape[0]
        out.append(layer.run_quantized(xq, x_scale, out_dtype, lora_h=h[:, col:col + r]))
        col += r
    return tuple(out)


@contextlib.contextmanager
def _gemm_operands(layer: Int8Linear, device: torch.device, out_dtype: torch.dtype):
    """``(q [N, K], scale, bias in out_dtype)`` of ``layer``'s INT8 weight from where ``run_quantized`` takes it:
    the traced parts under torch.compile, the resident ``LinearPlan``, or ComfyUI's cast path (offloading, lowvram,
    DynamicVRAM: ComfyUI's default memory mode), whose weight is released when the ``with`` block ends. None where
    the cast path hands over a float weight (a DynamicVRAM layer run on the CPU)."""
    ops = _traced_operands(layer, device, out_dtype)
    plan = layer._plan_if_resident() if ops is None else None
    if plan is not None and plan.device == device:
        ops = plan.q, plan.scale, plan.bias_for(out_dtype)
    if ops is not None:
        yield ops
        return
    weight, bias, offload = _cast_for_rows(layer, device, out_dtype)
    try:
        yield (weight._qdata, weight._params.scale, bias) if layout.is_int8_weight(weight) else None
    finally:
        comfy.ops.uncast_bias_weight(layer, weight, bias, offload)


def _parts(operands: tuple, *sizes: int) -> tuple[tuple, ...]:
    """One weight's ``(q [N, K], scale, bias)`` as consecutive row blocks of ``sizes`` (summing to N), each its own
    ``(q, scale, bias)`` (a per-tensor scale shared)."""
    q, scale, bias = operands
    out, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        out.append((q[rows], scale[rows] if scale.dim() else scale, None if bias is None else bias[rows]))
        start += size
    return tuple(out)


def _glu_width(xq: torch.Tensor, gate: Int8Linear, up: Int8Linear | None, head: int) -> int | None:
    """F, the SwiGLU's width, where ``run_glu`` / ``run_head_and_glu`` take the SwiGLU GEMM for these layers, else
    None, decided on the rows and shapes before any weight is cast: ``kernels.fused.glu_gemm_rule`` (Hopper's Gluon
    row; checked first on the rows alone, so elsewhere no layer attribute is read: a compiled graph guards what it
    reads), no dynamic LoRA term (the SwiGLU GEMM has no LoRA epilogue), widths that pair up."""
    if kernels.fused.glu_gemm_rule(xq) is not None:
        return None
    layers = (gate,) if up is None else (gate, up)
    if any(layer.int8_lora is not None for layer in layers):
        return None
    (n, k), (n_up, k_up) = _weight_shape(gate), _weight_shape(up if up is not None else gate)
    f = (n - head) // 2 if up is None else n
    if f <= 0 or (up is None and head + 2 * f != n) or (up is not None and (n_up, k_up) != (f, k)):
        return None
    return f if kernels.fused.glu_gemm_rule(xq, f) is None else None


def _weight_shape(layer: Int8Linear) -> tuple[int, int]:
    """(N, K) of ``layer``'s weight: under torch.compile from its traced int8 data where it has one (whose shape the
    graph's tensor guard covers already; reading ``out_features`` would add a guard a layer), else the layer's."""
    if torch.compiler.is_compiling():
        traced = layer._traced_now()
        if traced is not None:
            return tuple(traced.qdata.shape)
    return layer.out_features, layer.in_features


def run_glu(xq: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype, gate: Int8Linear,
            up: Int8Linear | None = None) -> torch.Tensor | None:
    """``h [M, F] = silu(gate(x)) * up(x)`` for rows a fused kernel quantized (``xq`` int8 ``[M, K]``, ``x_scale``
    float32 ``[M]``) as one GEMM that writes only ``h`` (``kernels.fused.glu_gemm``), or None where that GEMM does
    not run and the caller runs the layers and ``glu_quantize`` (``_glu_width``: Hopper's Gluon row, no dynamic
    LoRA term). ``gate`` and ``up``: two fusable layers of one width fed the same rows (Z-Image's w1 and w3);
    ``up`` None: ``gate``'s output halves ``[g | u]`` (FLUX.2's MLP input layer). The weights come as
    ``run_quantized`` takes them: resident, traced, or through ComfyUI's cast path (DynamicVRAM, offloading)."""
    f = _glu_width(xq, gate, up, 0)
    if f is None:
        return None
    with contextlib.ExitStack() as held:
        ops = held.enter_context(_gemm_operands(gate, xq.device, out_dtype))
        other = ops if up is None else held.enter_context(_gemm_operands(up, xq.device, out_dtype))
        if ops is None or other is None:
            return None
        comfy.ops.run_every_op()
        pair = _parts(ops, f, f) if up is None else (ops, other)
        return kernels.fused.glu_gemm(xq, x_scale, *pair, out_dtype)


def run_head_and_glu(layer: Int8Linear, xq: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype,
                     head: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A layer whose outputs are ``[y_head | g | u]`` (FLUX.2's single-block linear1: q/k/v, then the MLP's gate
    and up halves) on rows a fused kernel quantized: ``(y_head [M, head], h [M, F] = silu(g) * u)`` in one launch
    of the SwiGLU GEMM's kernel (``kernels.fused.split_glu_gemm``; ``run_glu``'s rules and weights; None where they
    fail, and the caller runs the layer whole)."""
    if _glu_width(xq, layer, None, head) is None:
        return None
    with _gemm_operands(layer, xq.device, out_dtype) as ops:
        if ops is None:
            return None
        comfy.ops.run_every_op()
        return kernels.fused.split_glu_gemm(xq, x_scale, *ops, head, out_dtype)


def make_operations(config: LoadConfig) -> type:
    """A ComfyUI operations class for one load: ComfyUI's manual_cast ops with ``Int8Linear``."""

    linear = type("Linear", (Int8Linear,), {"config": config, "__module__": __name__})
    return type("Int8Operations", (comfy.ops.manual_cast,), {"Linear": linear, "__module__": __name__})


def default_compute_device() -> str | None:
    """Where to quantize float weights on load: ComfyUI's torch device when it is a GPU."""
    device = comfy.model_management.get_torch_device()
    return None if comfy.model_management.is_device_cpu(device) else str(device)
