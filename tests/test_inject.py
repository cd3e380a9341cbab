import copy

import pytest
import torch
from conftest import randomize_lora
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from lora_nb.inject import (
    TEXT_ENCODER_ATTENTION,
    UNET_ATTENTION,
    UNET_CROSS_ATTENTION,
    UNET_FEED_FORWARD,
    count_parameters,
    find_targets,
    fuse_lora,
    inject_lora,
    lora_layers,
    lora_parameters,
    matches,
    merge_lora,
    remove_lora,
    set_lora_scale,
    unfuse_lora,
    unmerge_lora,
)
from lora_nb.layers import LoRALinear


@torch.no_grad()
def run(unet, inputs) -> torch.Tensor:
    return unet(*inputs).sample


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_fresh_adapter_leaves_the_unet_output_bit_identical(unet, unet_inputs):
    base = run(unet, unet_inputs)
    names = inject_lora(unet, UNET_ATTENTION, rank=4)
    assert len(names) == 32  # 4 projections x 2 attentions x 4 transformer blocks
    assert torch.equal(run(unet, unet_inputs), base)


def test_scale_zero_equals_the_base_after_training(unet, unet_inputs):
    base = run(unet, unet_inputs)
    inject_lora(unet, UNET_ATTENTION, rank=4, alpha=8)
    randomize_lora(unet)
    assert not torch.allclose(run(unet, unet_inputs), base, atol=1e-3)
    set_lora_scale(unet, 0.0)
    assert torch.equal(run(unet, unet_inputs), base)


def test_merge_lora_matches_unmerged_and_unmerge_restores_exactly(unet, unet_inputs):
    inject_lora(unet, UNET_ATTENTION, rank=4, alpha=8)
    randomize_lora(unet)
    before = snapshot(unet)
    y = run(unet, unet_inputs)
    merge_lora(unet)
    with pytest.raises(RuntimeError, match="merged"):
        set_lora_scale(unet, 0.5)  # would silently do nothing
    torch.testing.assert_close(run(unet, unet_inputs), y, atol=1e-5, rtol=1e-5)  # fp32 rounding only
    unmerge_lora(unet)
    assert_same_state(unet, before)
    assert torch.equal(run(unet, unet_inputs), y)


def test_fused_model_is_the_base_module_tree_and_unfuse_restores_it(unet, unet_inputs):
    inject_lora(unet, UNET_ATTENTION, rank=4)
    randomize_lora(unet)
    before = snapshot(unet)
    y = run(unet, unet_inputs)
    layers = fuse_lora(unet)
    assert not any(isinstance(m, LoRALinear) for m in unet.modules())  # no wrapper call left per layer
    torch.testing.assert_close(run(unet, unet_inputs), y, atol=1e-5, rtol=1e-5)
    unfuse_lora(unet, layers)
    assert lora_layers(unet).keys() == layers.keys()
    assert_same_state(unet, before)
    assert torch.equal(run(unet, unet_inputs), y)


def test_matching_follows_peft_rules():
    # list: equal to the name, or a suffix after a dot
    assert matches("to_q", ["to_q"])
    assert matches("mid_block.attentions.0.to_q", ["to_q"])
    assert matches("a.attn1.to_out.0", ["to_out.0"])
    assert not matches("a.attn1.xto_q", ["to_q"])
    assert not matches("a.to_q.lora_A", ["to_q"])
    assert not matches("a.to_out.0", ["to_out"])
    # str: a regex that must match the whole name
    assert matches("b.attn2.to_q", r".*attn2\.to_q")
    assert not matches("b.attn2.to_q", r"attn2\.to_q")
    assert not matches("b.attn2.to_qx", r".*attn2\.to_q")


def peft_targets(model: nn.Module, targets) -> list[str]:
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=targets), copy.deepcopy(model))
    return sorted(name for name, m in model.named_modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("targets", [UNET_ATTENTION, UNET_CROSS_ATTENTION, UNET_FEED_FORWARD])
def test_unet_targets_are_the_ones_peft_picks(unet, targets):
    expected = peft_targets(unet, targets)
    assert expected  # the comparison means something
    assert sorted(inject_lora(unet, targets)) == expected
    if targets == UNET_CROSS_ATTENTION:
        assert all(".attn2." in name for name in expected)


def test_text_encoder_targets_are_the_ones_peft_picks(text_encoder):
    expected = peft_targets(text_encoder, TEXT_ENCODER_ATTENTION)
    assert len(expected) == 8  # 4 projections x 2 layers
    assert sorted(inject_lora(text_encoder, TEXT_ENCODER_ATTENTION)) == expected


def test_an_entry_matching_nothing_is_named_and_nothing_changes(unet):
    before = snapshot(unet)
    with pytest.raises(ValueError, match=r"'to_query' matches no nn.Linear.*to_q"):
        inject_lora(unet, ["to_q", "to_query"])
    with pytest.raises(ValueError, match="to_out"):
        inject_lora(unet, ["to_out"])  # a ModuleList, not a Linear: peft would refuse it too
    with pytest.raises(ValueError, match="attn3"):
        inject_lora(unet, r".*attn3\.to_q")
    assert not lora_layers(unet)
    assert_same_state(unet, before)
    assert all(p.requires_grad for p in unet.parameters())


def test_already_wrapped_layers_are_refused(unet):
    inject_lora(unet, ["to_q"], rank=2)
    before = snapshot(unet)
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(unet, UNET_ATTENTION)
    assert_same_state(unet, before)
    assert len(lora_layers(unet)) == 8
    # other targets may be added, and the earlier LoRA stays trainable
    inject_lora(unet, ["to_k"], rank=8)
    assert {layer.rank for layer in lora_layers(unet).values()} == {2, 8}
    assert all(p.requires_grad for p in lora_parameters(unet))


def test_only_lora_factors_train_and_the_count_is_r_times_d_in_plus_d_out(unet, unet_inputs):
    total_before = sum(p.numel() for p in unet.parameters())
    names = inject_lora(unet, UNET_ATTENTION, rank=4)
    layers = lora_layers(unet)
    expected = sum(4 * (layers[n].base.in_features + layers[n].base.out_features) for n in names)
    assert count_parameters(unet) == (expected, total_before + expected)
    params = lora_parameters(unet)
    assert isinstance(params, list) and sum(p.numel() for p in params) == expected
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}

    randomize_lora(unet)
    unet(*unet_inputs).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in unet.parameters() if not p.requires_grad)


def test_remove_lora_gives_back_the_original_modules_and_weights(unet, unet_inputs):
    base = run(unet, unet_inputs)
    before = snapshot(unet)
    originals = {name: unet.get_submodule(name) for name in find_targets(unet, UNET_ATTENTION)}
    assert inject_lora(unet, UNET_ATTENTION, alpha=16) == list(originals)
    randomize_lora(unet)
    merge_lora(unet)
    assert sorted(remove_lora(unet)) == sorted(originals)
    assert all(unet.get_submodule(name) is module for name, module in originals.items())
    assert not any(isinstance(m, LoRALinear) for m in unet.modules())
    assert_same_state(unet, before)
    assert torch.equal(run(unet, unet_inputs), base)


def test_helpers_refuse_a_model_without_lora(unet):
    for helper in (merge_lora, unmerge_lora, lambda m: set_lora_scale(m, 1.0)):
        with pytest.raises(ValueError, match="no LoRA layers"):
            helper(unet)
    assert remove_lora(unet) == []
