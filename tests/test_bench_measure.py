"""bench_model.measure's Dynamo counters: what a compiled step compiled, so a spread of compiled step times can be
told apart from a recompile (or a recompile limit that left the model running eagerly)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from int8_w8a8.bench import bench_model

pytestmark = pytest.mark.unit


def test_counters_show_a_recompile_and_a_recompile_limit():
    # the config's own patch: pytest's monkeypatch deletes a torch config attribute on undo (its module class keeps the
    # values outside __dict__), which broke every later compile test of the process
    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=2, automatic_dynamic_shapes=False):
        _recompile_and_limit()
    assert torch._dynamo.config.recompile_limit == limit


def _recompile_and_limit():
    torch._dynamo.reset()
    f = torch.compile(lambda x: x.sin() + 1, backend="eager")

    def moved(x):
        before = bench_model.dynamo_counts()
        f(x)
        return bench_model.counts_moved(before, bench_model.dynamo_counts())

    first = moved(torch.randn(3))
    assert first["frames/total"] == 1 and first["stats/unique_graphs"] == 1
    assert moved(torch.randn(3)) == {}  # the compiled graph again: nothing moves
    again = moved(torch.randn(4))  # another shape: a recompile
    assert again["frames/total"] == 1 and again["stats/unique_graphs"] == 1
    limit = moved(torch.randn(5))  # over the limit: Dynamo gives up on the frame, which then runs eagerly
    assert any(k.startswith("unimplemented/") and "recompile limit" in k for k in limit), limit
    assert moved(torch.randn(5)) == {}  # eagerly from now on, silently: only ``dynamo`` (the row's total) shows it
    torch._dynamo.reset()
