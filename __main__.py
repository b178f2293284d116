"""Command line: ``python -m int8_w8a8 demo`` (see demo.py) and ``python -m int8_w8a8 info``.

``--help`` prints usage and exits 0; a bad command or argument prints argparse's usage and one error
line and exits 2.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "demo": "FLUX.2-shaped layers in BF16 and INT8 side by side (error and time per layer)",
    "info": "which kernels each device would use",
}


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, kernels

    print(f"int8_w8a8 {__version__}, torch {torch.__version__}")
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:
        backend = kernels.choose_backend(device)
        print(f"  {device}: {backend.name} kernels ({backend.reason})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import demo

    parser = argparse.ArgumentParser(prog="python -m int8_w8a8",
                                     description="INT8 W8A8 for ComfyUI: a demo of the kernels and what runs where.")
    sub = parser.add_subparsers(dest="command", metavar="{demo,info}", required=True)
    demo_parser = sub.add_parser("demo", help=COMMANDS["demo"], description=demo.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run_cli)
    sub.add_parser("info", help=COMMANDS["info"], description=COMMANDS["info"]).set_defaults(run=_info)
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)}")
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
