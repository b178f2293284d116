"""LoRA on INT8 weights: merge into the int8 data, or add the low-rank term at run time.

Imports ``ops`` and ``kernels``.
"""
