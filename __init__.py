"""int8-w8a8: diffusion transformers with INT8 weights and INT8 activations (W8A8) in ComfyUI.

Importing the package needs neither ComfyUI nor a GPU; ComfyUI finds the nodes through
``comfy_entrypoint`` (V3 node API), which imports the ComfyUI-facing modules only when called.
"""

__version__ = "0.1.0"

# Frontend code ComfyUI serves for the pack: web/reports.js shows the nodes' reports on the nodes.
WEB_DIRECTORY = "web"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: the pack's ``ComfyExtension``."""
    from .nodes import Int8W8A8Extension

    return Int8W8A8Extension()
