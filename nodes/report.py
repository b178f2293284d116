"""Text a node shows after it ran: on the node itself and in the prompt's history.

ComfyUI's frontend draws a node's *progress text* under the node's widgets, for every node, output node or
not (ComfyUI's own Get Image Size node reports the size that way, through ``PromptServer.send_progress_text``);
a node's ``ui`` output reaches ``/history`` and the "executed" message, which ``web/reports.js`` shows on the
node (also when ComfyUI replays it for a cached output node) and sizes the node to. ``show`` does both. The
lines are logged where they are made (``ops.loader``, ``ops.saving``, ``lora.loading``), not here again.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def _prompt_server():
    """ComfyUI's running web server, or None (scripts and tests that run ComfyUI without its server).

    Looked up in ``sys.modules`` rather than imported: importing ``server`` outside ComfyUI's main would start
    loading the web stack, and a prompt without a server has nobody to show the text to.
    """
    module = sys.modules.get("server")
    cls = getattr(module, "PromptServer", None)
    return getattr(cls, "instance", None)


def show(node_cls, lines: Sequence[str]) -> dict:
    """Send ``lines`` to the frontend as the running node's progress text and return them as its ``ui`` output.

    ``node_cls``: the V3 node class ComfyUI runs (its ``hidden.unique_id`` names the node; the schema must
    list ``io.Hidden.unique_id``). Returns ``{"text": lines}`` for ``io.NodeOutput(..., ui=...)``.
    """
    lines = [str(line) for line in lines]
    node_id = getattr(getattr(node_cls, "hidden", None), "unique_id", None)
    server = _prompt_server()
    if node_id is not None and server is not None and lines:
        server.send_progress_text("\n".join(lines), node_id)
    return {"text": lines}
