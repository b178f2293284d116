"""Bar chart of step speed-ups over BF16 from bench_model.py / bench_arch.py results (needs matplotlib: pip
install .[bench]).

    python -m int8_w8a8.bench.plot_model RESULTS.json [MORE.json ...] --out speedups.png
    python -m int8_w8a8.bench.plot_model h200-bench-architectures.json --per-model --out h200-bench-arch-{model}.png

One group of bars per (model, resolution, mode), one bar per variant; the dashed line is BF16. A mode measured
without its own BF16 row (compiled runs of FP8 fast and the pack only) is plotted against the eager BF16 step of
the same model and resolution, and its group says so. With ``--per-model`` one figure per model, ``{model}`` in
``--out`` replaced by its key (bench_arch's ``arch``).
"""

from __future__ import annotations

import argparse
import json

ORDER = ("bf16", "fp8-fast", "comfy-int8", "pack-row", "pack-tensor", "pack-native", "pack-convert", "pack-convert-opt",
         "pack-convert-attn8", "stock-native")
LABELS = {"bf16": "BF16", "fp8-fast": "FP8 fast (ComfyUI)", "comfy-int8": "INT8 native (ComfyUI + kitchen)",
          "pack-row": "int8-w8a8 per-row", "pack-tensor": "int8-w8a8 per-tensor",
          "pack-native": "int8-w8a8 from a native file", "pack-convert": "int8-w8a8 converted on load",
          "pack-convert-opt": "converted, quantize_extra_blocks (Z-Image's refiners)",
          "pack-convert-attn8": "converted, 8-bit attention",
          "stock-native": "native file, stock loader + int8-w8a8 layout"}


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


def baselines(rows: list[dict]) -> dict[tuple, tuple[float, str]]:
    """(model, res, mode) -> (BF16 step ms, the mode it was measured in): the group's own BF16 row, else the
    eager one of the same model and resolution; groups with neither are left out."""
    bf16 = {(r["model"], r["res"], r["mode"]): r["ms"] for r in rows if r["variant"] == "bf16" and r.get("ms")}
    out = {}
    for model, res, mode in {(r["model"], r["res"], r["mode"]) for r in rows}:
        for base_mode in (mode, "eager"):
            if (model, res, base_mode) in bf16:
                out[(model, res, mode)] = (bf16[(model, res, base_mode)], base_mode)
                break
    return out


def plot(rows: list[dict], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["res"], r["mode"]) for r in rows}, key=lambda g: (g[0], g[2], g[1]))
    variants = [v for v in ORDER if any(r["variant"] == v for r in rows)]
    by_key = {(r["model"], r["res"], r["mode"], r["variant"]): r for r in rows}
    base = baselines(rows)
    top = 1.0
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(9, 1.4 * len(groups)), 5.5))
    for i, variant in enumerate(variants):
        xs, ys = [], []
        for j, group in enumerate(groups):
            row = by_key.get((*group, variant))
            if row is not None and row.get("ms") and group in base:
                xs.append(j + (i - (len(variants) - 1) / 2) * width)
                ys.append(base[group][0] / row["ms"])
                top = max(top, ys[-1])
        bars = ax.bar(xs, ys, width, label=LABELS.get(variant, variant))
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1, rotation=90)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(groups)), [f"{m}\n{_res(res)}\n{mode}" + _vs(base.get((m, res, mode)), mode)
                                       for m, res, mode in groups], fontsize=8)
    ax.set_ylabel("step speed-up over BF16 (x)")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, 1.12 * top)
    ax.legend(fontsize=8, ncols=min(3, len(variants)), loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def _vs(base: tuple[float, str] | None, mode: str) -> str:
    """The group label's note when its bars are not against BF16 in the same mode."""
    if base is None:
        return "\n(no BF16 row)"
    return "" if base[1] == mode else f"\n(vs BF16 {base[1]})"


def _res(res) -> str:
    """bench_model records the side of a square image (1024), bench_arch a label ("1024x1024", "832x480x33")."""
    return f"{res}x{res}" if isinstance(res, int) else str(res)


def model_key(row: dict) -> str:
    return row.get("arch") or "".join(c if c.isalnum() else "-" for c in row["model"].lower())


def plot_per_model(rows: list[dict], pattern: str, title: str) -> list[str]:
    """One figure per model (``{model}`` in ``pattern`` becomes its key); returns the paths written."""
    paths = []
    for key in dict.fromkeys(model_key(r) for r in rows):
        subset = [r for r in rows if model_key(r) == key]
        path = pattern.format(model=key)
        plot(subset, path, f"{subset[0]['model']}: {title}")
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default=None)
    parser.add_argument("--per-model", action="store_true", help="one figure per model ({model} in --out)")
    args = parser.parse_args()
    rows = load_rows(args.results)
    if args.per_model:
        if "{model}" not in args.out:
            parser.error("--per-model needs {model} in --out")
        plot_per_model(rows, args.out, args.title or "one step in ComfyUI, H200 (higher is faster)")
    else:
        plot(rows, args.out, args.title or "One FLUX.2 klein step in ComfyUI, H200 (higher is faster)")


if __name__ == "__main__":
    main()
