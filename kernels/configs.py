"""GEMM tile configurations: one table per GPU generation, chosen by an M bucket, and the rule for a
smaller config when a GPU rejects one for resources.

There is no autotuning at run time: a diffusion model sees a new token count with every
resolution, batch size or reference image, and re-tuning for each would stall the first step.
Each table was tuned once with ``bench/sweep_gemm.py`` (results in ``bench/results/``); a config
depends only on (table, M bucket), never on the exact M. Which generation gets which table is
``dispatch.GENERATIONS``.

Shared memory per block, in bytes, measured by compiling every config for the target without a GPU
(``python -m int8_w8a8.bench.check_ptx --arch N``; Triton 3.6.0 and 3.8.0): the numbers in the comments
are the worst of the plain, LoRA (rank 16 and 512), residual and residual + LoRA (rank 512) epilogues.
The offline check (``tests/test_targets.py``) fails when a table no longer fits its generations or
needs more than its recorded ``smem_bytes``.
"""

from __future__ import annotations

import dataclasses
import functools


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one INT8 GEMM kernel.

    kernel: "tma" (persistent, TMA descriptors; SM 9.0+) or "generic" (pointer loads; any SM >= 8.0,
    any K and N). epilogue_subtile stores the output tile in two halves (less shared memory, one more
    pipeline stage fits). ctas_per_sm > 1 launches that many persistent programs per SM, so one
    program's epilogue overlaps another's main loop.
    warp_spec (TMA kernel, 4 warps, Hopper only; ``HOPPER_TABLE``'s large-M row): the K loop is marked
    ``warp_specialize``, and Triton 3.6's Hopper pass splits each program into a TMA producer warpgroup and two
    consumer warpgroups of BLOCK_M / 2 rows (12 warps, ``setmaxnreg`` 40 / 232); the operands' descriptors are
    made in the kernel (see ``triton_gemm._gemm_tma_kernel``). The register split leaves one program per SM.
    lora_loop: a LoRA term of more than one 64-rank chunk runs its chunks in a loop, one accumulator for all,
    instead of unrolled (datacenter Blackwell: see ``BLACKWELL_TABLE``).
    kernel "gluon" (Hopper only; ``HOPPER_GLUON_TABLE``'s large-M rows): ``kernels/gluon_gemm.py``, one program per
    output tile with each K step's wgmma left in flight while the next is issued (Triton 3.6 waits for every int32
    wgmma at once, bench/NOTES.md item 56); block_m = 16 * num_warps, block_n 64/128/256, num_stages its TMA ring.
    No LoRA epilogue, split tail or subtiles: GEMMs with a LoRA term run the table's ``plain`` configs.
    max_registers (Gluon only; 0: the compiler's choice): ptxas's register cap per thread; 128 at 8 warps lets two
    programs share an SM (item 59).
    split_tail (TMA kernel, not warp-specialized): 0 (off), or the fewest K tiles one part of a split tile runs. When
    the last wave of the persistent grid (after at least one full wave) holds at most half as many tiles as there
    are programs, those tiles are split over K among the idle programs and summed in int32 (bit-identical;
    ``triton_gemm._gemm_tma_kernel``, ``tail_plan``); each part runs at least ``split_tail`` K tiles (the int32
    partial sums go through L2 atomics: short parts cost more than they save).
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
    lora_loop: bool = False
    warp_spec: bool = False
    split_tail: int = 0
    max_registers: int = 0

    def __post_init__(self) -> None:
        if self.kernel not in ("tma", "generic", "gluon"):
            raise ValueError(f"GemmConfig.kernel: expected 'tma', 'generic' or 'gluon', got {self.kernel!r}")
        if self.kernel == "gluon":
            _check_gluon(self)
        elif self.max_registers:
            raise ValueError(f"GemmConfig.max_registers: only the 'gluon' kernel takes a register cap, got "
                             f"{self.max_registers} for kernel {self.kernel!r}")
        if self.warp_spec and (self.kernel != "tma" or self.num_warps != 4 or self.epilogue_subtile):
            # the halved output tile's reshape/split fails Triton 3.6's Hopper pass ("unsupported op type")
            raise ValueError(f"GemmConfig.warp_spec: needs kernel 'tma', num_warps 4 (the consumers' warps) and no "
                             f"epilogue_subtile, got kernel {self.kernel!r}, num_warps {self.num_warps}, "
                             f"epilogue_subtile {self.epilogue_subtile}")
        if self.split_tail < 0:
            raise ValueError(f"GemmConfig.split_tail: expected 0 (off) or K tiles >= 1, got {self.split_tail}")
        if self.split_tail and (self.kernel != "tma" or self.warp_spec):
            raise ValueError("GemmConfig.split_tail: needs kernel 'tma' without warp_spec")
        if self.ctas_per_sm < 1:
            raise ValueError(f"GemmConfig.ctas_per_sm: expected >= 1, got {self.ctas_per_sm}")
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name}: expected a power of two >= 16, got {v}")


def gluon_tile_problem(block_m: int, block_n: int, block_k: int, num_warps: int, stages: int,
                       max_registers: int, stages_field: str = "num_stages") -> str | None:
    """What is wrong with a Gluon GEMM tile (``kernels/gluon_gemm.py``: every warp owns 16 rows of the wgmma layout,
    an 8-bit wgmma is at most 224 wide, K steps of 32, one product in flight needs two ring buffers), or None. The
    one rule ``GemmConfig`` (kernel "gluon") and ``gluon_gemm.GluonGemmConfig`` both check; ``stages_field``: what
    the caller calls the ring's depth."""
    if num_warps not in (4, 8) or block_m != 16 * num_warps:
        return f"block_m must be 16 * num_warps with 4 or 8 warps, got block_m {block_m}, num_warps {num_warps}"
    if block_n not in (64, 128, 256) or block_k % 32 or not 32 <= block_k <= 256:
        return f"block_n in (64, 128, 256) and block_k a multiple of 32 up to 256, got {block_n}, {block_k}"
    if stages < 2:
        return f"{stages_field} >= 2 (one product in flight keeps its buffer), got {stages}"
    if max_registers and not 64 <= max_registers <= 255:
        return f"max_registers 0 (the compiler's choice) or 64..255, got {max_registers}"
    return None


def _check_gluon(cfg: GemmConfig) -> None:
    """``gluon_tile_problem`` for a Gluon ``GemmConfig``, and what the Gluon kernel does not have."""
    problem = gluon_tile_problem(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages,
                                 cfg.max_registers)
    if problem is not None:
        raise ValueError(f"GemmConfig (gluon): {problem}")
    if cfg.warp_spec or cfg.split_tail or cfg.epilogue_subtile or cfg.lora_loop or cfg.ctas_per_sm != 1:
        raise ValueError("GemmConfig (gluon): no warp_spec, split_tail, epilogue_subtile, lora_loop or ctas_per_sm "
                         "(two programs share an SM through max_registers)")


@dataclasses.dataclass(frozen=True)
class GemmTable:
    """The GEMM configs of one kind of GPU: ``rows`` of (largest M of the bucket, config), ascending.

    smem_bytes: the most shared memory per block any of its kernels needs (measured, see the module
    docstring); dispatch compares it with the GPU's opt-in limit before choosing the table.
    unaligned: the table for operands TMA cannot take (K or N not a multiple of 16, strided weights),
    when the rows use the TMA kernel.
    plain: where some rows are warp-specialized, the table without them, for the GEMMs those rows do not serve: a
    dynamic LoRA term in the epilogue (the LoRA operands' loads, pipelined by Triton 3.6's Hopper pass, did not give
    the plain kernel's bits on the H200), a gated residual epilogue (with the residual tile read through TMA in the
    consumers, ~0.03 % of the values differed from the plain kernel's once a program runs several tiles, at every
    large shape on the H200, and with 5-6 stages from call to call: a race, bench/NOTES.md item 47) and outputs
    narrower than the row's tile (a LoRA's down projection, N = its rank: a 128 x 256 tile would multiply 4-16x the
    columns it keeps). Gluon rows (``GemmConfig.kernel`` "gluon") take a gated residual but no LoRA term, so LoRA
    GEMMs and narrow outputs run ``plain`` there too.
    without_gluon: for a table with Gluon rows, the table to run where the Gluon kernel cannot
    (``dispatch.gluon_error``: a Triton without Gluon or older than the one it was measured with).
    narrow: where the largest-M row has a wider tile than the row below it, the table without that row, for outputs
    narrower than that tile; also what ``dispatch`` runs under ``INT8_W8A8_DISABLE_GLUON_XL=1`` (an A/B switch).
    """

    name: str
    rows: tuple[tuple[int, GemmConfig], ...]
    smem_bytes: int
    unaligned: GemmTable | None = None
    plain: GemmTable | None = None
    without_gluon: GemmTable | None = None
    narrow: GemmTable | None = None

    def __post_init__(self) -> None:
        if self.gluon and self.without_gluon is None:
            raise ValueError(f"GemmTable {self.name!r}: a table with Gluon rows needs without_gluon")

    def pick(self, m: int, tma_ok: bool = True, lora: bool = False, n: int | None = None,
             residual: bool = False) -> GemmConfig:
        """The config for M rows; ``tma_ok``: the operands meet TMA's rules (``triton_gemm.tma_compatible``);
        ``lora``: the GEMM adds a LoRA term in its epilogue; ``n``: its output columns, when known; ``residual``:
        its epilogue adds into a gated residual (see ``plain``)."""
        cfg = self._pick(m, tma_ok)
        if self.narrow is not None and n is not None and n < cfg.block_n:
            return self.narrow.pick(m, tma_ok, lora, n, residual)
        special = cfg.warp_spec or cfg.kernel == "gluon"
        if special and self.plain is not None and (lora or (residual and cfg.warp_spec)
                                                    or (n is not None and n < cfg.block_n)):
            return self.plain.pick(m, tma_ok)
        return cfg

    def _pick(self, m: int, tma_ok: bool) -> GemmConfig:
        cfg = self.rows[-1][1]
        for max_m, c in self.rows:
            if m <= max_m:
                cfg = c
                break
        if cfg.kernel in ("tma", "gluon") and not tma_ok:
            return self.unaligned.pick(m)
        return cfg

    @property
    def tma(self) -> bool:
        """Whether any of its configs runs a TMA kernel (the caller then checks the operands)."""
        return any(cfg.kernel in ("tma", "gluon") for _, cfg in self.rows)

    @property
    def gluon(self) -> bool:
        """Whether any of its rows runs the Gluon kernel."""
        return any(cfg.kernel == "gluon" for _, cfg in self.rows)

    def configs(self) -> tuple[GemmConfig, ...]:
        """Every config a GEMM may run with from this table (also those for unaligned operands and LoRA terms),
        each once."""
        own = tuple(cfg for _, cfg in self.rows)
        for other in (self.unaligned, self.plain, self.narrow):
            own += other.configs() if other else ()
        return tuple(dict.fromkeys(own))


SMALL_M = 16  # M <= 16: modulation layers and short text; bound by reading the weight once
_LARGE = 1 << 62

# The pointer-load kernel on mma.sync: Ampere (8.0, 8.6), Ada (8.9), consumer Blackwell (12.x), GPUs
# without a rule, ROCm, and every GPU's operands that TMA cannot take. One table serves them all: every config
# fits 99 KB (sm_86, sm_89 and sm_120 allow 101,376 bytes per block). Not yet swept on those GPUs (the tiles
# follow the Hopper results within that limit); run on the H200 as the "sm_8x path" stand-in
# (bench/run_on_gpu.sh tests-sm8x, model-9b-sm8x). Bytes on sm_80-89 and sm_120, Triton 3.6 and 3.8, any
# epilogue; where Triton lowers them to wgmma (sm_90) or tcgen05 (sm_100, 3.8) they take up to 73,744.
MMA_TABLE = GemmTable("mma.sync (sm_8x)", (
    (SMALL_M, GemmConfig("generic", 16, 64, 256, group_m=1, num_warps=4, num_stages=4)),  # 61,440
    (64, GemmConfig("generic", 64, 128, 128, num_warps=4, num_stages=3)),  # 49,152
    (256, GemmConfig("generic", 128, 128, 64, num_warps=4, num_stages=4)),  # 49,152
    (_LARGE, GemmConfig("generic", 128, 256, 64, num_warps=8, num_stages=3)),  # 49,152
), smem_bytes=73_744)

# Hopper (9.0) without warp specialization: TMA + wgmma. Entries from bench/sweep_gemm.py on the H200
# (bench/results/h200-sweep-*.json), picked with bench/pick_configs.py: the config whose worst shape in the bucket is
# closest to that shape's best. wgmma wants BLOCK_M in multiples of 64 per warpgroup. Bytes on sm_90 (Triton 3.6 and
# 3.8 alike; on sm_100 Triton 3.6 needs 164,376 / 131,608 / 90,648 / 82,456 for the TMA rows, 3.8 up to 213,552): the
# H200 allows 232,448 per block and 233,472 per SM, so the two-programs-per-SM configs above 116 KB run one program
# per SM at a time (the sweep still measured them best). HOPPER_TABLE runs these but for its large-M row; GEMMs with
# a LoRA term or outputs narrower than that row's tile run these on Hopper (``GemmTable.plain``), and datacenter
# Blackwell runs their tiles (``BLACKWELL_TABLE``).
HOPPER_PLAIN_TABLE = GemmTable("hopper (sm_90), not warp-specialized", (
    # >= 0.89 of the best on 16x4096x24576, 8x16384x4096, 5x3072x9216; 73,728
    (SMALL_M, GemmConfig("generic", 16, 32, 512, group_m=1, num_warps=2, num_stages=4)),
    # >= 0.88 on 64x4096x24576, 33x4096x12288, 64x16384x4096; 213,536
    (64, GemmConfig("tma", 64, 128, 256, num_warps=4, num_stages=4, ctas_per_sm=2)),
    # >= 0.86 on 256x4096x12288, 128x4096x24576, 200x16384x4096; 164,384
    (256, GemmConfig("tma", 128, 128, 128, num_warps=4, num_stages=4)),
    # >= 0.91 on 512 x {4096x24576, 16384x4096, 4096x12288} and 1024x3072x27648; 115,232
    (1024, GemmConfig("tma", 64, 128, 128, num_warps=4, num_stages=4, ctas_per_sm=2)),
    # best on all five large klein shapes (1277 TOPS at 4608x4096x36864 vs 1243 for 128x256x128 with
    # one program per SM): two programs per SM, so one's epilogue runs under the other's main loop; 98,848.
    # split_tail=64 (parts of >= 4096 K): a half-empty last wave split over K measured 1.11-1.13x at K = 12288-15360
    # (Chroma's single-block linear2 0.410 -> 0.364 ms) and 1.03x at K = 10240-16384, but 0.88-0.99x at K = 3840 and
    # 0.97x at K = 4096 (parts of 5-21 K tiles); bench/NOTES.md item 34
    (_LARGE, GemmConfig("tma", 128, 128, 64, num_warps=4, num_stages=4, ctas_per_sm=2, split_tail=64)),
), smem_bytes=213_552, unaligned=MMA_TABLE)

# The large-M row warp-specialized: 128 x 256 x 64 tiles, 4 stages, a TMA producer warpgroup and two consumers of 64
# rows (``GemmConfig.warp_spec``). Bit-identical to the plain kernel once the epilogue kept its row offset out of the
# row tensors (bench/NOTES.md item 44); on the H200 (2026-12-03, ``results/h200-sweep-gemm-ws-session9.txt``)
# 1.00-1.13x the plain row's config on the seven large klein / Z-Image shapes (1109-1330 TOPS; cuBLAS FP8 1231-1447).
# It has no split tail: at K = 16384 it still beat the plain config with its split (1.11x). GEMMs with a LoRA term and
# outputs narrower than 256 columns run the plain table (``GemmTable.plain``).
HOPPER_WS_LARGE = GemmConfig("tma", 128, 256, 64, num_warps=4, num_stages=4, warp_spec=True)
HOPPER_TABLE = GemmTable(
    "hopper (sm_90)", (*HOPPER_PLAIN_TABLE.rows[:-1], (_LARGE, HOPPER_WS_LARGE)),
    smem_bytes=HOPPER_PLAIN_TABLE.smem_bytes, unaligned=MMA_TABLE, plain=HOPPER_PLAIN_TABLE)

# The large-M row in Gluon (``kernels/gluon_gemm.py``): 128 x 128 x 128 tiles at 8 warps, a ring of 3 TMA stages,
# each K step's wgmma in flight while the next is issued, registers capped at 128 so two programs share an SM
# (98 KB of shared memory each). On the H200 (2026-12-03, ``results/h200-gluon-gemm-session16.txt``, bench/NOTES.md
# item 60) 1.00-1.13x HOPPER_TABLE's warp-specialized row at the large Z-Image / Chroma / Qwen-Image / klein shapes
# but 0.95x at klein 9B's 36864-wide single-block projection, and 1.01-1.15x the plain row with the gated residual
# epilogue; bit for bit the twin. Where Triton has no Gluon (or is older than 3.6, what it was measured with) the
# dispatch runs HOPPER_TABLE (``dispatch.gluon_error``).
HOPPER_GLUON_LARGE = GemmConfig("gluon", 128, 128, 128, num_warps=8, num_stages=3, max_registers=128)
HOPPER_GLUON_128_TABLE = GemmTable(
    "hopper (sm_90), Gluon large-M row", (*HOPPER_PLAIN_TABLE.rows[:-1], (_LARGE, HOPPER_GLUON_LARGE)),
    smem_bytes=HOPPER_PLAIN_TABLE.smem_bytes, unaligned=MMA_TABLE, plain=HOPPER_PLAIN_TABLE,
    without_gluon=HOPPER_TABLE)
# Past 8192 rows (Wan's 14040 video tokens at 832x480x33; FLUX.2 and Z-Image at 2048x2048) the Gluon row in
# 128 x 256 x 128 tiles, 3 stages, one program an SM (the int32 accumulator takes 128 registers a thread; 147 KB of
# shared memory): 25 % fewer operand bytes per multiply-add than two 128 x 128 programs. On the H100 at the 700 W
# cap (2026-12-05, ``results/h100-sustained-gemm-wan-session31.txt``, bench/NOTES.md item 92) at Wan's three GEMM
# shapes (M = 14040): 0.621 / 1.632 / 1.499 ms against the 128-wide row's 0.658 / 1.805 / 1.746 (1.06 / 1.11 /
# 1.16x; cuBLAS FP8 per tensor 0.605 / 1.634 / 1.631), the table's bits; with the gated residual epilogue 0.668 /
# 1.777 / 1.559 against 0.705 / 1.911 / 1.826 (1.06 / 1.08 / 1.17x). Its K loop keeps every value in registers; the
# epilogue spills (an 80-byte stack, 296 with the residual; the 128-wide row's 48 / 184). Wan's eager step on the
# H100: 587.7 ms against 624.1 with the 128-wide row in one call. Outputs narrower than 256 columns keep the
# 128-wide row (``GemmTable.narrow``).
HOPPER_GLUON_XL = GemmConfig("gluon", 128, 256, 128, num_warps=8, num_stages=3)
GLUON_XL_M = 8192  # the largest M of the 128-wide Gluon row's bucket
HOPPER_GLUON_TABLE = GemmTable(
    "hopper (sm_90), Gluon large-M rows",
    (*HOPPER_PLAIN_TABLE.rows[:-1], (GLUON_XL_M, HOPPER_GLUON_LARGE), (_LARGE, HOPPER_GLUON_XL)),
    smem_bytes=HOPPER_PLAIN_TABLE.smem_bytes, unaligned=MMA_TABLE, plain=HOPPER_PLAIN_TABLE,
    without_gluon=HOPPER_TABLE, narrow=HOPPER_GLUON_128_TABLE)


def glu_form(cfg: GemmConfig) -> GemmConfig:
    """The SwiGLU GEMM's config for a Gluon row ``cfg``: the 128-wide form (``HOPPER_GLUON_LARGE``), the one its
    kernel (``gluon_gemm._gluon_glu_kernel``) was checked and measured with; other configs as given."""
    return HOPPER_GLUON_LARGE if cfg.kernel == "gluon" else cfg


# The warp-specialized Hopper configs the sweep compares (``GemmConfig.warp_spec``; ``bench/sweep_gemm.py --bucket ws``,
# ``bench/run_on_gpu.sh gemm-ws``); the fourth is HOPPER_TABLE's large-M row. Until item 44 (bench/NOTES.md) their
# second consumer read the x scales of rows 64 too far (Triton 3.6's pass moved both the row range and the offset
# added to it), so no config was bit-identical past row 64 (item 28). Offline on sm_90 (Triton 3.6,
# ``python -m int8_w8a8.bench.check_ptx --ws``): 12 warps, setmaxnreg 40 / 232, no spills; shared bytes of the
# plain epilogue in the comments. Integer wgmma is at most n128 in Triton 3.6 (its int8 instruction shapes stop
# at n224 and a tile's N must divide by it), so a 128 x 256 tile's consumers issue two m64n128k32 per k step.
HOPPER_WS_VARIANTS: tuple[GemmConfig, ...] = (
    GemmConfig("tma", 128, 128, 64, num_warps=4, num_stages=4, warp_spec=True),  # 98,792
    GemmConfig("tma", 128, 128, 128, num_warps=4, num_stages=3, warp_spec=True),  # 131,544
    GemmConfig("tma", 128, 256, 64, num_warps=4, num_stages=3, warp_spec=True),  # 139,736
    HOPPER_WS_LARGE,  # 164,328
    GemmConfig("tma", 128, 256, 128, num_warps=4, num_stages=2, warp_spec=True),
    # deeper pipelines of the large-M row (not swept yet): the producer prefetches further into the next tile while
    # the consumers run the epilogue
    GemmConfig("tma", 128, 256, 64, num_warps=4, num_stages=5, warp_spec=True),  # 189,000
    GemmConfig("tma", 128, 256, 64, num_warps=4, num_stages=6, warp_spec=True),  # 213,592
)


def without_warp_spec(cfg: GemmConfig) -> GemmConfig:
    """``cfg`` without warp specialization, for GPUs other than Hopper (the switch is Hopper's pass): the same
    tiles, with 8 warps for a 128 x 256 tile (4 would hold its int32 accumulator in 256 registers a thread)."""
    if not cfg.warp_spec:
        return cfg
    return dataclasses.replace(cfg, warp_spec=False, num_warps=max(cfg.num_warps, cfg.block_m * cfg.block_n // 4096))


def for_arch(cfg: GemmConfig, arch: tuple[int, int]) -> GemmConfig:
    """The config a GEMM runs with on a GPU of compute capability ``arch``: warp specialization only on 9.x."""
    return cfg if not cfg.warp_spec or arch[0] == 9 else without_warp_spec(cfg)


def without_gluon(cfg: GemmConfig) -> GemmConfig:
    """``cfg``, or for a Gluon config the plain TMA kernel's large-M config (``HOPPER_PLAIN_TABLE``'s, the best
    plain config at the shapes the Gluon row serves): where the Gluon kernel cannot run (off Hopper, in Triton's
    interpreter) or has no epilogue for the call (a LoRA term). Both give the twin's bits."""
    return HOPPER_PLAIN_TABLE.rows[-1][1] if cfg.kernel == "gluon" else cfg


def for_launch(cfg: GemmConfig, arch: tuple[int, int] | None, lora: bool, residual: bool) -> GemmConfig:
    """The config ``triton_gemm.gemm`` launches for ``cfg`` given directly (the tables never pick these cases):
    warp specialization only on Hopper (``arch``, None: unknown, as given), and never with a LoRA term (a float32
    LoRA dot fails Triton 3.6's Hopper pass; a bfloat16 one did not give the plain kernel's bits in 4 of 20
    cases on the H200, bench/NOTES.md item 44) or a gated residual (~0.03 % of the values differed at every large
    shape, with deeper pipelines from call to call: item 47), which run the same tiles unspecialized, a residual
    with its output in halves as ``for_residual`` gives it. A Gluon config runs only on Hopper and without a LoRA
    term (``without_gluon`` otherwise); it has its own residual epilogue."""
    if cfg.kernel == "gluon":
        return without_gluon(cfg) if lora or (arch is not None and arch[0] != 9) else cfg
    if not cfg.warp_spec:
        return cfg
    if arch is not None:
        cfg = for_arch(cfg, arch)
    if lora or residual:
        cfg = without_warp_spec(cfg)
    return for_residual(cfg) if residual else cfg


def _lora_loop(table: GemmTable, name: str) -> GemmTable:
    unaligned = _lora_loop(table.unaligned, table.unaligned.name) if table.unaligned else None
    rows = tuple((m, dataclasses.replace(cfg, lora_loop=True)) for m, cfg in table.rows)
    return GemmTable(name, rows, table.smem_bytes, unaligned)


# Datacenter Blackwell (10.x): the Hopper tiles, TMA loads, and whatever Triton lowers an int8 dot to there:
# mma.sync with Triton 3.6 (it has no tcgen05 int8 lowering), tcgen05 kind::i8 with 3.8 (checked offline,
# bench/check_ptx.py --arch 100). The LoRA epilogue's chunks run in a loop: its bf16 (and float32) dots lower
# to tcgen05 there, and Triton 3.6 gives each unrolled 64-rank chunk its own accumulator in tensor memory (a
# 128-row tile at rank 512 asked for 1,024-1,088 of 512 columns and compiled to a kernel that only traps);
# looped, one accumulator takes 128-256 columns. One dot per iteration also stays clear of triton#10821 (two
# tcgen05 dots into one accumulator per loop iteration miscompile in Triton 3.6-3.8). Never run on the
# hardware. sm_100 allows 232,448 bytes per block, like sm_90.
BLACKWELL_TABLE = _lora_loop(HOPPER_PLAIN_TABLE, "blackwell (sm_100)")


def smaller(cfg: GemmConfig) -> GemmConfig | None:
    """The next smaller config of the same kernel, for a launch the GPU rejected for resources
    (``launch.first_fit``), or None when there is none. Cheapest loss first: the TMA kernel's output tile
    in halves, then fewer pipeline stages, then a shorter K tile, then narrower and shorter tiles. A Gluon config
    gives up a stage, then becomes the plain TMA kernel's large-M config (``without_gluon``)."""
    if cfg.kernel == "gluon":
        return dataclasses.replace(cfg, num_stages=cfg.num_stages - 1) if cfg.num_stages > 2 else without_gluon(cfg)
    if cfg.kernel == "tma" and not cfg.epilogue_subtile and not cfg.warp_spec:
        return dataclasses.replace(cfg, epilogue_subtile=True)
    if cfg.num_stages > 2:
        return dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
    if cfg.block_k > 32:  # the int8 MMA takes K in steps of 32
        return dataclasses.replace(cfg, block_k=cfg.block_k // 2)
    if cfg.block_n > 32:
        return dataclasses.replace(cfg, block_n=cfg.block_n // 2)
    if cfg.warp_spec:  # a warp-specialized program needs its 128 rows (two 64-row consumers)
        return without_warp_spec(cfg)
    if cfg.block_m > (64 if cfg.kernel == "tma" else 16):  # wgmma: 64 rows per warpgroup
        return dataclasses.replace(cfg, block_m=cfg.block_m // 2)
    return None


@functools.cache
def for_residual(cfg: GemmConfig) -> GemmConfig:
    """The config a GEMM with the gated residual epilogue runs with: the residual tile comes in through TMA,
    into shared memory, and in two halves that buffer fits next to the operand stages with two CTAs per SM
    (98 KB vs 131 KB for 128 x 128 tiles, bench/check_ptx.py). Other configs are returned as they are; the tables
    give a residual epilogue no warp-specialized config (``GemmTable.plain``), and one given directly runs
    without the specialization (``for_launch``)."""
    if cfg.kernel != "tma" or cfg.epilogue_subtile or cfg.warp_spec:
        return cfg
    return dataclasses.replace(cfg, epilogue_subtile=True)
