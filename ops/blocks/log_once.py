"""One log line per process for a fused-block decision, callable from eager and compiled code alike."""

from __future__ import annotations

import logging

import torch


def log_once(logger: logging.Logger, logged: set, key: tuple, message: str, *args) -> None:
    """Log ``message % args`` at INFO on ``logger`` the first time ``key`` is met (``logged``: the caller's set of
    keys already logged). Traced calls log nothing (logging would break the graph), and ``is_compiling()`` is tested
    before the set: a traced membership test would become a guard on the set, and the first eager log line after a
    compile would recompile the whole model."""
    if not torch.compiler.is_compiling() and key not in logged:
        logged.add(key)
        logger.info(message, *args)
