import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from lora_nb.layers import LoRALinear


def make_linear(d_in: int = 16, d_out: int = 24, dtype: torch.dtype = torch.float32) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(d_in, d_out).to(dtype)


def trained(layer: LoRALinear) -> LoRALinear:
    """Give B non-zero values, as training would."""
    torch.manual_seed(1)
    nn.init.normal_(layer.lora_B.weight, std=0.5)
    return layer


def test_fresh_layer_is_exactly_the_base():
    base = make_linear()
    layer = LoRALinear(base, rank=4)
    x = torch.randn(3, 16)
    assert layer.lora_A.weight.abs().sum() > 0  # A is random, B is zero
    assert torch.equal(layer.lora_B.weight, torch.zeros(24, 4))
    assert torch.equal(layer(x), base(x))
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad


def test_forward_is_base_plus_scaled_low_rank_update():
    layer = trained(LoRALinear(make_linear(), rank=4, alpha=8))
    layer.scale = 0.5
    x = torch.randn(3, 16)
    A, B = layer.lora_A.weight, layer.lora_B.weight  # A: (4, 16), B: (24, 4)
    expected = layer.base(x) + 0.5 * (8 / 4) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 0.5 * 2 * B @ A)
    assert layer.delta_weight().shape == (24, 16)
    assert torch.linalg.matrix_rank(layer.delta_weight()) == 4


def test_scale_zero_gives_exactly_the_base_output():
    layer = trained(LoRALinear(make_linear(), rank=4))
    x = torch.randn(3, 16)
    assert not torch.equal(layer(x), layer.base(x))
    layer.scale = 0.0
    assert torch.equal(layer(x), layer.base(x))
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("nan"))  # a diverged adapter: off means off, the branch is skipped
    assert torch.equal(layer(x), layer.base(x))


def test_dropout_acts_on_the_lora_branch_only():
    layer = trained(LoRALinear(make_linear(), rank=4, dropout=1.0)).train()
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), layer.base(x))  # every LoRA input dropped, base untouched
    assert not torch.equal(layer.eval()(x), layer.base(x))  # no dropout at eval


def test_merged_forward_equals_unmerged_and_unmerge_restores_exactly():
    layer = trained(LoRALinear(make_linear(), rank=4, alpha=8))
    original = layer.base.weight.detach().clone()
    x = torch.randn(3, 16)
    y = layer(x)
    layer.merge()
    assert layer.merged
    assert not torch.equal(layer.base.weight, original)
    # fp32: the update is added once (in the weight, not again in forward); only rounding differs
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base.weight, original)
    assert torch.equal(layer(x), y)


def test_unmerge_is_bit_exact_in_fp16_where_subtracting_is_not():
    layer = trained(LoRALinear(make_linear(64, 64, torch.float16), rank=4, alpha=8))
    original = layer.base.weight.detach().clone()
    delta = layer.delta_weight().half()
    assert not torch.equal(original + delta - delta, original)  # why merge() keeps a copy
    layer.merge()
    layer.unmerge()
    assert torch.equal(layer.base.weight, original)


def test_merge_twice_or_unmerge_unmerged_raises():
    layer = LoRALinear(make_linear(), rank=2)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_lora_factors_stay_fp32_under_a_half_precision_base():
    layer = trained(LoRALinear(make_linear(dtype=torch.bfloat16), rank=4))
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == layer.lora_B.weight.grad.dtype == torch.float32


@pytest.mark.parametrize(("init", "peft_init"), [("kaiming", True), ("gaussian", "gaussian")])
def test_init_and_forward_match_peft(init, peft_init):
    """Same seed, same A as peft's LoRA Linear; same A, B and alpha != rank, same output."""
    ours = LoRALinear(make_linear(), rank=4, alpha=8, init=init)  # make_linear seeds the generator
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], init_lora_weights=peft_init)
    peft_model = inject_adapter_in_model(config, nn.ModuleDict({"proj": make_linear()}))
    theirs = peft_model["proj"]
    assert torch.equal(ours.lora_A.weight, theirs.lora_A["default"].weight)
    assert torch.equal(ours.lora_B.weight, theirs.lora_B["default"].weight)

    trained(ours)
    with torch.no_grad():
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(5, 16)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(make_linear(), rank=0)
    with pytest.raises(ValueError, match="init"):
        LoRALinear(make_linear(), rank=2, init="pissa")
