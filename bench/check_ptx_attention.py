"""Compile the 8-bit attention kernels for a GPU target without a GPU and check what the PTX uses.

    python -m int8_w8a8.bench.check_ptx_attention             # sm_90, every config in VARIANTS
    python -m int8_w8a8.bench.check_ptx_attention --json

For the attention kernel of each config: the wgmma instructions of both products (s8 x s8 for Q K^T; s8 or
e4m3 for P V), TMA loads, shared memory (227 KB per block on sm_90), registers, spills, and in the SASS the
conversion and exp2 instruction counts and the main loop's instructions per score. Also the three
quantization kernels. Must run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..kernels import attention_configs, triton_attention
from ..kernels.attention_configs import AttentionConfig
from .check_ptx import _resource_usage, global_access, int8_desc_sig, ptxas_waits

SMEM_LIMIT = {90: 232448, 100: 232448, 120: 101376, 80: 166912, 86: 101376, 89: 101376}  # bytes per block


def _compile(fn, sig: dict, consts: dict, divisible: tuple[str, ...], arch: int, options: dict):
    """triton.compile with the specializations the JIT applies at run time on aligned shapes:
    pointers and ints divisible by 16 (``tt.divisibility``) and unit strides folded to constants."""
    for name in consts:
        sig[name] = "constexpr"
    # in the kernel's parameter order: ``attrs`` name arguments by position, so a signature listed in another
    # order (constexpr strides moved to the end) would mark the wrong arguments divisible
    order = getattr(fn, "arg_names", None) or list(sig)
    sig = {name: sig[name] for name in sorted(sig, key=lambda n: order.index(n) if n in order else len(order))}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible if n in sig}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32), options=options)


def _sass(cubin: bytes) -> str:
    """The SASS of a cubin (cuobjdump -sass), or "" when the tool is missing."""
    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=False).stdout


def _loops(sass: str) -> list[tuple[int, int, list[str]]]:
    """Every loop of a SASS listing: (first address, backward branch's address, the instructions between), in the
    listing's order."""
    ins = [(int(m.group(1), 16), m.group(2).strip())
           for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in ins:
        m = re.search(r"\bBRA\b[^0]*0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            loops.append((lo, addr, [t for a, t in ins if lo <= a <= addr]))
    return loops


def main_loop(sass: str, scores: int, threads: int) -> dict:
    """The steady-state loop of the attention kernel in the SASS: the backward branch whose body holds the
    most wgmma instructions (ties: the shortest body) and no EXIT (the barrier-retry stubs after the kernel's
    end branch back into the loop too). ``loop_instr`` instructions per iteration per thread,
    ``instr_per_score`` = loop_instr * threads / scores (the issue slots one score takes: an SM issues 128
    thread-instructions per clock), ``loop_ops``: the ten most frequent opcodes. {} without SASS."""
    best = None
    for _, _, body in _loops(sass):
        if any(re.search(r"\bEXIT\b", t) for t in body):
            continue
        key = (sum("GMMA" in t for t in body), -len(body))
        if best is None or key > best[0]:
            best = (key, body)
    if best is None or best[0][0] == 0:
        return {}
    body = best[1]
    ops: dict[str, int] = {}
    for t in body:
        op = re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0]
        ops[op] = ops.get(op, 0) + 1
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:10])
    return {"loop_instr": len(body), "instr_per_score": round(len(body) * threads / scores, 2), "loop_ops": top}


def innermost_loops(sass: str) -> list[list[str]]:
    """The SASS loop bodies (a backward branch's target through the branch) that hold wgmma instructions and no
    inner loop that does, in address order: a warp-specialized kernel's per-partition key loops."""
    spans = [loop for loop in _loops(sass) if any("GMMA" in t for t in loop[2])]
    return [body for lo, hi, body in sorted(spans)
            if not any(lo <= lo2 and hi2 <= hi and (lo2, hi2) != (lo, hi) for lo2, hi2, _ in spans)]


def pv_wait(body: list[str]) -> dict:
    """Where a deferred P V loop body (block j's Q K^T and block j - 1's P V issued together) waits for its P V
    product: ``loop_instr`` its instructions, ``ex2`` its MUFU.EX2, ``ex2_under_pv`` those between the wait that
    leaves one product in flight (``WARPGROUP.DEPBAR.LE gsb0, 0x1``: the scores) and the one that leaves none
    (``0x0``): the exponentials that run while P V does. Item 75: ptxas puts the second wait right after the row
    max, 0 of 66 (the PTX has all 66 between the two ``wgmma.wait_group``)."""
    ex2 = sum("MUFU.EX2" in t for t in body)
    under, inside = 0, False
    for t in body:
        if "WARPGROUP.DEPBAR.LE" in t:
            inside = t.rstrip().endswith("0x1")
        elif inside and "MUFU.EX2" in t:
            under += 1
    return {"loop_instr": len(body), "ex2": ex2, "ex2_under_pv": under}


def wgmma_overlap(ptx: str) -> dict:
    """How a kernel waits for its wgmma products, from its PTX: ``wgmma_waits`` the distinct ``wgmma.wait_group``
    arguments (groups left in flight), ``wgmma_overlap_instr`` the most PTX instructions between a commit and the
    next wait (register moves and address widening, the wait's own bookkeeping, not counted; later commits before
    that wait do not restart the count: a product issued before a softmax and waited for after it). ``[0]`` and 0:
    every product is waited for as soon as it is issued, so nothing of the warpgroup's own work (the next K step's
    product, a softmax) runs under it; ``wait_group 1`` leaves one product in flight (FlashAttention-3's
    intra-warpgroup overlap, a pipelined GEMM). Triton 3.6 pipelines a wgmma only when it accumulates in float32
    (bench/NOTES.md item 56), so INT8 products always show ``[0]``."""
    waits, gaps, pending = set(), [], None
    for line in ptx.splitlines():
        t = line.strip()
        if not t or t.startswith("//") or t.endswith(":") or t in ("{", "}"):
            continue
        if t.startswith("wgmma.commit_group"):
            if pending is None:  # counted from the oldest product not yet waited for
                pending = 0
            continue
        m = re.match(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", t)
        if m:
            waits.add(int(m.group(1)))
            if pending is not None:
                gaps.append(pending)
            pending = None
        elif pending is not None and not t.startswith(("mov.", "cvt.u64")):  # the wait's register bookkeeping
            pending += 1
    return {"wgmma_waits": sorted(waits), "wgmma_overlap_instr": max(gaps, default=0)}


def _sass_counts(cubin: bytes) -> dict:
    """Counts of conversion instructions in the SASS (cuobjdump -sass), or {} when the tool is missing."""
    sass = _sass(cubin)
    if not sass:
        return {}
    return {"sass_i2f": len(re.findall(r"\bI2F\b", sass)), "sass_i2fp": len(re.findall(r"\bI2FP\b", sass)),
            "sass_f2i": len(re.findall(r"\bF2I\b", sass)),
            "sass_mufu_ex2": len(re.findall(r"MUFU\.EX2", sass)),
            "sass_hgmma_igmma": len(re.findall(r"[HIQ]GMMA", sass))}


def _summary(compiled, arch: int) -> dict:
    ptx = compiled.asm["ptx"]
    meta = compiled.metadata
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async[\w.]*", ptx)))
    return {
        "wgmma": wgmma,
        "wgmma_s8": any(".s32.s8.s8" in w for w in wgmma),
        "wgmma_e4m3": any(".e4m3.e4m3" in w for w in wgmma),
        "wgmma_16bit": any(".f32.bf16.bf16" in w or ".f32.f16.f16" in w for w in wgmma),
        "mma_sync": sorted(set(re.findall(r"mma\.sync[\w.]*", ptx)))[:3],
        "tma_loads": len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global", ptx)),
        "global_access": global_access(ptx),
        "shared_bytes": meta.shared,
        "smem_limit": SMEM_LIMIT.get(arch, 0),
        "num_warps": meta.num_warps,
        **wgmma_overlap(ptx),
        "ptxas_waits": ptxas_waits(ptx, arch) if arch == 90 else [],
        **_resource_usage(compiled.asm["cubin"]),
        **_sass_counts(compiled.asm["cubin"]),
    }


def compile_attention(cfg: AttentionConfig, arch: int = 90, head_dim: int = 128, out: str = "bf16") -> dict:
    """Compile the attention kernel of ``cfg`` for ``sm_<arch>``; summary of its PTX/SASS."""
    v = {"int8": "i8", "fp8": "fp8e4nv"}.get(cfg.pv, out)
    # 16bit: V as given, [B, H, S, D] in the model's dtype (bf16 or fp16, that of the output here)
    v_box = f"{head_dim}, {cfg.block_n}" if cfg.quantizes_v else f"1, 1, {cfg.block_n}, {head_dim}"
    sig = {
        "desc_q": f"tensordesc<i8[{cfg.block_m}, {head_dim}]>",
        "desc_k": f"tensordesc<i8[{cfg.block_n}, {head_dim}]>",
        "desc_v": f"tensordesc<{v}[{v_box}]>",
        "qs_ptr": "*fp32", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "vcs_ptr": "*i32", "out_ptr": f"*{out}",
        "qk_mult": "fp32", "S_q": "i32", "S_kv": "i32", "H": "i32", "n_blocks": "i32",
        "stride_ob": "i32", "stride_oh": "i32", "stride_os": "i32", "stride_od": "i32",
    }
    consts = {"HEAD_DIM": head_dim, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, **triton_attention.pv_options(cfg),
              "EMULATE_FP8": False, "stride_od": 1, **triton_attention.loop_options(cfg)}
    if cfg.warp_spec:  # Q's descriptors are made in the kernel (see _attention_kernel)
        sig["desc_q"] = "*i8"
    del sig["stride_od"]
    divisible = (*(("desc_q",) if cfg.warp_spec else ()), "qs_ptr", "ks_ptr", "vs_ptr", "vcs_ptr", "out_ptr",
                 "stride_ob", "stride_oh", "stride_os")
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    compiled = _compile(triton_attention._attention_kernel, sig, consts, divisible, arch, options)
    row = _summary(compiled, arch)
    # warp-specialized: the loop is the consumers' (every warpgroup but the producer's), the rows split between them
    warps = compiled.metadata.num_warps
    threads = 32 * (warps - 4 if warps > cfg.num_warps else warps)
    row.update(main_loop(_sass(compiled.asm["cubin"]), cfg.block_m * cfg.block_n, threads))
    row["setmaxnreg"] = sorted({f"{k}{n}" for k, n in re.findall(r"setmaxnreg\.(\w+)\.sync\.aligned\.u32\s+(\d+)",
                                                                 compiled.asm["ptx"])})
    return row


def compile_quant(cfg: AttentionConfig, arch: int = 90, head_dim: int = 128, dtype: str = "bf16",
                  lean: bool | None = None) -> dict:
    """Compile the quantization kernels of ``cfg``; one summary per kernel. ``lean``: the Q and K kernels' LEAN forms
    (None: as ``triton_attention.quantize`` launches them, ``LEAN_PASS``)."""
    lean = triton_attention.LEAN_PASS if lean is None else lean
    rot = {"ROT_SCALE": 1.0 / math.sqrt(head_dim) if cfg.rotate else 0.0, "DOT_FP32": False}
    strides = {f"s{t}{a}": "i32" for t in "kv" for a in "bhsd"}
    div = ("k_ptr", "v_ptr", "h_ptr", "skb", "skh", "sks", "svb", "svh", "svs")
    out = {}
    sig = {"q_ptr": f"*{dtype}", "h_ptr": f"*{dtype}", "q8_ptr": "*i8", "qs_ptr": "*fp32", "S": "i32", "H": "i32",
           "sqb": "i32", "sqh": "i32", "sqs": "i32", "sqd": "i32"}
    consts = {"D": head_dim, "ROWS": triton_attention.QUANT_ROWS, **rot, "FAST_ROUND": True, "sqd": 1, "LEAN": lean}
    del sig["sqd"]
    out["quant_q"] = _summary(_compile(triton_attention._quant_q_kernel, sig, consts,
                                       ("q_ptr", "h_ptr", "q8_ptr", "qs_ptr", "sqb", "sqh", "sqs"), arch,
                                       triton_attention.quant_q_options(lean)), arch)
    opts = {"num_warps": triton_attention.QUANT_WARPS}
    sig = {"k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "ksum_ptr": "*fp32", "vmax_ptr": "*fp32",
           "S": "i32", "H": "i32", "CHUNK": "i32", "n_chunks": "i32", **strides}
    has_v = cfg.quantizes_v  # 16bit: the pass reads no V (K's statistics and blocks only)
    consts = {"D": head_dim, "ROWS": triton_attention.STATS_ROWS, "HAS_V": has_v, "skd": 1, "svd": 1}
    del sig["skd"], sig["svd"]
    stats_div = tuple(a for a in div if a != "h_ptr")
    out["kv_stats"] = _summary(_compile(triton_attention._kv_stats_kernel, sig, consts, stats_div, arch, opts), arch)
    sig = {"ksum_ptr": "*fp32", "vmax_ptr": "*fp32", "h_ptr": f"*{dtype}", "kmean_ptr": "*fp32", "vs_ptr": "*fp32",
           "S": "i32", "n_chunks": "i32"}
    consts = {"D": head_dim, "ROT_SCALE": rot["ROT_SCALE"], "PV_INT8": cfg.pv == "int8", "HAS_V": has_v}
    out["kv_finalize"] = _summary(_compile(triton_attention._kv_finalize_kernel, sig, consts,
                                           ("ksum_ptr", "vmax_ptr", "h_ptr", "kmean_ptr", "vs_ptr"), arch, opts), arch)
    v = {"int8": "*i8", "fp8": "*fp8e4nv"}.get(cfg.pv, "*i8")  # 16bit: K's launch is given k8 there, unused
    sig = {"k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "h_ptr": f"*{dtype}", "kmean_ptr": "*fp32", "vs_ptr": "*fp32",
           "k8_ptr": "*i8", "ks_ptr": "*fp32", "vt_ptr": v, "vcs_ptr": "*i32", "S": "i32",
           "H": "i32", "n_blocks": "i32", "S_pad": "i32", **strides}
    consts = {"D": head_dim, "BLOCK_N": cfg.block_n, **rot, "PV_INT8": cfg.pv == "int8", "FAST_ROUND": True,
              "EMULATE_FP8": False, "skd": 1, "svd": 1, "LEAN": lean}
    del sig["skd"], sig["svd"]
    div = (*div, "kmean_ptr", "vs_ptr", "k8_ptr", "ks_ptr", "vt_ptr", "vcs_ptr", "S_pad")  # fresh allocations
    # PART 0: K and V in one launch; 1 and 2: split_quant_kv's two launches
    for name, part in (("quant_kv", 0), ("quant_k", 1), ("quant_v", 2)) if has_v else (("quant_k", 1),):
        opts = triton_attention.quant_kv_options(cfg.block_n, head_dim, part)
        out[name] = _summary(_compile(triton_attention._quant_kv_kernel, dict(sig), {**consts, "PART": part}, div,
                                      arch, opts), arch)
    return out


def compile_gluon_attention(cfg, arch: int = 90, head_dim: int = 128, out: str = "bf16") -> dict:
    """Compile ``kernels/gluon_attention``'s kernel for ``cfg`` (a ``GluonAttentionConfig``); its PTX/SASS summary,
    with ``wgmma_overlap``: the kernel keeps one product in flight across its softmax (bench/NOTES.md item 57)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from ..kernels import gluon_attention

    bm, bn, d = gluon_attention.BLOCK_M, cfg.block_n, head_dim
    sig = {"q_desc": int8_desc_sig(bm, d), "k_desc": int8_desc_sig(bn, d), "v_desc": int8_desc_sig(d, bn),
           "qs_ptr": "*fp32", "ks_ptr": "*fp32", "vs_ptr": "*fp32", "vcs_ptr": "*i32", "out_ptr": f"*{out}",
           "qk_mult": "fp32", "S_q": "i32", "S_kv": "i32",
           "n_blocks": "i32", "H": "i32", "stride_ob": "i32", "stride_oh": "i32", "stride_os": "i32",
           "HEAD_DIM": "constexpr", "STAGES": "constexpr", "num_warps": "constexpr"}
    consts = {"HEAD_DIM": d, "STAGES": cfg.stages, "num_warps": gluon_attention.NUM_WARPS}
    compiled = triton.compile(GluonASTSource(gluon_attention._gluon_attention_kernel, sig, consts, {}),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": gluon_attention.NUM_WARPS})
    return _summary(compiled, arch)


def _emulated_launch(launch, gcfg, arch: int, head_dim: int, dtype=None,
                     keep_cubin: bool = False) -> tuple[list[dict], str | None]:
    """The quantization pass and ``launch(qa, sm_scale, out, gcfg)`` (a Gluon attention module's ``launch``) as a
    caller runs them (host descriptors, scalars), bound by Triton's JIT on CPU tensors and compiled for ``sm_<arch>``
    instead of run (``check_ptx.emulated_gpu``): what a GPU's first call compiles. (the compile attempts, None), or
    ([], the binding or compile failure)."""
    import torch

    from .check_ptx import emulated_gpu

    q, k, v = (torch.zeros(1, 2, s, head_dim, dtype=dtype or torch.bfloat16) for s in (150, 200, 200))
    with emulated_gpu(arch, SMEM_LIMIT[arch], keep_cubin) as attempts:
        try:
            qa = triton_attention.quantize(q, k, v, gcfg.quant_config())
            launch(qa, 0.1, torch.empty_like(q), gcfg)
        except Exception as exc:  # a binding or compile failure is the result
            return [], f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return attempts, None


def check_gluon_launch(gcfg, arch: int = 90, head_dim: int = 128) -> list[str]:
    """``gluon_attention.launch`` compiled as a GPU's first call compiles it (``_emulated_launch``): its problems
    (empty: it passes)."""
    from ..kernels import gluon_attention

    attempts, error = _emulated_launch(gluon_attention.launch, gcfg, arch, head_dim)
    if error is not None:
        return [error]
    kernels = [a["kernel"] for a in attempts]
    if "_gluon_attention_kernel" not in kernels or not all(a["fits"] for a in attempts):
        return [f"launch compiled {kernels}, fits {[a['fits'] for a in attempts]}"]
    return []


def compile_gluon_ws_launch(gcfg, arch: int = 90, head_dim: int = 128, dtype=None) -> dict:
    """``gluon_attention_ws.launch`` as ``attention_8bit`` runs it, compiled as a GPU's first call compiles it
    (``_emulated_launch``): the warp-specialized kernel's compile summary (``fits``, ``shared_bytes``, ``regs``,
    ``local``, ``ptxas_waits``, ``setmaxnreg``, ``num_warps``, ``mma``) and, where cuobjdump is at hand, its first
    key loop's ``pv_wait`` (``loop_instr``, ``ex2``, ``ex2_under_pv``), or ``{"error": ...}``."""
    from ..kernels import gluon_attention_ws

    attempts, error = _emulated_launch(gluon_attention_ws.launch, gcfg, arch, head_dim, dtype, keep_cubin=True)
    if error is not None:
        return {"error": error}
    rows = [a for a in attempts if a["kernel"] == "_gluon_ws_attention_kernel"]
    if not rows:
        return {"error": "not launched"}
    loops = innermost_loops(_sass(rows[0]["cubin"]))
    return {**{k: v for k, v in rows[0].items() if k != "cubin"}, **(pv_wait(loops[0]) if loops else {})}


def problems(row: dict, pv: str, cfg: AttentionConfig | None = None) -> list[str]:
    """What is wrong with one attention kernel's summary (empty: it passes the check); ``cfg.warp_spec``: also
    that the Hopper pass split it (a producer warpgroup and two consumers: num_warps + 8, setmaxnreg)."""
    bad = []
    if not row["wgmma_s8"]:
        bad.append("Q K^T does not use wgmma s8")
    if pv == "int8" and sum(".s32.s8.s8" in w for w in row["wgmma"]) < 1:
        bad.append("P V does not use wgmma s8")
    if pv == "fp8" and not row["wgmma_e4m3"]:
        bad.append("P V does not use wgmma e4m3")
    if pv == "16bit" and not row["wgmma_16bit"]:
        bad.append("P V does not use wgmma bf16/f16")
    if row["mma_sync"]:
        bad.append(f"mma.sync present: {row['mma_sync']}")
    if row.get("ptxas_waits"):  # ptxas serialized the wgmmas (bench/NOTES.md item 59)
        bad.append(f"ptxas: {row['ptxas_waits'][0][:160]}")
    if row["local"] > 0 or row["stack"] > 0:
        bad.append(f"register spills: local {row['local']} B, stack {row['stack']} B")
    if cfg is not None and cfg.warp_spec and (row["num_warps"] != cfg.num_warps + 8 or not row["setmaxnreg"]):
        bad.append(f"warp_spec: not warp-specialized ({row['num_warps']} warps, setmaxnreg {row['setmaxnreg']})")
    if row["smem_limit"] and row["shared_bytes"] > row["smem_limit"]:
        bad.append(f"shared memory {row['shared_bytes']} B over {row['smem_limit']}")
    return bad


def quick_set() -> list[tuple[AttentionConfig, int]]:
    """The default config (16-bit P V) at both head sizes, the first int8 P V variant, the first e4m3 one, the
    first warp-specialized one and the first with P V one block late at D = 128 (the unit test's set)."""
    fp8 = next(c for c in attention_configs.VARIANTS if c.pv == "fp8")
    int8 = first_int8()
    ws = next(c for c in attention_configs.VARIANTS if c.warp_spec)
    defer = next(c for c in attention_configs.VARIANTS if c.defer_pv)
    return [(attention_configs.DEFAULT, 64), (attention_configs.DEFAULT, 128), (int8, 128), (fp8, 128), (ws, 128),
            (defer, 128)]


def first_int8() -> AttentionConfig:
    """The first int8 P V variant (the default before the 16-bit P V form, bench/NOTES.md item 68)."""
    return next(c for c in attention_configs.VARIANTS if c.pv == "int8")


def check(configs=attention_configs.VARIANTS, arch: int = 90, head_dims=(64, 128), quick: bool = False) -> list[dict]:
    """Compile every config and head size (``quick``: ``quick_set()``, and the quantization kernels of the
    default and the first int8 P V config only); each row carries its ``problems`` (empty when it passes)."""
    rows = []
    pairs = quick_set() if quick else [(c, d) for c in configs for d in head_dims]
    for cfg, d in pairs:
        r = compile_attention(cfg, arch, d)
        rows.append({"what": f"attention {cfg.name} D={d}", "config": asdict(cfg), **r,
                     "problems": problems(r, cfg.pv, cfg)})
    from ..kernels.gluon_attention import GluonAttentionConfig

    for gcfg, d in ((GluonAttentionConfig(64, 3), 128), (GluonAttentionConfig(64, 3), 64),
                    (GluonAttentionConfig(64, 4), 128)):
        r = compile_gluon_attention(gcfg, arch, d)
        bad = problems(r, "int8")
        if r["wgmma_overlap_instr"] < 100:
            bad.append(f"no product in flight across the softmax (waits {r['wgmma_waits']}, "
                       f"{r['wgmma_overlap_instr']} instructions under a product)")
        bad += check_gluon_launch(gcfg, arch, d)
        rows.append({"what": f"gluon attention 64x{gcfg.block_n} s{gcfg.stages} D={d}", "config": asdict(gcfg), **r,
                     "problems": bad})
    if quick:  # the 16-bit P V default's pass (no V) and the int8 P V form's
        configs = [attention_configs.DEFAULT, first_int8()]
    for cfg in {(c.pv, c.block_n, c.rotate): c for c in configs}.values():
        for name, r in compile_quant(cfg, arch).items():
            bad = [] if r["local"] <= 0 else [f"register spills: local {r['local']} B"]
            rows.append({"what": f"{name} {cfg.pv} block_n={cfg.block_n}", **r, "problems": bad})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (90 = sm_90)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="the default config and one fp8 variant only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("check_ptx_attention: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    rows = check(arch=args.arch, quick=args.quick)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            tc = ",".join(w.replace("wgmma.mma_async.sync.aligned.", "") for w in r["wgmma"]) or "-"
            sass = f"I2F={r.get('sass_i2f', '?')} I2FP={r.get('sass_i2fp', '?')} EX2={r.get('sass_mufu_ex2', '?')}"
            if "instr_per_score" in r:
                sass += f" loop={r['loop_instr']} instr/score={r['instr_per_score']}"
            if r["wgmma"]:
                sass += f" wgmma_wait={r['wgmma_waits']} overlap={r['wgmma_overlap_instr']}"
            if r.get("setmaxnreg"):
                sass += f" warps={r['num_warps']} setmaxnreg={','.join(r['setmaxnreg'])}"
            print(f"{r['what']:<44} {tc:<60} tma={r['tma_loads']} smem={r['shared_bytes']} regs={r['regs']} "
                  f"local={r['local']} {sass} {'OK' if not r['problems'] else '; '.join(r['problems'])}")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
