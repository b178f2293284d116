"""ComfyUI nodes (V3 API): thin wrappers that parse inputs and call ``ops`` and ``lora``."""

from __future__ import annotations


def _node_list() -> list:
    """The node classes this version of the pack provides."""
    return []


def __getattr__(name: str):
    # The extension class subclasses ComfyUI's ComfyExtension, so it is built on first access:
    # importing this package must keep working without ComfyUI.
    if name == "Int8W8A8Extension":
        from comfy_api.latest import ComfyExtension

        class Int8W8A8Extension(ComfyExtension):
            async def get_node_list(self) -> list:
                return _node_list()

        globals()[name] = Int8W8A8Extension
        return Int8W8A8Extension
    raise AttributeError(name)
