"""The Gluon 8-bit attention for Hopper (kernels/gluon_attention.py), opt-in until measured (bench/NOTES.md item 57).

Without a GPU: its config rules (the offline sm_90 compile, a product in flight across the softmax, is checked by
``test_attention.test_hopper_ptx_attention_uses_wgmma_for_both_products``). On an SM 9.x GPU: bit for bit the
Triton kernel's output on the same quantized inputs (the same numbers, another schedule), within issue 14's
accuracy bound against float64 attention, at S not a multiple of the key block, S_q != S_kv, one and two key
blocks, B and H > 1, D = 64 and 128, keys with a shared offset and outlier channels; NaN in a row of Q poisons
only that row; its input rules.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from int8_w8a8.kernels.gluon_attention import GluonAttentionConfig

from .conftest import HAS_CUDA, offline_python, rel_err
from .test_attention import BOUND, make, ref64

HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.unit
def test_ptxas_serializes_a_product_left_in_flight_across_the_loop():
    """Offline sm_90 compiles of bench/probe_wgmma_pipeline.py's two loop forms (bench/NOTES.md item 59): the next
    Q K^T in flight across the work on the previous scores passes ptxas as is; a P V product left in flight across
    the back edge (this kernel's FA3 order) makes ptxas serialize every wgmma (note C7514). When a Triton or ptxas
    update flips the second, the Gluon kernel's schedule is worth measuring again."""
    code = "from int8_w8a8.bench import probe_wgmma_pipeline as p; import sys; sys.exit(p.main(['--json']))"
    out = offline_python(code)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["form"]: r for r in json.loads(out.stdout)}
    assert rows["s-in-flight"]["ptxas_waits"] == [], rows
    assert 1 in rows["pv-in-flight"]["wait_group"], rows
    assert any("C7514" in w for w in rows["pv-in-flight"]["ptxas_waits"]), rows


@pytest.mark.unit
@pytest.mark.parametrize("kwargs", [{"block_n": 32}, {"block_n": 128}, {"stages": 2}])
def test_config_rules(kwargs):
    with pytest.raises(ValueError, match="GluonAttentionConfig"):
        GluonAttentionConfig(**kwargs)


@pytest.mark.unit
def test_refuses_inputs_off_hopper():
    """On the CPU (or any GPU but SM 9.x) a direct call raises ValueError instead of compiling for the wrong
    target."""
    from int8_w8a8.kernels import gluon_attention
    from int8_w8a8.kernels.reference_attention import QuantizedQKV

    t = torch.zeros(64, 64, dtype=torch.int8)
    qa = QuantizedQKV(t, torch.ones(64), t, torch.ones(1, 1), t, torch.ones(1, 64),
                      torch.zeros(1, 1, 64, dtype=torch.int32), (1, 1, 64, 64, 64), 64, "int8")
    with pytest.raises(ValueError, match="Hopper"):
        gluon_attention.attention_quantized(qa, 0.1, torch.empty(1, 1, 64, 64))


@pytest.mark.unit
def test_quantization_config_matches_the_kernel():
    cfg = GluonAttentionConfig(64, 4).quant_config()
    assert (cfg.block_m, cfg.block_n, cfg.pv, cfg.num_stages) == (64, 64, "int8", 4)


def _both(q, k, v, gcfg: GluonAttentionConfig, out_dtype=None):
    """(Gluon, Triton) on one quantization of q, k, v."""
    from int8_w8a8.kernels import gluon_attention, triton_attention

    sm = 1.0 / math.sqrt(q.shape[-1])
    qa = triton_attention.quantize(q, k, v, gcfg.quant_config())
    outs = [torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device) for _ in range(2)]
    gluon_attention.attention_quantized(qa, sm, outs[0], gcfg)
    triton_attention.attention_quantized(qa, sm, outs[1], gcfg.quant_config())
    return outs


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Gluon attention is written for SM 9.x (Hopper)")
@pytest.mark.parametrize("b,h,s_q,s_kv", [(2, 3, 100, 300), (1, 2, 64, 64), (1, 2, 130, 65), (1, 4, 1000, 1500)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("gcfg", [GluonAttentionConfig(64, 3), GluonAttentionConfig(64, 4)], ids=["64s3", "64s4"])
@pytest.mark.parametrize("keys", ["gauss", "offset"])
def test_matches_triton_and_float64(seed, b, h, s_q, s_kv, d, gcfg, keys):
    q, k, v = make(b, h, s_q, s_kv, d, device="cuda", keys=keys)
    g, t = _both(q, k, v, gcfg)
    assert rel_err(g.cpu(), ref64(q.cpu(), k.cpu(), v.cpu())) <= BOUND
    # the same float operations in the same order: equal bits (a failure here alone is a reduction order, not a
    # wrong schedule)
    assert torch.equal(g, t), ("accurate but not bit-identical", float((g.float() - t.float()).abs().max()))


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="the Gluon attention is written for SM 9.x (Hopper)")
def test_nan_row_float32_out_and_input_rules(seed):
    from int8_w8a8.kernels import gluon_attention, triton_attention

    q, k, v = make(1, 2, 150, 200, 128, device="cuda")
    q[0, 1, 7, 3] = float("nan")
    g, t = _both(q, k, v, GluonAttentionConfig(), out_dtype=torch.float32)
    assert g[0, 1, 7].isnan().all() and not g[0, 0].isnan().any() and not g[0, 1, :7].isnan().any()
    assert torch.equal(g.nan_to_num(7.0), t.nan_to_num(7.0))
    wide = triton_attention.quantize(q, k, v, dataclasses.replace(GluonAttentionConfig().quant_config(), block_n=128))
    with pytest.raises(ValueError, match="block_n=64"):
        gluon_attention.attention_quantized(wide, 0.1, torch.empty_like(q), GluonAttentionConfig())
    qa = triton_attention.quantize(q, k, v, GluonAttentionConfig().quant_config())
    out = torch.empty(1, 2, 128, 150, device="cuda", dtype=q.dtype).transpose(2, 3)
    with pytest.raises(ValueError, match="unit stride"):
        gluon_attention.attention_quantized(qa, 0.1, out, GluonAttentionConfig())
