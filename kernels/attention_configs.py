"""8-bit attention: the kernel configurations, as data.

One ``AttentionConfig`` fixes both the quantized format of Q/K/V (the K block a scale covers, how P and
V are represented, the Hadamard rotation) and the Triton launch (tiles, warps, pipeline stages). The
quantization pass and the attention kernel must agree on ``block_n`` (one K scale per ``block_n`` keys)
and ``pv``, so they are one object.

Numerics (the twin in ``reference_attention.py`` spells them out):

* Q: INT8 with one scale per token (the row scale folds into the one FMA per score that subtracts the
  running max, so it costs nothing over a per-block scale and keeps a NaN row from touching others).
* K: the per-head mean over tokens is subtracted (softmax does not see a shift that is the same for
  every key of a row), then INT8 with one scale per ``block_n`` keys: a scalar per tile in the kernel.
* rotate: Q and K are both multiplied by the same orthonormal Hadamard matrix of order D first. Dot
  products are unchanged; channels of K with a larger spread than the rest (outlier channels) are
  spread over all channels, so the per-block scale is not set by a few of them.
* pv = "int8": P relative to each block's row max, rounded to 0..254 and stored shifted by -127 as
  int8; V INT8 with one scale per channel; a per-block, per-channel column sum of V restores the shift.
  About 1.5 % relative error on Gaussian inputs (``reference_attention`` docstring: the error budget).
* pv = "fp8": P (times 448) and V (one scale per channel) in float8 e4m3, the form SageAttention2 runs on
  Hopper. e4m3 keeps 3 mantissa bits: each of P and V adds ~2.5 % relative error on Gaussian inputs, so
  this form measures ~3.5 % there, over the 2 % bound of issue 14; kept as a measured variant.

Both forms accumulate each block's P @ V separately and add it to the float32 accumulator (the 8-bit
tensor-core accumulator keeps ~13 mantissa bits on Hopper: accumulated over thousands of keys it would
lose ~2 %).

Switches of the int8 form that remove ALU work from the loop (issue 14, session 2; bench/NOTES.md item 23;
off until measured, each a field so one GPU run compares them):

* lazy_rescale: the accumulator and row sum are kept in units of the current block's reference max
  instead of the running max, so the per-block update is one FMA per element (``acc * gamma + PV``, gamma =
  2**(previous reference - this one)) instead of two (``acc * alpha + PV * beta``). The reference of a block is
  its row max, but never more than ``LAZY_RANGE`` (64, log2 units) below the running max, which bounds the
  accumulator by 2**64 times its true value (float32 holds 2**127). The scale cancels in ``acc / l``.
* rowsum_dot: the row sum ``l`` is the sum of the rounded P values, taken on the tensor cores by a
  [BLOCK_N, 16] ones matrix (one 64 x 16 wgmma per block) instead of a float add per score. It is then the
  exact normalizer of the P that multiplies V.
* p_f16: P is rounded to an integer through float16 (``x`` to f16 by round-to-nearest, then + 1153 in f16
  rounds it to an integer whose low byte is ``round - 127``): two scores per conversion and per add instead
  of one float add per score; double rounding moves a P value by one where x lies within 2**-4 of a .5
  (f16 has 3 fractional bits at 128..256).
* biased_acc (with lazy_rescale): the block's int32 ``PV + 127 colsum`` is added to 1.5 * 2**23 as integer
  bits (its float32 is 1.5 * 2**23 + PV exactly, no int-to-float conversion), and the accumulator carries
  1.5 * 2**23 times the summed block weights w (a per-row float, ``w = w * gamma + 1``) that the end takes off.
  The accumulator's magnitude becomes ~1.3e7 w, so each update rounds at ~w units of PV: ~1e-4 relative
  error on Gaussian inputs (PV of a block is ~1e4..1e5 units), against 1.5 % for the quantization. An
  all-zero V channel gives those few units times its scale (the smallest normal float32), not exact zeros.
"""

from __future__ import annotations

import dataclasses

PV_FORMATS = ("int8", "fp8")
HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Quantized format and Triton launch of one 8-bit attention variant.

    block_m: query rows per program (64 per warpgroup on Hopper's wgmma).
    block_n: keys per iteration, and the number of keys one K scale covers; <= 128 keeps every int32
        partial sum below 2**22, where ``fast_cvt`` converts it exactly.
    num_warps, num_stages: Triton launch options (stages: TMA loads in flight in the pipelined loop).
    pv: "int8" or "fp8" (module docstring).
    rotate: Hadamard rotation of Q and K before quantizing.
    lazy_rescale, rowsum_dot, p_f16, biased_acc: ALU savings of the int8 form (module docstring).
    fast_cvt: int32 -> float32 by adding 1.5 * 2**23 to the integer, reinterpreting the bits and subtracting
        1.5 * 2**23 (exact for |x| < 2**22) instead of a conversion instruction. The classic I2F runs at a
        quarter of the FMA rate, but ptxas for sm_90 emits I2FP.F32.S32, and the offline SASS of the default
        tile has 256 fewer instructions per iteration pair without the trick (bench/check_ptx_attention.py):
        off by default, measured as a variant.
    """

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2
    pv: str = "int8"
    rotate: bool = True
    fast_cvt: bool = False
    lazy_rescale: bool = False
    rowsum_dot: bool = False
    p_f16: bool = False
    biased_acc: bool = False

    def __post_init__(self) -> None:
        if self.pv not in PV_FORMATS:
            raise ValueError(f"AttentionConfig.pv: expected one of {PV_FORMATS}, got {self.pv!r}")
        for name, lo, hi in (("block_m", 16, 256), ("block_n", 16, 128)):
            v = getattr(self, name)
            if v < lo or v > hi or v & (v - 1):
                raise ValueError(f"AttentionConfig.{name}: expected a power of two in [{lo}, {hi}], got {v}")
        if self.pv != "int8" and (self.lazy_rescale or self.rowsum_dot or self.p_f16 or self.biased_acc):
            raise ValueError("AttentionConfig: lazy_rescale, rowsum_dot, p_f16 and biased_acc apply to pv='int8' only")
        if self.biased_acc and not (self.lazy_rescale and not self.fast_cvt):
            raise ValueError("AttentionConfig.biased_acc: needs lazy_rescale=True and fast_cvt=False (it replaces "
                             "the P V conversion inside the lazy update)")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1:
            raise ValueError(f"AttentionConfig: bad launch options num_warps={self.num_warps}, "
                             f"num_stages={self.num_stages}")

    @property
    def name(self) -> str:
        return (f"{self.pv}-{self.block_m}x{self.block_n}-w{self.num_warps}-s{self.num_stages}"
                + ("" if self.rotate else "-norot") + ("-fastcvt" if self.fast_cvt else "")
                + ("-lazy" if self.lazy_rescale else "") + ("-rowdot" if self.rowsum_dot else "")
                + ("-pf16" if self.p_f16 else "") + ("-biased" if self.biased_acc else ""))


# The variants one benchmark run measures (bench/bench_attention.py), first = the default.
# Hopper wgmma: 64 query rows per warpgroup, so 128-row tiles take 8 warps. Offline (sm_90, D = 128,
# bench/check_ptx_attention.py): 128x128 at 8 warps takes over 200 registers per thread, one program per SM,
# whose two warpgroups the loop's CTA barriers (TMA buffer reuse) keep in step; 64-row tiles at 4 warps
# take 168-207 registers, two (64x128) or three (64x64) independent programs per SM, so one program's
# softmax can run while another's wgmma does. Measured on the H200 (bench/results/h200-bench-attention.txt,
# NOTES item 20): int8 64x128 at 4 warps, 3 stages is the fastest form within the 2 % bound (kernel 548-560
# TFLOP/s, 0.82-0.88x cuDNN); 128x128 at 8 warps 391-438, 128x64 304-311, fast_cvt no gain; fp8 64x128
# 713-755 (1.05-1.20x cuDNN) at 3.8 % error. The switch variants (module docstring) follow it.
_BEST = AttentionConfig(64, 128, 4, 3, "int8")
_ALL = dataclasses.replace(_BEST, lazy_rescale=True, rowsum_dot=True, p_f16=True, biased_acc=True)
VARIANTS: tuple[AttentionConfig, ...] = (
    _BEST,
    dataclasses.replace(_BEST, lazy_rescale=True),
    dataclasses.replace(_BEST, rowsum_dot=True),
    dataclasses.replace(_BEST, p_f16=True),
    dataclasses.replace(_BEST, lazy_rescale=True, rowsum_dot=True, p_f16=True),
    _ALL,
    dataclasses.replace(_ALL, num_stages=2),
    dataclasses.replace(_ALL, block_n=64),
    dataclasses.replace(_ALL, block_m=128, num_warps=8),
    AttentionConfig(128, 128, 8, 3, "int8"),
    AttentionConfig(64, 128, 4, 3, "fp8"),
)
DEFAULT = VARIANTS[0]

# Config per GPU generation (SM major, minor) that runs the Triton kernel; see attention.TRITON_ARCHS.
BY_ARCH: dict[tuple[int, int], AttentionConfig] = {(9, 0): DEFAULT}


def config_for(arch: tuple[int, int] | None) -> AttentionConfig:
    """The configuration for a GPU generation (the default where none was picked for it)."""
    return BY_ARCH.get(arch, DEFAULT) if arch is not None else DEFAULT
