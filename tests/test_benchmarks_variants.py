"""benchmarks/variants.py: the layers it times compute the same thing, and its small helpers."""

import pytest
import torch
from torch import nn

from benchmarks.common import Settings, Stat, geomean, geomean_target, time_interleaved
from benchmarks.variants import TOLERANCE, assert_same, make_pair

BASES = {
    "linear LoRA": (lambda: nn.Linear(16, 16), (2, 5, 16), False),
    "linear DoRA": (lambda: nn.Linear(16, 16), (2, 5, 16), True),
    "conv 3x3 LoRA": (lambda: nn.Conv2d(8, 8, 3, padding=1), (2, 8, 6, 6), False),
    "conv 1x1 LoRA": (lambda: nn.Conv2d(8, 8, 1), (2, 8, 6, 6), False),
}


@pytest.mark.parametrize("name", list(BASES))
def test_ours_and_peft_compute_the_same(name):
    make_base, shape, use_dora = BASES[name]
    torch.manual_seed(0)
    ours, theirs = make_pair(make_base(), use_dora=use_dora)
    x = torch.randn(shape)
    with torch.no_grad():
        assert (ours(x) - ours.base(x)).abs().max() > 100 * TOLERANCE  # the adapter does something
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=TOLERANCE)
    assert_same(ours, theirs, x, name)
    # and train the same: the same trainable tensors, with the same gradients
    grad = torch.randn(shape)
    ours(x).backward(grad)
    theirs(x).backward(grad)
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    peft = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    peft = {n.removesuffix(".weight") if "magnitude" in n else n: g for n, g in peft.items()}
    assert mine.keys() == peft.keys()
    for key, g in mine.items():
        torch.testing.assert_close(g, peft[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("tensor", ["lora_B", "lora_magnitude_vector"])
def test_different_layers_are_refused(tensor):
    ours, theirs = make_pair(nn.Linear(16, 16), use_dora=True)
    with torch.no_grad():
        getattr(theirs, tensor)["default"].weight.mul_(1.5)
    with pytest.raises(AssertionError, match="differ"):
        assert_same(ours, theirs, torch.randn(2, 5, 16), "a tampered layer")


def test_geomean_target():
    assert geomean([2.0, 0.5]) == pytest.approx(1.0)
    target = geomean_target("t", [Stat([0.9, 1.1, 1.0]), Stat([0.8, 0.9, 0.85])], limit=1.0)
    assert target.value == pytest.approx((1.0 * 0.85) ** 0.5)
    assert target.passed and (target.lo, target.hi) == (0.8, 1.1)
    assert target.verdict == "PASS (limit within spread)"
    assert "0.850–1.000× over 2 shapes" in target.spread


def test_time_interleaved_warms_up_then_times_every_call_each_repeat():
    calls = {"a": 0, "b": 0}

    def counter(name):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    stats = time_interleaved({n: counter(n) for n in calls}, Settings(repeats=3, min_time=0.0))
    assert {n: len(s.samples) for n, s in stats.items()} == {"a": 3, "b": 3}
    assert calls == {"a": 1 + 3 * 3, "b": 1 + 3 * 3}  # one warm-up, then at least 3 calls a repeat
    assert all(v >= 0 for s in stats.values() for v in s.samples)
