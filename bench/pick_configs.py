"""Pick, per sweep bucket, the config whose worst shape is closest to that shape's best config.

    python -m int8_w8a8.bench.pick_configs bench/results/h200-sweep-*.json
"""

from __future__ import annotations

import json
import sys


def rank(bucket_rows: list[dict]) -> list[tuple[float, list[float], dict]]:
    """[(worst ratio, ratios per shape, config)] sorted best first; ratio = best ms / config ms."""
    scores: dict[str, list[float]] = {}
    for shape in bucket_rows:
        timed = [r for r in shape["results"] if "ms" in r]
        if not timed:
            continue
        best = min(r["ms"] for r in timed)
        for r in timed:
            scores.setdefault(json.dumps(r["config"], sort_keys=True), []).append(best / r["ms"])
    n = len(bucket_rows)
    out = [(min(v), v, json.loads(k)) for k, v in scores.items() if len(v) == n]
    return sorted(out, key=lambda t: -t[0])


def main(paths: list[str]) -> int:
    for path in paths:
        with open(path) as f:
            buckets = json.load(f)["buckets"]
        for name, rows in buckets.items():
            print(f"{path} [{name}]")
            for worst, ratios, cfg in rank(rows)[:4]:
                print(f"  worst {worst:.3f} {[round(r, 3) for r in ratios]} {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
