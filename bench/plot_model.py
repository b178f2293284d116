"""Bar chart of step speed-ups over BF16 from bench_model.py results (needs matplotlib: pip install .[bench]).

    python -m int8_w8a8.bench.plot_model RESULTS.json [MORE.json ...] --out speedups.png

One group of bars per (model, resolution, mode), one bar per variant; the dashed line is BF16.
"""

from __future__ import annotations

import argparse
import json

ORDER = ("bf16", "fp8-fast", "comfy-int8", "pack-row", "pack-tensor")
LABELS = {"bf16": "BF16", "fp8-fast": "FP8 fast (ComfyUI)", "comfy-int8": "INT8 native (ComfyUI + kitchen)",
          "pack-row": "int8-w8a8 per-row", "pack-tensor": "int8-w8a8 per-tensor"}


def load_rows(paths: list[str]) -> list[dict]:
    """Rows of all files; a (model, res, variant, mode) measured in several files is taken from the first."""
    rows, seen = [], set()
    for path in paths:
        with open(path) as f:
            for row in json.load(f)["rows"]:
                key = (row["model"], row["res"], row["variant"], row["mode"])
                if key not in seen:
                    seen.add(key)
                    rows.append(row)
    return rows


def plot(rows: list[dict], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["res"], r["mode"]) for r in rows}, key=lambda g: (g[0], g[2], g[1]))
    variants = [v for v in ORDER if any(r["variant"] == v for r in rows)]
    by_key = {(r["model"], r["res"], r["mode"], r["variant"]): r for r in rows}
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(groups)), 5))
    for i, variant in enumerate(variants):
        xs, ys = [], []
        for j, group in enumerate(groups):
            row = by_key.get((*group, variant))
            if row is not None and row.get("x_bf16"):
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                ys.append(row["x_bf16"])
        bars = ax.bar(xs, ys, width, label=LABELS.get(variant, variant))
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1, rotation=90)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(groups)), [f"{m}\n{res}x{res}\n{mode}" for m, res, mode in groups], fontsize=8)
    ax.set_ylabel("step speed-up over BF16 (x)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 1.12 * max(r["x_bf16"] for r in rows if r.get("x_bf16")))
    ax.legend(fontsize=8, ncols=min(5, len(variants)), loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="One FLUX.2 klein step in ComfyUI, H200 (higher is faster)")
    args = parser.parse_args()
    plot(load_rows(args.results), args.out, args.title)


if __name__ == "__main__":
    main()
