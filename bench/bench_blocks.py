"""In-step GPU time of the fused FLUX.2 blocks under alternative kernel choices (GPU, an A/B harness).

    python -m int8_w8a8.bench.bench_blocks [--out results.json]

A FLUX.2 klein 9B with one double and one single block (real widths, 1024x1024: 4096 image and 512
text tokens) is built once with the pack (per-row); each choice below is set on the kernel modules
for the duration of its run (bench only: the package's rules are module constants) and one step is
profiled (``profile_step.profile``). Kernel times come from the profiler, so host overhead does not
blur differences of a few microseconds, and the kernels run between the ones they run between in a
real step (warm L2, the GEMM before them), which micro-benchmarks of one kernel do not reproduce.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

import torch

from . import bench_model, common, flux2_model, profile_step


def _bhsd_buffers(x, heads, head_dim, seq):
    shape = (x.shape[0], heads, seq, head_dim)
    return tuple(torch.empty(shape, device=x.device, dtype=x.dtype) for _ in range(3))


# name -> (module attribute, value) pairs set for the run
CHOICES: dict[str, tuple[tuple[str, str, object], ...]] = {
    "rule": (),
    # glu_quantize's launch variants (triton_fused.GLU_VARIANTS) in place of its rule
    **{f"glu {name}": (("triton_fused", "GLU_RULE", {"swiglu": name, "gelu_tanh": name}),)
       for name in ("base", "lean", "lean-l2")},
    "q/k/v [B, H, S, D]": (("blocks.common", "qkv_buffers", _bhsd_buffers),),
}


@contextlib.contextmanager
def _set(pairs):
    from ..kernels import fused, triton_fused
    from ..ops.blocks import common

    mods = {"triton_fused": triton_fused, "blocks.common": common}
    old = [(mods[m], a, getattr(mods[m], a)) for m, a, _ in pairs]
    try:
        for m, a, v in pairs:
            setattr(mods[m], a, v)
        for replayer in fused.REPLAYERS:  # launches recorded under the previous choice would replay it
            replayer.table.clear()
        yield
    finally:
        for mod, a, v in old:
            setattr(mod, a, v)


def _group(top: list[dict]) -> dict[str, float]:
    keys = {"glu": ("_glu_quant",), "attention": ("sdpa", "flash", "fmha"),
            "gemm": ("_gemm_tma_kernel", "_gemm_kernel"), "copy": ("copy",), "rope": ("_qk_norm_rope",),
            "norm": ("_norm_mod_quant",)}
    out = dict.fromkeys(keys, 0.0)
    for row in top:
        for k, subs in keys.items():
            if any(s in row["name"] for s in subs):
                out[k] += row["ms"]
                break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--choices", nargs="+", default=list(CHOICES), choices=list(CHOICES))
    parser.add_argument("--reps", type=int, default=3, help="profiled steps per choice (the median is kept)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    flux2_model.setup_comfyui()
    cfg = dataclasses.replace(flux2_model.CONFIGS["klein9b"], name="klein 9B (1 + 1 blocks)", depth=1, single=1)
    model = bench_model.build("pack-row", cfg)
    inputs = bench_model.step_inputs(cfg, 1024)
    rows = []
    for name in args.choices:
        with _set(CHOICES[name]):
            runs = [profile_step.profile(model, inputs) for _ in range(args.reps)]
        groups = [_group(r["top"]) for r in runs]
        row = {"choice": name, "kernel_ms": common.median([r["kernel_ms"] for r in runs]),
               **{k: common.median([g[k] for g in groups]) for k in groups[0]}}
        rows.append(row)
        print(f"{name:<24} kernels {row['kernel_ms'] * 1e3:7.0f} us | " + "  ".join(
            f"{k} {row[k] * 1e3:6.0f}" for k in groups[0]), flush=True)
    if args.out:
        common.write_json(args.out, {"env": common.environment(), "model": cfg.name, "rows": rows})


if __name__ == "__main__":
    main()
