"""bench/turns.py: isolated benchmark processes that set up together and take turns for their timed sections.

Children here are small Python processes that log when they build, work outside a section (as a compile or a
warm-up does) and are timed; the logs are checked against ``turns``' rules.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

pytestmark = pytest.mark.unit

# argv: LOG NAME ROUNDS FAIL_BEFORE_TIMED --turns R,W
CHILD = r"""
import json, sys, time
from int8_w8a8.bench import turns

log, name, rounds, fail = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
sections = turns.Turns.from_arg(sys.argv[sys.argv.index("--turns") + 1])

def span(kind, seconds):
    start = time.monotonic()
    time.sleep(seconds)
    with open(log, "a") as f:
        f.write(json.dumps({"name": name, "kind": kind, "start": start, "end": time.monotonic()}) + "\n")

with sections.section("build"):
    span("build", 0.15)
for r in range(rounds):
    span("free", 0.5)  # a compile or warm-up: outside every section
    if fail:
        sys.exit(3)
    with sections.section("timed"):
        span(f"timed{r}", 0.1)
"""


def _package_path() -> str:
    """PYTHONPATH with the directory holding the ``int8_w8a8`` package first (the children import it)."""
    import int8_w8a8

    parent = os.path.dirname(os.path.dirname(int8_w8a8.__file__))
    return os.pathsep.join(p for p in (parent, os.environ.get("PYTHONPATH")) if p)


def _spans(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_sections_follow_the_rules(tmp_path, monkeypatch):
    """Builds never overlap a build or a timed section; a timed section overlaps nothing any other child does;
    the free parts of different children do overlap (the point of it); timed sections go round by round in the
    children's order; a child that fails gives up its place and its exit code comes back."""
    from int8_w8a8.bench import turns

    monkeypatch.setenv("PYTHONPATH", _package_path())
    log = tmp_path / "log.jsonl"
    names = ["a", "b", "c", "dies"]
    cmds = [[sys.executable, "-c", CHILD, str(log), n, "2", "1" if n == "dies" else "0"] for n in names]
    assert turns.run(cmds) == [0, 0, 0, 3]
    spans = _spans(log)
    assert sorted(s["name"] for s in spans if s["kind"] == "build") == sorted(names)
    for s in spans:
        others = [o for o in spans if o["name"] != s["name"]]
        if s["kind"].startswith("timed"):
            assert not any(_overlap(s, o) for o in others), s
        if s["kind"] == "build":
            assert not any(_overlap(s, o) for o in others if o["kind"] == "build"), s
    free = [s for s in spans if s["kind"] == "free"]
    assert any(_overlap(x, y) for x in free for y in free if x["name"] != y["name"])
    timed = sorted((s for s in spans if s["kind"].startswith("timed")), key=lambda s: s["start"])
    assert [(s["kind"], s["name"]) for s in timed] == [
        ("timed0", "a"), ("timed0", "b"), ("timed0", "c"), ("timed1", "a"), ("timed1", "b"), ("timed1", "c")]


def test_without_a_parent_every_section_is_entered_at_once():
    from int8_w8a8.bench import turns

    sections = turns.Turns.from_arg(None)
    assert not sections.active
    with sections.section("build"), sections.section("timed"):
        pass
