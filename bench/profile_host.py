"""Host (CPU) cost of one int8_linear call, split into its parts, on the GPU machine.

    python -m int8_w8a8.bench.profile_host

Batch-1 layers run in tens of microseconds on the GPU, so Python and launch overhead decide
whether they beat BF16. Prints microseconds per call (median of several runs of many calls, no
synchronization inside the loop) and a cProfile of the full call.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels import _checks, dispatch, triton_gemm, triton_ops, triton_quant
from . import common


def _us_per_call(fn, calls: int = 300, runs: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_host needs a CUDA GPU", file=sys.stderr)
        return 2
    m, k, n = 1, 4096, 24576
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, s = kernels.quantize_weight(w)
    backend = dispatch.choose_backend(x.device)
    xq, xs = triton_quant.quantize_rows(x)
    xs = xs.reshape(-1)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    cfg = backend.table.pick(m, tma_ok=False)
    x3, mod = x.reshape(1, m, k), torch.zeros(1, 1, k, device="cuda", dtype=torch.bfloat16)
    parts = {
        "F.linear bf16": lambda: F.linear(x, w),
        "int8_linear (public)": lambda: kernels.int8_linear(x, q, s),
        "triton_ops.int8_linear (no checks)": lambda: triton_ops.int8_linear(
            x, q, s, None, torch.bfloat16, None, 0, backend),
        "checks only": lambda: _checks.check_linear_args(x, q, s, None, None, None, 0),
        "choose_backend": lambda: dispatch.choose_backend(x.device),
        "quantize launch": lambda: triton_quant.launch_quantize(x, xq, xs),
        "gemm launch": lambda: triton_gemm.gemm(xq, xs, q, s.reshape(-1), None, out, cfg),
        # the dispatcher's cost for a custom op (what compiled graphs call) next to the direct call
        "int8_gemm impl (direct)": lambda: kernels.api.int8_gemm_impl(xq, xs, q, s, None, torch.bfloat16, False),
        "int8_gemm op (torch.ops)": lambda: torch.ops.int8_w8a8.int8_gemm(xq, xs, q, s, None, torch.bfloat16, False,
                                                                          None, None),
        "norm_modulate_quantize impl": lambda: kernels.fused.norm_modulate_quantize_impl(x3, mod, mod, 1e-6),
        "norm_modulate_quantize op": lambda: torch.ops.int8_w8a8.norm_modulate_quantize(x3, mod, mod, 1e-6, 0),
        "3x torch.empty": lambda: (torch.empty((m, k), dtype=torch.int8, device="cuda"),
                                   torch.empty((m,), dtype=torch.float32, device="cuda"),
                                   torch.empty((m, n), dtype=torch.bfloat16, device="cuda")),
    }
    print(common.environment())
    for label, fn in parts.items():
        print(f"{label:<40} {_us_per_call(fn):8.1f} us/call")
    for label in ("int8_linear (public)", "F.linear bf16"):
        fn = parts[label]
        ms_events = common.bench_ms(fn)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms_graph = common.bench_ms(graph.replay)
        print(f"{label:<40} do_bench {ms_events * 1e3:7.1f} us   CUDA graph replay {ms_graph * 1e3:7.1f} us")
    prof = cProfile.Profile()
    fn = parts["int8_linear (public)"]
    prof.enable()
    for _ in range(500):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    sys.exit(main())
