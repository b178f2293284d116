"""GEMM tile configurations, chosen by rule from the GPU generation and an M bucket.

There is no autotuning at run time: a diffusion model sees a new token count with every
resolution, batch size or reference image, and re-tuning for each would stall the first step.
The table below was tuned once per GPU generation with ``bench/sweep_gemm.py`` (results in
``bench/results/``); a config depends only on (arch, M bucket), never on the exact M.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one INT8 GEMM kernel.

    kernel: "tma" (persistent, TMA descriptors, wgmma; SM 9.0+), "generic" (pointer loads; any
    SM >= 8.0, any K and N) or "gemv" (M <= 4: activation quantization fused in, int32 products on
    the CUDA cores; block_m is ignored, block_n is the widest used at M = 1). epilogue_subtile
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
        if self.kernel not in ("tma", "generic", "gemv"):
            raise ValueError(f"GemmConfig.kernel: expected 'tma', 'generic' or 'gemv', got {self.kernel!r}")
        if self.ctas_per_sm < 1:
            raise ValueError(f"GemmConfig.ctas_per_sm: expected >= 1, got {self.ctas_per_sm}")
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name}: expected a power of two >= 16, got {v}")


GEMV_M = 4  # M <= 4: batch-1/2 modulation layers; the CUDA-core GEMV reads the weight once
SMALL_M = 16  # M <= 16: short text; tensor cores on a 16-row tile, still bound by the weight
# Bucket upper bounds used by the tables below: (4, 16, 64, 256, 1024, unbounded).

# (max M of the bucket, config). Hopper: wgmma wants BLOCK_M in multiples of 64 per warpgroup.
HOPPER_TABLE: tuple[tuple[int, GemmConfig], ...] = (
    (GEMV_M, GemmConfig("gemv", 16, 64, 128, group_m=1, num_warps=4, num_stages=4)),
    # H200 sweep (bench/results/h200-sweep-small.txt): within 11% of the best config on each of
    # 1x4096x24576, 16x4096x24576, 1x16384x4096, 1x3072x9216 (GEMM alone).
    (SMALL_M, GemmConfig("generic", 16, 32, 512, group_m=1, num_warps=2, num_stages=4)),
    (64, GemmConfig("tma", 64, 128, 128, num_warps=4, num_stages=4)),
    (256, GemmConfig("tma", 128, 128, 128, num_warps=8, num_stages=4)),
    # H200 sweep (h200-sweep-m1024.txt): within 9% of the best on M=512 x {4096x24576, 16384x4096,
    # 4096x12288} and 1024x3072x27648.
    (1024, GemmConfig("tma", 64, 128, 128, group_m=8, num_warps=4, num_stages=4, ctas_per_sm=2)),
    # 2 programs per SM with 128x128 tiles: one program's epilogue hides under the other's main loop.
    # H200 sweep 2026-11-21 (bench/results/h200-sweep-large.txt): 1277 TOPS at 4608x4096x36864 vs 1243
    # for 128x256x128 with one program per SM; best on all five large klein shapes.
    (1 << 62, GemmConfig("tma", 128, 128, 64, group_m=8, num_warps=4, num_stages=4, ctas_per_sm=2)),
)

# Ampere / Ada (mma.sync): 100-164 KB of shared memory per SM, so smaller K tiles.
AMPERE_TABLE: tuple[tuple[int, GemmConfig], ...] = (
    (GEMV_M, GemmConfig("gemv", 16, 64, 128, group_m=1, num_warps=4, num_stages=4)),
    (SMALL_M, GemmConfig("generic", 16, 64, 256, group_m=1, num_warps=4, num_stages=4)),
    (64, GemmConfig("generic", 64, 128, 128, num_warps=4, num_stages=3)),
    (256, GemmConfig("generic", 128, 128, 64, num_warps=4, num_stages=4)),
    (1 << 62, GemmConfig("generic", 128, 256, 64, num_warps=8, num_stages=3)),
)

# Shapes the generic kernel takes on every GPU (unaligned K/N on Hopper, and the interpreter).
GENERIC_FALLBACK: tuple[tuple[int, GemmConfig], ...] = (
    (GEMV_M, GemmConfig("gemv", 16, 64, 128, group_m=1, num_warps=4, num_stages=4)),
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
