"""ComfyUI nodes (V3 API): thin wrappers that parse inputs and call ``ops`` (and ``lora``).

Importing this package needs no ComfyUI; the node classes are built on first access, inside
ComfyUI, by ``node_list()``.
"""

from __future__ import annotations

import functools


@functools.cache
def node_list() -> tuple:
    """The pack's node classes (imports ComfyUI)."""
    from . import lora_nodes, model_nodes

    return (
        model_nodes.Int8DiffusionModelLoader, model_nodes.Int8QuantizeModel, model_nodes.Int8SaveModel,
        lora_nodes.Int8LoraMerge, lora_nodes.Int8LoraMergeStack, lora_nodes.Int8LoraDynamic,
        lora_nodes.Int8LoraDynamicStack, lora_nodes.Int8LoraStack,
    )


def __getattr__(name: str):
    # The extension class subclasses ComfyUI's ComfyExtension, so it is built on first access.
    if name == "Int8W8A8Extension":
        from comfy_api.latest import ComfyExtension

        class Int8W8A8Extension(ComfyExtension):
            async def on_load(self) -> None:
                from ..ops import native

                native.install()

            async def get_node_list(self) -> list:
                return list(node_list())

        globals()[name] = Int8W8A8Extension
        return Int8W8A8Extension
    raise AttributeError(name)
