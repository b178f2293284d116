"""INT8 W8A8 kernels: Triton on NVIDIA GPUs, a pure-torch twin everywhere else.

Public API (stable; ``int8_w8a8.kernels.reference`` has same-signature twins):

- ``quantize_rows(x, *, smooth=None, rotate_group=0) -> (q [M, K] int8, scale [M, 1] float32)``
- ``quantize_weight(w, *, per_row=True, seed=None, rotate_group=0) -> (q [N, K] int8, scale)``
- ``int8_linear(x, q, scale, bias=None, *, out_dtype=None, smooth=None, rotate_group=0) -> y``
- ``dequantize(q, scale, dtype, *, rotate_group=0) -> w``

Importing this package needs only torch; Triton is imported on first use on a CUDA device.
"""

from . import library  # noqa: F401  (registers the int8_w8a8::* custom ops)
from .api import dequantize, int8_linear, quantize_rows, quantize_weight
from .dispatch import Backend, choose_backend

__all__ = ["Backend", "choose_backend", "dequantize", "int8_linear", "quantize_rows", "quantize_weight"]
