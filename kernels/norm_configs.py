"""How the row-normalizing fused kernels are launched, as data.

``triton_fused._norm_mod_quant_kernel`` (``norm_modulate_quantize``) and ``triton_fused._norm_gate_add_kernel``
(``rms_norm_gate_add``) hold whole rows in registers (a row's statistics need all of it before anything is
stored), so each is memory-bound and its speed is set by how many bytes each SM keeps in flight: at the
H200's ~4.8 TB/s and ~0.7-0.9 us loaded HBM latency that is ~25-30 KB per SM. Offline (sm_90, Triton 3.6,
``bench/check_ptx.py``) the one-row-per-program form takes 96-111 registers per thread (x, shift and scale
of 32 columns per thread, the loads hoisted to the top), so 4-5 programs of 4 warps share an SM, each with
its row's loads in flight only until they land; its reductions and stores then run with nothing in flight.
A row of 5120 columns (Wan) is padded to an 8192-column tile: 37.5 % of the registers hold padding, 8 warps,
2 programs per SM.

``RowLaunch`` picks: rows per tile, warps, a persistent grid whose programs load their next tile's rows
while they reduce and store the current one (``programs_per_sm`` > 0: the loads stay in flight across the
whole loop), and rows split into two power-of-two parts (``split``: 5120 = 4096 + 1024, 3072 = 2048 + 1024)
instead of one padded tile. The rule is one table per kernel (``NORM_MOD_QUANT_RULE``, ``NORM_GATE_ADD_RULE``):
the first row whose ``max_k`` covers the row length. ``bench/bench_fused.py`` measures every variant at the
architectures' shapes, and its result sets the tables here.
"""

from __future__ import annotations

import dataclasses

import triton

from .triton_quant import TILE_ELEMS  # elements of one program's tile when ``RowLaunch.rows`` is 0


@dataclasses.dataclass(frozen=True)
class RowLaunch:
    """One launch form of a whole-row kernel.

    rows: rows per tile (BLOCK_M); 0: ``TILE_ELEMS // columns``, at least 1 (a row per tile from 4096 columns).
    warps: num_warps; 0: 4 for tiles of up to ``TILE_ELEMS`` elements, else 8.
    programs_per_sm: 0: one program per tile (the grid covers the rows); > 0: a persistent grid of this many
        programs per SM, each loading its next tile while it finishes the current one.
    split: a row of K columns as two power-of-two parts, ``2^floor(log2 K)`` and the power of two that covers
        the rest, where that is narrower than one ``next_power_of_2(K)`` tile (5120: 4096 + 1024 instead of 8192).
    lean: the quantizing kernels' lean statistics and stores (their LEAN: the same scales and codes with fewer
        instructions a value; kernels without a quantizer ignore it).
    """

    rows: int = 0
    warps: int = 0
    programs_per_sm: int = 0
    split: bool = False
    lean: bool = False

    def __post_init__(self) -> None:
        if self.rows < 0 or self.rows & (self.rows - 1):
            raise ValueError(f"RowLaunch.rows: expected 0 or a power of two, got {self.rows}")
        if self.warps not in (0, 1, 2, 4, 8, 16, 32) or self.programs_per_sm < 0:
            raise ValueError(f"RowLaunch: bad warps={self.warps} or programs_per_sm={self.programs_per_sm}")

    @property
    def name(self) -> str:
        return (f"rows={self.rows or 'auto'} warps={self.warps or 'auto'} "
                f"{f'persistent {self.programs_per_sm}/SM' if self.programs_per_sm else 'grid'}"
                f"{' split' if self.split else ''}{' lean' if self.lean else ''}")


# The form before the tables (one program per tile, padded rows): the benchmarks' baseline.
LEGACY = RowLaunch()

# The forms bench/bench_fused.py measures at every architecture's shapes and bench/check_ptx.py compiles for
# every target. ``programs_per_sm`` is a cap: the launcher runs no more programs per SM than fit at once.
CANDIDATES: tuple[RowLaunch, ...] = (
    LEGACY,
    RowLaunch(split=True),
    RowLaunch(programs_per_sm=8),
    RowLaunch(programs_per_sm=8, split=True),
    RowLaunch(warps=4, programs_per_sm=8, split=True),
    RowLaunch(warps=8, programs_per_sm=8, split=True),
    RowLaunch(rows=2, warps=8, programs_per_sm=8),
    # the lean quantizer (bench/NOTES.md item 77) in the forms the rules take today, and the plain grid
    RowLaunch(lean=True),
    RowLaunch(programs_per_sm=8, split=True, lean=True),
    RowLaunch(warps=4, programs_per_sm=8, split=True, lean=True),
    RowLaunch(warps=8, programs_per_sm=8, split=True, lean=True),
)

# (max_k, form): the first row with K <= max_k. Predicted from the offline build (module docstring; bench/NOTES.md
# item 27): a persistent grid at every width (loads of the next row in flight while the current one reduces),
# split rows, 4 warps up to 6144 columns (Wan's 5120 as 4096 + 1024 at 147 registers: 3 programs per SM, where 8
# warps hold 2). The H200 sweep (2026-12-02) found this the best form for Wan's [14040, 5120] (129.5 us vs 204.3
# for LEGACY); at the narrower widths it timed host launches, so those rows await its CUDA-graph rerun.
# Session 23 (`h200-bench-fused-session23.txt`): the lean form of each row, 1.33-1.42x (Wan 116.3 -> 87.4 us, Z-Image
# 31.7 -> 22.3, FLUX.2 klein 9B 32.3 -> 22.9, Qwen-Image / Chroma 25.2 -> 18.5; rotated by group 128 1.13-1.17x).
NORM_MOD_QUANT_RULE: tuple[tuple[int, RowLaunch], ...] = (
    (6144, RowLaunch(warps=4, programs_per_sm=8, split=True, lean=True)),
    (16384, RowLaunch(programs_per_sm=8, split=True, lean=True)),
)
# rms_norm_gate_add (Z-Image's 3840 columns, the one architecture that calls it): the CUDA-graph sweep (session 4,
# bench/results/h200-bench-fused-session4.txt) measured 8 warps persistent split 29.1 us against 33.3 for the
# 4-warp form (30.8 for the plain grid); norm_modulate_quantize's forms lie within 1-2 us of the rule at every
# width but Wan's, where the rule is the best form (126 us against 201 for LEGACY).
NORM_GATE_ADD_RULE: tuple[tuple[int, RowLaunch], ...] = (
    (6144, RowLaunch(warps=8, programs_per_sm=8, split=True)),
    (16384, RowLaunch(programs_per_sm=8, split=True)),
)
# rms_norm_gate_add_quantize (the gated post-norm add and the next norm + modulation + quantization in one pass):
# its first build (persistent, 8 warps, without the prefetch) measured 67 us a call in a Z-Image step on the H200
# (bench/NOTES.md item 40); `bench_fused --only gate-add-quant` (CUDA graphs, [4608, 3840] bf16) then measured the
# plain grid (LEGACY, the empty rule) at 53.0 us, the prefetching persistent forms at 52.9 (4 warps) to 61.2
# (8 warps), 68.7 for the first build's form, against 61.1 us for the two kernels it replaces (item 41): the
# grid it is, and Z-Image's block calls it. Session 23: the lean persistent form 45.3 us, the plain grid 53.1.
GATE_ADD_NORM_QUANT_RULE: tuple[tuple[int, RowLaunch], ...] = (
    (6144, RowLaunch(warps=4, programs_per_sm=8, split=True, lean=True)),
)


def pick(rule: tuple[tuple[int, RowLaunch], ...], k: int) -> RowLaunch:
    """The form ``rule`` gives rows of ``k`` columns (``LEGACY`` past its last row)."""
    return next((form for max_k, form in rule if k <= max_k), LEGACY)


def row_parts(k: int, split: bool, min_part: int = 16) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_K2): the power-of-two column tiles a row of ``k`` columns is held in; BLOCK_K2 = 0 for one
    tile. Split only where the two parts are narrower than one padded tile, each at least ``min_part`` wide
    (a rotation group)."""
    whole = max(min_part, triton.next_power_of_2(k))
    if not split or k <= min_part:
        return whole, 0
    main = max(min_part, 1 << (k.bit_length() - 1))
    rest = k - main
    tail = max(min_part, triton.next_power_of_2(rest)) if rest > 0 else 0
    if tail == 0 or main + tail >= whole:
        return whole, 0
    return main, tail


def tile_shape(form: RowLaunch, k: int, min_part: int = 16, min_tile: int = 0) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_K2, num_warps) of ``form`` for rows of ``k`` columns; each part's tile holds at
    least ``min_tile`` elements (a rotation's dot: ``triton_quant.rotation_min_tile``). Split rows are one per tile
    (the kernels' scalar statistics): a split that needs more rows (the form's, or the rotation's for its tail)
    is not taken; more rows per tile would also cost the rotation's shared memory in proportion."""
    block_k, block_k2 = row_parts(k, form.split, min_part)
    rows = form.rows or max(1, TILE_ELEMS // (block_k + block_k2))
    if block_k2 and (rows > 1 or min_tile > block_k2):
        block_k, block_k2 = row_parts(k, False, min_part)  # the tail would need more rows: one padded tile
        rows = form.rows or max(1, TILE_ELEMS // block_k)
    width = block_k + block_k2
    if min_tile:
        rows = max(rows, triton.cdiv(min_tile, block_k))
    warps = form.warps or (4 if rows * width <= TILE_ELEMS else 8)
    return rows, block_k, block_k2, warps
