"""``python -m int8_w8a8 demo``: FLUX.2-shaped layers in BF16 and INT8 W8A8, side by side.

Builds one linear layer of each kind a FLUX.2 klein transformer has (attention qkv and output,
SwiGLU in/out of the double blocks, the fused linear1/linear2 of the single blocks, and the
batch-1 modulation), with random weights, quantizes them per row, and prints for each the error
against a float64 reference and the time of BF16 ``F.linear`` and of the INT8 kernels. On a GPU
the default is klein 4B at 1024x1024 (hidden 3072, 4608 tokens); on a CPU a smaller model of the
same shape family so that it finishes in seconds. On a CPU the INT8 side runs the pure-torch
reference path (the Triton kernels need an NVIDIA GPU): the errors are those of the GPU kernels, the
times are not, and INT8 comes out slower than BF16 there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels
from .kernels import reference


@dataclass(frozen=True)
class LayerSpec:
    """One linear layer: ``name``, input width as a multiple of hidden, output width, tokens."""

    name: str
    k_mult: int
    n_mult: int
    batch_one: bool = False


# FLUX.2 klein linears in units of the hidden size H (mlp_ratio 3 with SwiGLU: the first MLP
# projection is 6H wide, the second takes 3H; single blocks fuse qkv + mlp-in into 9H and
# attention-out + mlp-out into 4H).
FLUX2_LAYERS = (
    LayerSpec("double.img_attn.qkv", 1, 3),
    LayerSpec("double.img_attn.proj", 1, 1),
    LayerSpec("double.img_mlp.0", 1, 6),
    LayerSpec("double.img_mlp.2", 3, 1),
    LayerSpec("single.linear1", 1, 9),
    LayerSpec("single.linear2", 4, 1),
    LayerSpec("modulation (batch 1)", 1, 6, batch_one=True),
)


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = (ref - out.double()).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.norm() / noise))


def run(hidden: int, tokens: int, device: torch.device, per_row: bool, rotate_group: int, seed: int,
        repeats: int) -> list[dict]:
    """Quantize and time every layer kind; returns one result dict per layer."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for spec in FLUX2_LAYERS:
        k, n = hidden * spec.k_mult, hidden * spec.n_mult
        m = 1 if spec.batch_one else tokens
        x = torch.randn(m, k, generator=gen).to(device, torch.bfloat16)
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(device, torch.bfloat16)
        q, s = kernels.quantize_weight(w, per_row=per_row, rotate_group=rotate_group)
        y_ref = x.double() @ w.double().T
        y_bf16 = F.linear(x, w)
        y_int8 = kernels.int8_linear(x, q, s, rotate_group=rotate_group)
        rows.append({
            "layer": spec.name, "M": m, "K": k, "N": n,
            "sqnr_bf16": _sqnr_db(y_ref, y_bf16), "sqnr_int8": _sqnr_db(y_ref, y_int8),
            "rel_err_vs_bf16": float((y_int8.double() - y_bf16.double()).norm() / y_bf16.double().norm()),
            "ms_bf16": _time_ms(lambda x=x, w=w: F.linear(x, w), device, repeats),
            "ms_int8": _time_ms(lambda x=x, q=q, s=s: kernels.int8_linear(x, q, s, rotate_group=rotate_group),
                                device, repeats),
            "weight_mb_bf16": w.numel() * 2 / 2**20,
            "weight_mb_int8": (q.numel() + s.numel() * 4) / 2**20,
        })
    return rows


def format_rows(rows: list[dict]) -> str:
    head = (f"{'layer':<22} {'M x K x N':>20} {'SQNR bf16':>10} {'SQNR int8':>10} {'err vs bf16':>12} "
            f"{'bf16 ms':>9} {'int8 ms':>9} {'speed-up':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['M']}x{r['K']}x{r['N']}"
        lines.append(f"{r['layer']:<22} {shape:>20} {r['sqnr_bf16']:9.1f}dB {r['sqnr_int8']:9.1f}dB "
                     f"{r['rel_err_vs_bf16']:12.4f} {r['ms_bf16']:9.3f} {r['ms_int8']:9.3f} "
                     f"{r['ms_bf16'] / r['ms_int8']:8.2f}x")
    bf16_mb = sum(r["weight_mb_bf16"] for r in rows)
    int8_mb = sum(r["weight_mb_int8"] for r in rows)
    lines.append(f"weights: {bf16_mb:.1f} MiB in BF16, {int8_mb:.1f} MiB in INT8 ({int8_mb / bf16_mb:.0%})")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    value = int(text)  # a ValueError becomes argparse's "invalid _positive_int value" line
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


_positive_int.__name__ = "positive integer"  # how argparse names the type in "invalid ... value"


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu or cuda (cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"the demo runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise argparse.ArgumentTypeError(f"torch {torch.__version__} ({build}) sees no CUDA GPU here; "
                                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"there is no {device}: torch sees {torch.cuda.device_count()} GPU(s)")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options on ``parser`` (the ``demo`` command of ``python -m int8_w8a8``)."""
    parser.add_argument("--device", type=_device, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--hidden", type=_positive_int, default=None,
                        help="hidden size H (default 3072 = klein 4B on a GPU, 512 on a CPU)")
    parser.add_argument("--tokens", type=_positive_int, default=None,
                        help="tokens per layer (default 4608 = 1024x1024 + 512 text on a GPU, 256 on a CPU)")
    parser.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per row")
    parser.add_argument("--rotate-group", type=int, default=0, choices=[0, 64, 128, 256],
                        help="ConvRot group (0 = off); the hidden size must be a multiple of it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=_positive_int, default=5, help="timing repeats on the CPU")


def run_cli(args: argparse.Namespace) -> int:
    """Run the demo with parsed ``args`` and print its table; returns the exit status."""
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    hidden = args.hidden if args.hidden is not None else (3072 if gpu else 512)
    tokens = args.tokens if args.tokens is not None else (4608 if gpu else 256)
    if args.rotate_group and hidden % args.rotate_group:
        print(f"python -m int8_w8a8 demo: error: --rotate-group {args.rotate_group} needs a hidden size that is a "
              f"multiple of it, got --hidden {hidden}", file=sys.stderr)
        return 2
    backend = kernels.choose_backend(device)
    print(f"int8_w8a8 demo on {torch.cuda.get_device_name(device) if gpu else 'CPU'}: "
          f"kernels = {backend.name} ({backend.reason})")
    print(f"FLUX.2-shaped layers, hidden {hidden}, {tokens} tokens, "
          f"{'per-tensor' if args.per_tensor else 'per-row'} weight scales"
          + (f", ConvRot group {args.rotate_group}" if args.rotate_group else "") + "\n")
    rows = run(hidden, tokens, device, not args.per_tensor, args.rotate_group, args.seed, args.repeats)
    print(format_rows(rows))
    if backend.name == "reference":
        print(REFERENCE_NOTE.format(reason=backend.reason))
    worst = min(r["sqnr_int8"] for r in rows)
    print(f"\nworst INT8 SQNR vs float64: {worst:.1f} dB (BF16 itself: "
          f"{min(r['sqnr_bf16'] for r in rows):.1f} dB); torch twin check: "
          f"{'exact' if _twin_matches(device) else 'MISMATCH'}")
    return 0


REFERENCE_NOTE = (
    "note: INT8 ran on the pure-torch reference path ({reason}).\n"
    "      The error columns are what the Triton kernels compute; the times are not theirs (on a CPU\n"
    "      INT8 is slower than BF16). The INT8 speed-ups need an NVIDIA GPU with Triton, SM 8.0 or newer."
)


def main(argv: list[str] | None = None) -> int:
    """``python -m int8_w8a8 demo [options]``, parsed here when called directly."""
    parser = argparse.ArgumentParser(prog="python -m int8_w8a8 demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


def _twin_matches(device: torch.device) -> bool:
    """The dispatched kernels agree bit for bit with the pure-torch twin on a small random case."""
    x = torch.randn(17, 96, device=device, dtype=torch.bfloat16)
    q, s = kernels.quantize_weight(torch.randn(40, 96, device=device) * 0.05)
    return torch.equal(kernels.int8_linear(x, q, s), reference.int8_linear(x, q, s))
