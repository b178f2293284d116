"""The INT8 weight format and the ``Int8Linear`` op (ComfyUI integration).

Holds the pack's ``QuantizedTensor`` layout, the readers/writers of INT8 checkpoint formats, the
BF16 -> INT8 converter and the model profiles. Imports ``kernels``; imports ComfyUI only inside
its glue modules.
"""
