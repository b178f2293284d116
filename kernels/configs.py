"""GEMM tile configurations, chosen by rule from the GPU generation and an M bucket.

There is no autotuning at run time: a diffusion model sees a new token count with every
resolution, batch size or reference image, and re-tuning for each would stall the first step.
The table below was tuned once per GPU generation with ``bench/sweep_gemm.py`` (results in
``bench/results/``); a config depends only on (arch, M bucket), never on the exact M.
"""

from __future__ import annotations

import dataclasses
import functools


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one INT8 GEMM kernel.

    kernel: "tma" (persistent, TMA descriptors, wgmma; SM 9.0+) or "generic" (pointer loads; any
    SM >= 8.0, any K and N). epilogue_subtile
    stores the output tile in two halves (less shared memory, one more pipeline stage fits).
    ctas_per_sm > 1 launches that many persistent programs per SM, so one program's epilogue
    overlaps another's main loop (Triton 3.6 does not warp-specialize on Hopper).
    """

    kernel: str
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    epilogue_subtile: bool = False
    ctas_per_sm: int = 1

    def __post_init__(self) -> None:
        if self.kernel not in ("tma", "generic"):
            raise ValueError(f"GemmConfig.kernel: expected 'tma' or 'generic', got {self.kernel!r}")
        if self.ctas_per_sm < 1:
            raise ValueError(f"GemmConfig.ctas_per_sm: expected >= 1, got {self.ctas_per_sm}")
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name}: expected a power of two >= 16, got {v}")


SMALL_M = 16  # M <= 16: modulation layers and short text; bound by reading the weight once
# Bucket upper bounds used by the tables below: (16, 64, 256, 1024, unbounded). The Hopper entries
# come from bench/sweep_gemm.py on the H200 (bench/results/h200-sweep-*.json), picked with
# bench/pick_configs.py: the config whose worst shape in the bucket is closest to that shape's best.

# (max M of the bucket, config). Hopper: wgmma wants BLOCK_M in multiples of 64 per warpgroup.
HOPPER_TABLE: tuple[tuple[int, GemmConfig], ...] = (
    # >= 0.89 of the best on 16x4096x24576, 8x16384x4096, 5x3072x9216
    (SMALL_M, GemmConfig("generic", 16, 32, 512, group_m=1, num_warps=2, num_stages=4)),
    # >= 0.88 on 64x4096x24576, 33x4096x12288, 64x16384x4096
    (64, GemmConfig("tma", 64, 128, 256, num_warps=4, num_stages=4, ctas_per_sm=2)),
    # >= 0.86 on 256x4096x12288, 128x4096x24576, 200x16384x4096
    (256, GemmConfig("tma", 128, 128, 128, num_warps=4, num_stages=4)),
    # >= 0.91 on 512 x {4096x24576, 16384x4096, 4096x12288} and 1024x3072x27648
    (1024, GemmConfig("tma", 64, 128, 128, num_warps=4, num_stages=4, ctas_per_sm=2)),
    # best on all five large klein shapes (1277 TOPS at 4608x4096x36864 vs 1243 for 128x256x128 with
    # one program per SM): two programs per SM, so one's epilogue runs under the other's main loop
    (1 << 62, GemmConfig("tma", 128, 128, 64, num_warps=4, num_stages=4, ctas_per_sm=2)),
)

# Ampere / Ada (mma.sync): 100-164 KB of shared memory per SM, so smaller K tiles. Not yet swept on
# those GPUs (no such machine here); the tiles follow the Hopper results within Ampere's limits.
AMPERE_TABLE: tuple[tuple[int, GemmConfig], ...] = (
    (SMALL_M, GemmConfig("generic", 16, 64, 256, group_m=1, num_warps=4, num_stages=4)),
    (64, GemmConfig("generic", 64, 128, 128, num_warps=4, num_stages=3)),
    (256, GemmConfig("generic", 128, 128, 64, num_warps=4, num_stages=4)),
    (1 << 62, GemmConfig("generic", 128, 256, 64, num_warps=8, num_stages=3)),
)

# Shapes the generic kernel takes on every GPU (unaligned K/N on Hopper, and the interpreter).
GENERIC_FALLBACK: tuple[tuple[int, GemmConfig], ...] = (
    (SMALL_M, GemmConfig("generic", 16, 64, 256, group_m=1, num_warps=4, num_stages=4)),
    (64, GemmConfig("generic", 64, 128, 128, num_warps=4, num_stages=3)),
    (1 << 62, GemmConfig("generic", 128, 128, 64, num_warps=4, num_stages=4)),
)


def _pick(table: tuple[tuple[int, GemmConfig], ...], m: int) -> GemmConfig:
    for max_m, cfg in table:
        if m <= max_m:
            return cfg
    return table[-1][1]


def select_config(m: int, arch: tuple[int, int], tma_ok: bool) -> GemmConfig:
    """Config for an INT8 GEMM with M rows on a GPU of compute capability ``arch``.

    ``tma_ok``: the operands meet TMA's rules (K % 16 == 0, 16-byte aligned rows and bases, a
    contiguous weight, output rows a multiple of 16 bytes). Without it, or below SM 9.0, the
    generic kernel runs.
    """
    if arch >= (9, 0):
        cfg = _pick(HOPPER_TABLE, m)
        if cfg.kernel == "tma" and not tma_ok:
            return _pick(GENERIC_FALLBACK, m)
        return cfg
    if arch >= (8, 0):
        return _pick(AMPERE_TABLE, m)
    return _pick(GENERIC_FALLBACK, m)


@functools.cache
def for_residual(cfg: GemmConfig) -> GemmConfig:
    """The config a GEMM with the gated residual epilogue runs with: the residual tile comes in through TMA,
    into shared memory, and in two halves that buffer fits next to the operand stages with two CTAs per SM
    (98 KB vs 131 KB for 128 x 128 tiles, bench/check_ptx.py). Other configs are returned as they are."""
    if cfg.kernel != "tma" or cfg.epilogue_subtile:
        return cfg
    return dataclasses.replace(cfg, epilogue_subtile=True)
