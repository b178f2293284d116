"""The ``auto`` attention rule (``kernels.attention.auto_8bit``) is data: measured speed-up and accuracy per GPU
generation and implementation decide it, and changing the tables changes the decision.

GPU generations are simulated by patching ``torch.cuda.get_device_capability`` (as ``test_attention``'s dispatch
test does); the rules themselves run unchanged.
"""

from __future__ import annotations

import pytest
import torch

from int8_w8a8.kernels import attention as attn
from int8_w8a8.kernels.attention_configs import config_for

pytestmark = pytest.mark.unit


def decide(arch=None, gpu=None):
    if gpu is not None and arch is not None:
        gpu["arch"] = arch
    attn.reset()
    return attn.auto_8bit(torch.device("cuda", 0))


def test_cpu_keeps_comfyuis_attention():
    """On the CPU the 8-bit call runs the float32 torch twin: slower than SDPA, so auto does not pick it."""
    attn.reset()
    auto = attn.auto_8bit(torch.device("cpu"))
    assert not auto.eight_bit and "torch twin" in auto.reason and "slower than SDPA" in auto.reason


def test_hopper_today_keeps_comfyuis_attention(gpu):
    """The H200 measurements (bench/results/h200-bench-attention.txt): every Triton variant, the one the
    generation's configuration picks included, is slower than cuDNN, so auto keeps ComfyUI's attention."""
    name = config_for((9, 0)).name
    m = attn.TRITON_MEASURED[((9, 0), name)]
    assert m.speedup < 1.0
    assert all(v.speedup < 1.0 for (arch, _), v in attn.TRITON_MEASURED.items() if arch == (9, 0))
    auto = decide((9, 0), gpu)
    assert not auto.eight_bit and "not faster" in auto.reason and name in auto.reason
    assert f"{m.speedup:.2f}x SDPA" in auto.reason


def test_a_faster_measurement_turns_auto_on_and_the_accuracy_bound_off(gpu, monkeypatch):
    key = ((9, 0), config_for((9, 0)).name)
    monkeypatch.setitem(attn.TRITON_MEASURED, key, attn.Measured(1.3, 0.016))
    auto = decide((9, 0), gpu)
    assert auto.eight_bit and "1.30x SDPA" in auto.reason
    monkeypatch.setitem(attn.TRITON_MEASURED, key, attn.Measured(1.3, 0.038))  # fp8 P V's error
    auto = decide((9, 0), gpu)
    assert not auto.eight_bit and "accuracy bound" in auto.reason
    monkeypatch.delitem(attn.TRITON_MEASURED, key)
    auto = decide((9, 0), gpu)
    assert not auto.eight_bit and "unmeasured" in auto.reason


def test_gluon_counts_by_its_own_entry(gpu, monkeypatch):
    """Where the Gluon kernel runs, auto reads its entry (by its configuration's name), not the Triton kernel's."""
    monkeypatch.setattr(attn, "_gluon_error", lambda cfg: None)
    key = ((9, 0), attn.gluon_name())
    recorded = attn.TRITON_MEASURED[key]
    monkeypatch.setitem(attn.TRITON_MEASURED, key, attn.Measured(1.2, 0.012))
    auto = decide((9, 0), gpu)
    assert auto.eight_bit and attn.gluon_name() in auto.reason and "1.20x SDPA" in auto.reason
    monkeypatch.setitem(attn.TRITON_MEASURED, key, attn.Measured(0.9, 0.012))
    auto = decide((9, 0), gpu)
    assert not auto.eight_bit and "not faster" in auto.reason
    # the H200's: 0.91x at S = 4608 but 1.03x or more from 8192 keys on, so auto runs it for those calls only
    monkeypatch.setitem(attn.TRITON_MEASURED, key, recorded)
    auto = decide((9, 0), gpu)
    assert auto.eight_bit and auto.min_keys == 8192 and "0.91x SDPA" in auto.reason, auto
    assert "1.03x from 8192 keys" in auto.reason and attn.gluon_name() in auto.reason


def test_a_length_rule_needs_a_measured_gain(gpu, monkeypatch):
    """``Measured.min_keys``: auto runs 8-bit from that many keys on only where the speed-up measured there is above
    1; the key count travels with the decision (the fused blocks compare it with each call's)."""
    key = ((9, 0), config_for((9, 0)).name)
    monkeypatch.setitem(attn.TRITON_MEASURED, key, attn.Measured(0.8, 0.012, min_keys=8192, speedup_from=1.1))
    auto = decide((9, 0), gpu)
    assert auto.eight_bit and auto.min_keys == 8192 and "1.10x from 8192 keys" in auto.reason
    monkeypatch.setitem(attn.TRITON_MEASURED, key, attn.Measured(0.8, 0.012, min_keys=8192, speedup_from=0.99))
    auto = decide((9, 0), gpu)
    assert not auto.eight_bit and auto.min_keys == 0 and "not faster" in auto.reason
    monkeypatch.setitem(attn.TRITON_MEASURED, key, attn.Measured(0.8, 0.03, min_keys=8192, speedup_from=1.5))
    auto = decide((9, 0), gpu)
    assert not auto.eight_bit and "accuracy bound" in auto.reason


def test_kitchen_counts_where_measured_faster(gpu, monkeypatch):
    """Off Hopper, auto follows comfy-kitchen's measured speed-up (rule 3 of kernels.attention); where nothing
    8-bit runs (SDPA), auto keeps ComfyUI's attention."""
    auto = decide((8, 9), gpu)
    assert not auto.eight_bit and "no 8-bit attention runs here" in auto.reason
    monkeypatch.setitem(attn.KITCHEN_SPEEDUP_VS_SDPA, (8, 9), 1.3)
    auto = decide((8, 9), gpu)
    assert auto.eight_bit and "comfy-kitchen" in auto.reason
    monkeypatch.setattr(attn, "KITCHEN_REL_ERROR", 0.03)
    assert not decide((8, 9), gpu).eight_bit


def test_attention_problem_is_check_attention_args_without_raising():
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    assert attn.attention_problem(q, q, q) is None
    for args, kwargs in (((q.float(), q, q), {}), ((q[..., :32], q[..., :32], q[..., :32]), {}),
                         ((q, q, q), {"attn_mask": torch.zeros(8, 8)}), ((q, q, q), {"is_causal": True})):
        problem = attn.attention_problem(*args, **kwargs)
        with pytest.raises(ValueError) as err:
            attn.check_attention_args(*args, **kwargs)
        assert problem and str(err.value) == problem
