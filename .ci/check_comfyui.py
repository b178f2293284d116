"""Fail loudly when the ComfyUI at COMFYUI_PATH does not import; run before pytest when the tier is on.

The integration tier's fixture skips every test when ComfyUI does not import (right for a user without
ComfyUI), so a missing package would turn all of them into skips while pytest exits 0. This imports what
the tier uses (comfy.sd, nodes, execution), on the CPU when there is no GPU as the fixture does, and
exits 1 with the error and what to install.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    path = os.environ.get("COMFYUI_PATH", "")
    if not os.path.isfile(os.path.join(path, "comfy", "sd.py")):
        print(f"check_comfyui: COMFYUI_PATH={path!r} is not a ComfyUI checkout (no comfy/sd.py)", file=sys.stderr)
        return 1
    sys.path.insert(0, path)
    try:
        import torch
        from comfy.cli_args import args

        args.cpu = not torch.cuda.is_available()  # before comfy.model_management is imported
        import comfy.sd  # noqa: F401
        import comfyui_version
        import execution  # noqa: F401

        import nodes  # noqa: F401
    except Exception as exc:  # an ImportError, or a module failing at import time: all mean "tier off"
        print(f"check_comfyui: ComfyUI at {path} does not import: {type(exc).__name__}: {exc}\n"
              f"  install its requirements into this Python ({sys.executable}):\n"
              f"  {sys.executable} -m pip install -r {os.path.join(path, 'requirements.txt')}", file=sys.stderr)
        return 1
    print(f"check_comfyui: ComfyUI {comfyui_version.__version__} at {path} imports (comfy.sd, nodes, execution); "
          f"torch {torch.__version__}, {'GPU' if torch.cuda.is_available() else 'CPU'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
