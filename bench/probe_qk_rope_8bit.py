"""Probe: ``qk_norm_rope_8bit``'s launch forms on the GPU (tokens per part, warps, a head loop), queued timings.

    python -m int8_w8a8.bench.probe_qk_rope_8bit

At Wan's shape (row norm, H = 40, S = 14040) and issue 14's (head norm, H = 32, S = 16896): the plain
``qk_norm_rope`` against each form of the 8-bit one (bench/NOTES.md item 65).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from ..kernels import attention, fused, reference_fused, triton_fused
from .bench_attention import HEAD_DIM, _ms_queued
from .bench_attention_fused import _segment_inputs


def _probe(h: int, s: int, norm: str, dev: str, dt: torch.dtype) -> None:
    proj, w, pe = _segment_inputs(h, s, norm, dev, dt)
    bufs = tuple(torch.empty(1, s, h, HEAD_DIM, device=dev, dtype=dt).transpose(1, 2) for _ in range(3))
    if norm == "row":
        bufs = (*bufs[:2], proj[2].view(1, s, h, HEAD_DIM).transpose(1, 2))
    kw = {"seq_off": 0, "heads": h, "eps_q": 1e-6, "eps_k": 1e-6, "qk_norm": norm}
    plain = _ms_queued(lambda: fused.qk_norm_rope(proj, *w, pe, *bufs, **kw))
    print(f"H={h} S={s} {norm}: qk_norm_rope {plain * 1e3:.1f} us", flush=True)
    loops = (True,) if norm == "row" else (False, True)
    config = attention.parts_config
    for rot, rows, warps, loop in itertools.product((True, False), (16, 32, 64), (4, 8), loops):
        # without the rotation (wrong numbers, the same memory traffic): what the Q rotation's dot costs
        attention.parts_config = lambda device, rot=rot: dataclasses.replace(config(device), rotate=rot)
        reference_fused.QK_PART_ROWS = triton_fused.PART_ROWS = rows
        triton_fused.QK_8BIT_LAUNCH = {norm == "row": (warps, loop)}
        fused._QK_NORM_ROPE_8BIT.table.clear()  # a recorded launch would replay the previous form
        parts = attention.parts_buffers(1, h, s, HEAD_DIM, reference_fused.qk_parts(s), torch.device(dev))
        form = f"H={h} S={s} {norm}: 8-bit rows={rows} warps={warps} loop={loop} rotate={rot}"
        try:
            ms = _ms_queued(lambda parts=parts: fused.qk_norm_rope_8bit(proj, *w, pe, bufs[1], bufs[2], *parts,
                                                                        part_off=0, **kw))
            print(f"{form}: {ms * 1e3:.1f} us", flush=True)
        except Exception as exc:  # a form that does not compile must not cost the others
            print(f"{form}: failed {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    attention.parts_config = config


def main() -> int:
    for h, s, norm in ((40, 14040, "row"), (32, 16896, "head")):
        _probe(h, s, norm, "cuda", torch.bfloat16)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
