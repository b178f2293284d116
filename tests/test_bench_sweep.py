"""The GEMM sweep's report of a candidate that is not bit-identical (``bench/sweep_gemm.py``): how many values
differ, how far, in how many 128 x 128 blocks, and whether a second run gives the same bits."""

from __future__ import annotations

import pytest
import torch

from int8_w8a8.bench import sweep_gemm

pytestmark = pytest.mark.unit


def test_difference_counts_values_blocks_and_determinism():
    expect = torch.zeros(300, 300, dtype=torch.bfloat16)
    out = expect.clone()
    out[5, 7], out[6, 100], out[200, 290] = 1.0, -0.5, 0.25  # two in block (0, 0), one in block (1, 2)
    how = sweep_gemm._difference(out, expect, lambda: out.clone())
    assert how == {"differing": 3, "max_abs_diff": 1.0, "tiles": 2, "deterministic": True}
    flaky = sweep_gemm._difference(out, expect, lambda: expect.clone())  # a second run with other bits
    assert flaky["deterministic"] is False and flaky["differing"] == 3
