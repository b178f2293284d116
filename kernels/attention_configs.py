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
* pv = "16bit": P (in [0, 1]) in V's own type (bf16 or fp16) and V as given, not quantized: INT8 Q K^T with
  a 16-bit P V, SageAttention 1's split on wgmma. The quantization pass reads and writes no V, P V accumulates
  into the float32 accumulator directly (16-bit wgmma keeps full float32 sums), and its float32 accumulator lets
  Triton leave that product in flight (bench/NOTES.md item 56); P V runs at the 16-bit rate, half the 8-bit one.
  About 1.1 % relative error on Gaussian inputs (INT8 Q and K alone).

The 8-bit forms accumulate each block's P @ V separately and add it to the float32 accumulator (the 8-bit
tensor-core accumulator keeps ~13 mantissa bits on Hopper: accumulated over thousands of keys it would
lose ~2 %).
"""

from __future__ import annotations

import dataclasses

PV_FORMATS = ("int8", "fp8", "16bit")
HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Quantized format and Triton launch of one 8-bit attention variant.

    block_m: query rows per program (64 per warpgroup on Hopper's wgmma).
    block_n: keys per iteration, and the number of keys one K scale covers; <= 128 keeps the int8 P V
        partial sums exact in float32.
    num_warps, num_stages: Triton launch options (stages: TMA loads in flight in the pipelined loop).
    pv: "int8", "fp8" or "16bit" (module docstring).
    rotate: Hadamard rotation of Q and K before quantizing.
    warp_spec: mark the key loop ``tl.range(..., warp_specialize=True)``: on sm_90 Triton 3.6's Hopper pass splits
        the program into a TMA producer warpgroup and two consumer warpgroups (12 warps, ``setmaxnreg``), the
        consumers splitting the block_m rows (so block_m = 128 at num_warps = 4 gives each consumer 64 rows, the
        FlashAttention-3 layout). Every key block is masked (the pass rejects the separate tail block).
    loop_stages: ``tl.range(..., num_stages=loop_stages)`` on the key loop (0: none, the launch's num_stages);
        the loop attribute pipelines every load of the loop, not only those that feed a dot.
    no_acc_multibuf: ``tl.range(..., disallow_acc_multi_buffer=True)``.
    split_quant_kv: the quantization pass's K/V kernel quantizes K and V in separate programs (a third grid
        axis): half the registers per program (NOTES item 23: 255 at 8 warps for both), each reading only its
        own statistics. The same numbers.
    defer_pv: ("16bit" only, not with warp_spec) the key loop runs each block's P V one iteration late: block j's
        Q K^T, then block j - 1's P V, then block j's softmax, whose exp2s then run under that product (Triton
        waits for the int8 Q K^T at issue, NOTES item 56, but leaves the float32-accumulated P V in flight). The
        same numbers, bit for bit.
    """

    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2
    pv: str = "int8"
    rotate: bool = True
    warp_spec: bool = False
    loop_stages: int = 0
    no_acc_multibuf: bool = False
    split_quant_kv: bool = False
    defer_pv: bool = False

    def __post_init__(self) -> None:
        if self.pv not in PV_FORMATS:
            raise ValueError(f"AttentionConfig.pv: expected one of {PV_FORMATS}, got {self.pv!r}")
        for name, lo, hi in (("block_m", 16, 256), ("block_n", 16, 128)):
            v = getattr(self, name)
            if v < lo or v > hi or v & (v - 1):
                raise ValueError(f"AttentionConfig.{name}: expected a power of two in [{lo}, {hi}], got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1 or self.loop_stages < 0:
            raise ValueError(f"AttentionConfig: bad launch options num_warps={self.num_warps}, "
                             f"num_stages={self.num_stages}, loop_stages={self.loop_stages}")
        if self.defer_pv and (self.pv != "16bit" or self.warp_spec):
            raise ValueError(f"AttentionConfig.defer_pv: needs pv='16bit' without warp_spec, got pv={self.pv!r}, "
                             f"warp_spec={self.warp_spec}")

    @property
    def quantizes_v(self) -> bool:
        """Whether the quantization pass reads and quantizes V (the 8-bit P V forms); "16bit" reads V as given."""
        return self.pv != "16bit"

    @property
    def name(self) -> str:
        return (f"{self.pv}-{self.block_m}x{self.block_n}-w{self.num_warps}-s{self.num_stages}"
                + ("" if self.rotate else "-norot") + ("-ws" if self.warp_spec else "")
                + (f"-ls{self.loop_stages}" if self.loop_stages else "") + ("-noaccmb" if self.no_acc_multibuf else "")
                + ("-qsplit" if self.split_quant_kv else "") + ("-defer" if self.defer_pv else ""))


# The variants one benchmark run measures (bench/bench_attention.py), first = the default.
# Hopper wgmma: 64 query rows per warpgroup, so 128-row tiles take 8 warps. Offline (sm_90, D = 128,
# bench/check_ptx_attention.py): 128x128 at 8 warps takes over 200 registers per thread, one program per SM,
# whose two warpgroups the loop's CTA barriers (TMA buffer reuse) keep in step; 64-row tiles at 4 warps
# take 168-243 registers, two (64x128) or three (64x64) independent programs per SM, so one program's
# softmax can run while another's wgmma does.
# The default since session 20 (bench/NOTES.md item 68, bench/results/h200-bench-attention-16bit-session20.txt): INT8
# Q K^T with a 16-bit P V, 64x128 tiles at 4 warps and 2 stages (186 registers, 106 KB: two programs per SM; 8.8 loop
# instructions per score against the int8 form's 14). On the H200 its kernel runs as fast as the int8 form's
# (6.55 vs 6.56 ms at Wan's H = 40, S = 14040) and its pass, with no V to read, takes half the time, so with the pass
# it is 1.03x cuDNN at Wan's shape, 0.98x at H = 32, S = 16896 and 0.77x at S = 4608 (the int8 form 0.99x, 0.93x,
# 0.67x in the same run), at rel. error 0.0117 instead of 0.0165. At 3 stages (156 KB, one program per SM) 0.79-0.84x,
# 128x128 at 8 warps 0.60-0.89x, 64x64 0.71-0.93x (64x64 at 4 stages the same as 3).
# The int8 P V form: int8 64x128 at 4 warps, 3 stages was the fastest form within the 2 % bound before (kernel
# 548-560 TFLOP/s, 0.82-0.88x cuDNN; item 20); 128x128 at 8 warps 391-438, 128x64 304-311; fp8 64x128 713-755
# (1.05-1.20x cuDNN) at 3.8 % error. Switches that took ALU work out of the int8 loop (fast_cvt, NOTES item 20;
# lazy_rescale, rowsum_dot, p_f16, biased_acc, item 23) measured no gain and were removed. Its pass quantizes K and V
# in separate programs (``split_quant_kv``): bit-identical, and on the H200 (session 4,
# bench/results/h200-bench-attention-ws.json) 0.211 instead of 0.231 ms at H = 32, S = 4608 and 0.669 instead of
# 0.759-0.766 ms at S = 16896 (255 -> 214-225 registers, NOTES item 29).
VARIANTS: tuple[AttentionConfig, ...] = (
    AttentionConfig(64, 128, 4, 2, "16bit"),
    AttentionConfig(64, 128, 4, 3, "int8", split_quant_kv=True),
    AttentionConfig(64, 128, 4, 3, "int8"),
    AttentionConfig(128, 128, 8, 2, "int8"),
    AttentionConfig(128, 128, 8, 3, "int8"),
    AttentionConfig(128, 64, 8, 3, "int8"),
    AttentionConfig(64, 64, 4, 3, "int8"),
    AttentionConfig(128, 128, 8, 2, "fp8"),
    AttentionConfig(64, 128, 4, 3, "fp8"),
    AttentionConfig(64, 64, 4, 3, "16bit"),
    # three programs per SM (offline sm_90, D = 128): 64x128 without pipelining (167 registers, 41 KB) and 64x64 at
    # 2 stages (138 registers, 57 KB)
    AttentionConfig(64, 128, 4, 1, "16bit"),
    AttentionConfig(64, 64, 4, 2, "16bit"),
    # P V one block late (defer_pv, session 21, bench/NOTES.md item 70): block j's softmax runs under block j - 1's P V
    # product (offline sm_90, D = 128: 348 PTX instructions under it against the default's 47; 251 registers, 106 KB,
    # two programs per SM). On the H200 no faster: kernel 6.51 vs 6.59 ms at Wan's shape, 7.63 vs 7.37 at H = 32,
    # S = 16896, 0.433 vs 0.441 at S = 4608 (bench/results/h200-bench-attention-defer-session21.txt); 128x128 at 8
    # warps, 64x64 and 3 stages deferred were slower still (0.70-1.03x cuDNN, kernel alone)
    AttentionConfig(64, 128, 4, 2, "16bit", defer_pv=True),
    # Triton's Hopper warp specialization (issue 14, session 3): one TMA producer warpgroup and two 64-row consumer
    # warpgroups sharing each K/V tile (12 warps, setmaxnreg 40 / 232, 168 registers at launch, no spills,
    # 99-132 KB shared memory, one program per SM; offline sm_90, bench/check_ptx_attention.py). Each consumer
    # still waits for its own wgmma (no ping-pong in Triton 3.6); every key block is masked (15.3 loop
    # instructions per score at D = 128 against the default's 14.2). Last: a variant whose mbarriers deadlock
    # on the GPU would stop the benchmark after the others ran. The 16-bit P V one: 0.64-0.94x cuDNN (session 20).
    AttentionConfig(64, 128, 4, 3, "int8", loop_stages=3),
    AttentionConfig(128, 128, 4, 2, "int8", warp_spec=True),
    AttentionConfig(128, 128, 4, 3, "int8", warp_spec=True),
    AttentionConfig(128, 128, 4, 2, "fp8", warp_spec=True),
    AttentionConfig(128, 128, 4, 2, "16bit", warp_spec=True),
)
DEFAULT = VARIANTS[0]

# Config per GPU generation (SM major, minor) that runs the Triton kernel; see attention.TRITON_ARCHS.
BY_ARCH: dict[tuple[int, int], AttentionConfig] = {(9, 0): DEFAULT}


def config_for(arch: tuple[int, int] | None) -> AttentionConfig:
    """The configuration for a GPU generation (the default where none was picked for it)."""
    return BY_ARCH.get(arch, DEFAULT) if arch is not None else DEFAULT
