"""Where one kernel's warps stall, from Nsight Compute's per-instruction source page (SASS).

    ncu -k regex:_gluon_ws -s 1 -c 1 --set full --import-source no -f -o ws python3 -m int8_w8a8.bench.probe_gluon_ws \
        --ncu --shapes 40:14040 --configs 4dp
    ncu -i ws.ncu-rep --page source --csv --print-source sass > ws_sass.csv
    python -m int8_w8a8.bench.ncu_report ws_sass.csv

(``bash bench/run_on_gpu.sh attention-ncu`` runs all three.) Prints the warp-stall samples by reason, the hot loops
(runs of instructions executed at least ``--hot`` times the most executed instruction's count) with their share of
the samples and their stall reasons, and for each hot loop the samples by opcode. bench/NOTES.md item 75 read the
Gluon attention this way: its consumer loops hold 64 % of the samples, "wait" (fixed-latency dependencies) the
largest stall inside them.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def _num(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_source_csv(path: str) -> list[dict[str, str]]:
    """The rows of ``ncu --page source --csv --print-source sass`` (a "Kernel Name" line, then the header)."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    start = next(i for i, row in enumerate(lines) if "Address" in row and "Source" in row)
    header = lines[start]
    return [dict(zip(header, row, strict=False)) for row in lines[start + 1:] if len(row) == len(header)]


def _opcode(source: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", source.strip()).split(" ")[0] if source.strip() else "?"


def _stalls(rows: list[dict[str, str]]) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for r in rows:
        for k, v in r.items():
            if k.startswith("stall_") and "(Not Issued)" not in k:
                out[k[len("stall_"):]] += _num(v)
    return out


def hot_loops(rows: list[dict[str, str]], hot: float = 0.5, min_len: int = 32) -> list[list[dict[str, str]]]:
    """Runs of at least ``min_len`` consecutive instructions each executed at least ``hot`` times the most executed
    instruction's count: the kernel's steady-state loops."""
    top = max((_num(r[EXECUTED]) for r in rows), default=0.0)
    runs, cur = [], []
    for r in rows:
        if top and _num(r[EXECUTED]) >= hot * top:
            cur.append(r)
        else:
            if len(cur) >= min_len:
                runs.append(cur)
            cur = []
    if len(cur) >= min_len:
        runs.append(cur)
    return runs


def summarize(rows: list[dict[str, str]], hot: float = 0.5) -> dict:
    """``samples`` (all), ``stalls`` {reason: share of all samples}, ``loops``: per hot loop its first address,
    ``instructions``, ``share`` of all samples, ``stalls`` {reason: share of the loop's samples} and ``opcodes``
    {opcode: share of the loop's samples}, the largest first."""
    total = sum(_num(r[SAMPLES]) for r in rows) or 1.0

    def shares(counter: collections.Counter, of: float) -> dict[str, float]:
        return {k: round(v / of, 4) for k, v in counter.most_common() if v > 0}

    loops = []
    for run in hot_loops(rows, hot):
        samples = sum(_num(r[SAMPLES]) for r in run) or 1.0
        ops: collections.Counter = collections.Counter()
        for r in run:
            ops[_opcode(r["Source"])] += _num(r[SAMPLES])
        loops.append({"address": run[0]["Address"], "instructions": len(run), "share": round(samples / total, 4),
                      "stalls": shares(_stalls(run), samples), "opcodes": shares(ops, samples)})
    return {"samples": total, "stalls": shares(_stalls(rows), total), "loops": loops}


def _line(d: dict[str, float], n: int = 8) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in list(d.items())[:n])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--hot", type=float, default=0.5, help="a loop's instructions: executed >= this x the most")
    args = parser.parse_args(argv)
    rows = read_source_csv(args.csv)
    if not rows:
        print(f"ncu_report: no source rows in {args.csv}", file=sys.stderr)
        return 2
    s = summarize(rows, args.hot)
    print(f"{len(rows)} instructions, {s['samples']:.0f} warp samples; stalls: {_line(s['stalls'], 12)}")
    for loop in s["loops"]:
        print(f"loop at {loop['address']}: {loop['instructions']} instructions, {loop['share']:.1%} of the samples")
        print(f"    stalls: {_line(loop['stalls'])}")
        print(f"    opcodes: {_line(loop['opcodes'], 12)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
