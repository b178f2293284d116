"""bench/ncu_report.py: Nsight Compute's per-instruction source page read into stall shares and hot loops (a CSV
written here in ncu's layout; the H200 report of bench/NOTES.md item 75 came from the same code)."""

from __future__ import annotations

import csv

import pytest

from int8_w8a8.bench import ncu_report

pytestmark = pytest.mark.unit

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
          "Instructions Executed", "stall_wait", "stall_barrier", "stall_wait (Not Issued)"]


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "_k"])
        w.writerow(HEADER)
        for r in rows:
            w.writerow(r)


def test_loops_and_shares(tmp_path):
    rows = [["0x10", "IMAD R1, R2, R3, RZ", "5", "5", "4,400", "5", "0", "5"]]  # prologue: run once per program
    rows += [[hex(0x20 + 16 * i), "MUFU.EX2 R4, R4" if i % 2 else "@!P0 FADD R5, R5, R4", "10", "8",
              "1,900,800", "6" if i % 2 else "10", "4" if i % 2 else "0", "0"] for i in range(40)]
    rows += [["0x400", "BAR.SYNC.DEFER_BLOCKING 0x1", "95", "95", "4,400", "0", "95", "0"]]
    _write(tmp_path / "s.csv", rows)
    got = ncu_report.read_source_csv(str(tmp_path / "s.csv"))
    assert len(got) == 42
    s = ncu_report.summarize(got)
    assert s["samples"] == 500
    assert s["stalls"] == {"wait": 0.65, "barrier": 0.35}  # the "(Not Issued)" column is not counted twice
    (loop,) = s["loops"]
    assert loop["address"] == "0x20" and loop["instructions"] == 40 and loop["share"] == 0.8
    assert loop["opcodes"] == {"MUFU.EX2": 0.5, "FADD": 0.5} and loop["stalls"] == {"wait": 0.8, "barrier": 0.2}
    assert ncu_report.main([str(tmp_path / "s.csv")]) == 0


def test_no_rows_is_an_error(tmp_path, capsys):
    _write(tmp_path / "e.csv", [])
    assert ncu_report.main([str(tmp_path / "e.csv")]) == 2
    assert "no source rows" in capsys.readouterr().err
