"""Command line: ``python -m int8_w8a8 demo`` (see demo.py) and ``python -m int8_w8a8 info``."""

from __future__ import annotations

import sys


def _info() -> int:
    import torch

    from . import __version__, kernels

    print(f"int8_w8a8 {__version__}, torch {torch.__version__}")
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:
        backend = kernels.choose_backend(device)
        print(f"  {device}: {backend.name} kernels ({backend.reason})")
    return 0


def main(argv: list[str]) -> int:
    commands = {"demo": None, "info": None}
    if not argv or argv[0] not in commands:
        print("usage: python -m int8_w8a8 {demo,info} [options]\n"
              "  demo  FLUX.2-shaped layers in BF16 and INT8 side by side (error and time per layer)\n"
              "  info  which kernels each device would use", file=sys.stderr)
        return 2
    if argv[0] == "info":
        return _info()
    from .demo import main as demo_main

    return demo_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
