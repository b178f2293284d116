"""Which Gluon loop shapes keep an INT8 wgmma in flight through ptxas (bench/NOTES.md item 59).

Triton runs ptxas without showing its notes; C7514 means ptxas serialized every wgmma of the kernel. This
compiles small Gluon kernels for sm_90, each a loop over key blocks as 8-bit attention runs it (Q K^T into
``s``, elementwise work standing in for the softmax, P V), and prints the ``wgmma.wait_group`` arguments and
ptxas's notes (``check_ptx.ptxas_waits``)::

    python -m int8_w8a8.bench.probe_wgmma_pipeline            # no GPU: offline compiles

Forms (``FORMS``): ``s-in-flight``: the next Q K^T in flight across the work on the previous scores, both
products waited in the iteration; ``pv-in-flight``: also the P V product left in flight across the loop's back
edge, finished after the next iteration's Q K^T is issued (FlashAttention-3's intra-warpgroup order, as
``kernels/gluon_attention.py`` runs it). With Triton 3.6.0 the first compiles clean and the second gets C7514.
"""

from __future__ import annotations

import argparse
import json

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

from .check_ptx import int8_desc_sig, ptxas_waits
from .check_ptx_attention import wgmma_overlap

FORMS = {"s-in-flight": 1, "pv-in-flight": 2}
BM: gl.constexpr = gl.constexpr(64)  # query rows (one warpgroup)
BN: gl.constexpr = gl.constexpr(64)  # keys per block
D: gl.constexpr = gl.constexpr(128)  # head size


@gluon.jit
def _probe_kernel(q_desc, k_desc, v_desc, out_ptr, n, FORM: gl.constexpr, num_warps: gl.constexpr):
    """[64, 128] int8 Q against ``n`` blocks of 64 keys (the shared-memory tiles are left unloaded: only the
    instruction stream matters here); writes the [64, 128] sum as bf16."""
    s_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, 64, 32])
    o_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, 128, 32])
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_mma, k_width=4)
    q_s = gl.allocate_shared_memory(gl.int8, [BM, D], q_desc.layout)
    k_s = gl.allocate_shared_memory(gl.int8, [2, BN, D], k_desc.layout)
    v_s = gl.allocate_shared_memory(gl.int8, [2, D, BN], v_desc.layout)
    acc = gl.zeros((BM, D), gl.float32, layout=o_mma)
    s = warpgroup_mma(q_s, k_s.index(0).permute((1, 0)), gl.zeros((BM, BN), gl.int32, layout=s_mma), use_acc=False,
                      is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    if FORM == 1:
        for j in range(n):
            s_next = warpgroup_mma(q_s, k_s.index(j % 2).permute((1, 0)), gl.zeros((BM, BN), gl.int32, layout=s_mma),
                                   use_acc=False, is_async=True)
            p = (s.to(gl.float32) * 0.5).to(gl.int8)  # under s_next
            pv = warpgroup_mma(gl.convert_layout(p, p_op), v_s.index(j % 2).permute((1, 0)),
                               gl.zeros((BM, D), gl.int32, layout=o_mma), use_acc=False, is_async=True)
            pv, s = warpgroup_mma_wait(num_outstanding=0, deps=(pv, s_next))
            acc = acc + pv.to(gl.float32)
    else:
        p = (s.to(gl.float32) * 0.5).to(gl.int8)
        s_next = warpgroup_mma(q_s, k_s.index(1).permute((1, 0)), gl.zeros((BM, BN), gl.int32, layout=s_mma),
                               use_acc=False, is_async=True)
        pv = warpgroup_mma(gl.convert_layout(p, p_op), v_s.index(0).permute((1, 0)),
                           gl.zeros((BM, D), gl.int32, layout=o_mma), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
        for j in range(n):
            s_next = warpgroup_mma(q_s, k_s.index(j % 2).permute((1, 0)), gl.zeros((BM, BN), gl.int32, layout=s_mma),
                                   use_acc=False, is_async=True)
            p = (s.to(gl.float32) * 0.5).to(gl.int8)  # under s_next and the previous block's P V
            pv = warpgroup_mma_wait(num_outstanding=1, deps=(pv,))
            acc = acc + pv.to(gl.float32)
            pv = warpgroup_mma(gl.convert_layout(p, p_op), v_s.index(j % 2).permute((1, 0)),
                               gl.zeros((BM, D), gl.int32, layout=o_mma), use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))  # P V stays in flight over the back edge
        pv = warpgroup_mma_wait(num_outstanding=0, deps=(pv,))
        acc = acc + pv.to(gl.float32)
    store: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    o = gl.convert_layout(acc.to(gl.bfloat16), store)
    r = gl.arange(0, BM, layout=gl.SliceLayout(1, store))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, store))
    gl.store(out_ptr + r[:, None] * D + d[None, :], o)


def probe(form: str, arch: int = 90) -> dict:
    """Compile one form for ``sm_<arch>``: its ``wait_group`` arguments and ptxas's wgmma notes."""
    bm, bn, d = BM.value, BN.value, D.value
    sig = {"q_desc": int8_desc_sig(bm, d), "k_desc": int8_desc_sig(bn, d), "v_desc": int8_desc_sig(d, bn),
           "out_ptr": "*bf16", "n": "i32",
           "FORM": "constexpr", "num_warps": "constexpr"}
    compiled = triton.compile(GluonASTSource(_probe_kernel, sig, {"FORM": FORMS[form], "num_warps": 4}, {}),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    ptx = compiled.asm["ptx"]
    return {"form": form, "wait_group": wgmma_overlap(ptx)["wgmma_waits"], "ptxas_waits": ptxas_waits(ptx, arch)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = [probe(form) for form in FORMS]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['form']:<14} wait_group {r['wait_group']}  ptxas: {r['ptxas_waits'] or 'no note'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
