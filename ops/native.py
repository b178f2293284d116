"""Route models loaded by ComfyUI's stock "Load Diffusion Model" onto the pack's kernels (ComfyUI glue).

ComfyUI maps the ``int8_tensorwise`` format to a comfy-kitchen layout by name
(``comfy.quant_ops.QUANT_ALGOS["int8_tensorwise"]["comfy_tensor_layout"]``). Pointing that entry at
``Int8W8A8Layout`` (a subclass of kitchen's layout, same parameters) makes every native INT8 file
that the stock loader reads hold the pack's QuantizedTensor, whose matmuls run on the pack's
kernels and whose LoRA requantization uses the pack's seeded rounding. Set
``INT8_W8A8_NATIVE=0`` to leave ComfyUI's own kernels in charge.
"""

from __future__ import annotations

import logging
import os

from .layout import LAYOUT_NAME

logger = logging.getLogger(__name__)

ENV = "INT8_W8A8_NATIVE"
_FORMAT = "int8_tensorwise"


def enabled_by_environment() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def install() -> str | None:
    """Point ComfyUI's int8_tensorwise format at the pack's layout; returns the layout it replaced.

    Returns None (and logs why) when disabled by the environment or when this ComfyUI has no native
    INT8 format (older than 0.27).
    """
    if not enabled_by_environment():
        logger.info("int8_w8a8: %s=0, native int8_tensorwise models keep ComfyUI's kernels", ENV)
        return None
    import comfy.quant_ops

    algo = comfy.quant_ops.QUANT_ALGOS.get(_FORMAT)
    if algo is None:
        logger.info("int8_w8a8: this ComfyUI has no native %s format; only the pack's loader is available", _FORMAT)
        return None
    previous = algo["comfy_tensor_layout"]
    algo["comfy_tensor_layout"] = LAYOUT_NAME
    if previous != LAYOUT_NAME:
        logger.info("int8_w8a8: native %s models now run on the pack's kernels (was %s)", _FORMAT, previous)
    return previous


def uninstall(previous: str = "TensorWiseINT8Layout") -> None:
    """Give the format back to ``previous`` (comfy-kitchen's layout)."""
    import comfy.quant_ops

    algo = comfy.quant_ops.QUANT_ALGOS.get(_FORMAT)
    if algo is not None:
        algo["comfy_tensor_layout"] = previous
