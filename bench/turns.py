"""Isolated benchmark processes whose set-up overlaps and whose timed sections take turns.

A compiled row of a large model spends minutes building its weights and compiling (FP8 fast's Qwen-Image compile
takes 184-250 s on the H200's host, bench/NOTES.md item 82) and seconds being timed. ``run`` starts every child at
once and lets each enter two kinds of exclusive section, granted over a pipe pair per child:

- ``build`` (loading the weights): one child at a time, so only one model's float weights are made at once (peak
  memory stays one model's load above the others' resident weights);
- ``timed`` (the timed steps, the profile, the peak-memory step): only while every other live child is blocked
  waiting for a grant or has exited, so nothing else runs on the GPU or compiles on the CPU beside it, as when the
  children ran one after another. Timed sections go in the children's order, round by round (child i's k-th after
  the k-th of every lower live child: the BF16 child, listed first, saves the SQNR reference before the others'
  rows read it).

Everything between the sections (compiling, warm-up steps) runs concurrently. A child that exits (or fails) gives
up its place; the others go on.

Child side: ``Turns.from_arg(spec)`` with the ``--turns R,W`` spec its parent passed (None: no parent; every
section is entered at once).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
from collections.abc import Iterator, Sequence

_BUILD, _TIMED, _DONE, _GO = b"b", b"t", b"d", b"g"


class Turns:
    """A child's end: ``section("build")`` / ``section("timed")`` block until the parent grants them."""

    def __init__(self, read_fd: int | None = None, write_fd: int | None = None):
        self._r, self._w = read_fd, write_fd

    @classmethod
    def from_arg(cls, spec: str | None) -> Turns:
        if not spec:
            return cls()
        r, w = (int(x) for x in spec.split(","))
        return cls(r, w)

    @property
    def active(self) -> bool:
        """Whether a parent grants the sections (other processes set up beside this one)."""
        return self._r is not None

    @contextlib.contextmanager
    def section(self, kind: str) -> Iterator[None]:
        if self._r is None:
            yield
            return
        os.write(self._w, {"build": _BUILD, "timed": _TIMED}[kind])
        if os.read(self._r, 1) != _GO:
            raise RuntimeError("turns: the parent closed the pipe before granting a section")
        try:
            yield
        finally:
            os.write(self._w, _DONE)


class _Child:
    def __init__(self, index: int, cmd: list[str]):
        self.index = index
        down_r, self.down_w = os.pipe()  # parent -> child: grants
        self.up_r, up_w = os.pipe()  # child -> parent: requests and releases
        self.proc = subprocess.Popen([*cmd, "--turns", f"{down_r},{up_w}"], pass_fds=(down_r, up_w))
        os.close(down_r)
        os.close(up_w)
        self.state = "free"  # free | wants-build | wants-timed | build | timed | exited
        self.timed = 0  # timed sections completed


def _grant(children: list[_Child]) -> _Child | None:
    """The child to grant a section now, or None (``run``'s rules)."""
    live = [c for c in children if c.state != "exited"]
    if any(c.state in ("build", "timed") for c in live):
        return None
    builders = [c for c in live if c.state == "wants-build"]
    if builders:
        return builders[0]
    if any(c.state == "free" for c in live):
        return None
    timers = [c for c in live if c.state == "wants-timed"]
    # every live child waits: rounds in order (the fewest sections timed), within a round the lowest child
    return min(timers, key=lambda c: (c.timed, c.index)) if timers else None


def run(cmds: Sequence[list[str]]) -> list[int]:
    """Run ``cmds`` (each taking ``--turns R,W``) at once under the rules above; their exit codes, in order."""
    children = [_Child(i, list(cmd)) for i, cmd in enumerate(cmds)]
    sel = selectors.DefaultSelector()
    for c in children:
        sel.register(c.up_r, selectors.EVENT_READ, c)
    try:
        while any(c.state != "exited" for c in children):
            chosen = _grant(children)
            if chosen is not None:
                chosen.state = "build" if chosen.state == "wants-build" else "timed"
                os.write(chosen.down_w, _GO)
                continue
            for key, _ in sel.select():
                c = key.data
                data = os.read(c.up_r, 64)
                if not data:  # the child exited (or closed its end): it holds no section any more
                    sel.unregister(c.up_r)
                    c.state = "exited"
                    continue
                for byte in data:
                    msg = bytes([byte])
                    if msg == _BUILD:
                        c.state = "wants-build"
                    elif msg == _TIMED:
                        c.state = "wants-timed"
                    elif msg == _DONE:
                        c.timed += c.state == "timed"
                        c.state = "free"
        return [c.proc.wait() for c in children]
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
            for fd in (c.down_w, c.up_r):
                with contextlib.suppress(OSError):
                    os.close(fd)
        sel.close()
