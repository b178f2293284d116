"""INT8 W8A8 kernels: Triton on NVIDIA GPUs, a pure-torch twin everywhere else.

Public API (stable; ``int8_w8a8.kernels.reference`` has same-signature twins):

- ``quantize_rows(x, *, smooth=None, rotate_group=0) -> (q [M, K] int8, scale [M, 1] float32)``
- ``quantize_weight(w, *, per_row=True, seed=None, rotate_group=0, scale=None) -> (q [N, K] int8, scale)``
- ``int8_linear(x, q, scale, bias=None, *, out_dtype=None, smooth=None, rotate_group=0, validate=True,
  lora_a=None, lora_b=None, quant_in_graph=False) -> y`` (an optional LoRA term fused into the epilogue)
- ``dequantize(q, scale, dtype, *, rotate_group=0, validate=True) -> w``
- ``lora_rank_padded(r) -> int`` (the rank the LoRA epilogue runs at)
- ``kernels.fused``: LayerNorm/modulation, SwiGLU or GELU-tanh and q/k norm + RoPE fused with quantization, the
  gated residual add fused into the GEMM, and a SwiGLU's two up projections as one GEMM writing ``silu(g) * u``
  (Hopper; the fused blocks of ``ops/blocks/``)
- ``attention_8bit(q, k, v, *, scale=None) -> out`` (``kernels.attention``): INT8 Q K^T and a 16-bit (or 8-bit)
  P V on Hopper, its twin in ``kernels.reference_attention``

Importing this package needs only torch; Triton is imported on first use on a CUDA device.
"""

from . import (
    fused,  # noqa: F401  (the fused block kernels, kernels.fused.*)
    library,  # noqa: F401  (registers the int8_w8a8::* custom ops)
)
from .api import dequantize, int8_linear, lora_rank_padded, quantize_rows, quantize_weight
from .attention import attention_8bit  # also registers int8_w8a8::attention_8bit
from .dispatch import Backend, choose_backend

__all__ = [
    "Backend", "choose_backend", "dequantize", "int8_linear", "lora_rank_padded", "quantize_rows", "quantize_weight",
    "attention_8bit",
]
