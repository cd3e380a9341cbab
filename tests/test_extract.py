import copy

import pytest
import safetensors.torch
import torch
from conftest import make_text_encoder, make_unet, randomize_lora
from diffusers import UNet2DConditionModel
from torch import nn

from lora_nb.convert import metadata_for
from lora_nb.extract import extract_lora, resize_lora
from lora_nb.formats import (
    load_lora_state_dict,
    load_lora_weights,
    lora_state_dict,
    read_lora,
    save_lora_weights,
)
from lora_nb.inject import (
    TEXT_ENCODER_ATTENTION,
    UNET_ATTENTION,
    UNET_CONV,
    UNET_FEED_FORWARD,
    find_targets,
    inject_lora,
    lora_layers,
    lora_parameters,
)

ATOL, RTOL = 1e-5, 1e-4


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return (
        model(*inputs).sample if isinstance(model, UNet2DConditionModel) else model(inputs).last_hidden_state
    )


@torch.no_grad()
def fine_tune(
    model: nn.Module, rank: int | None, seed: int = 0, targets=UNET_ATTENTION
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A copy of ``model`` with W += ΔW on each target (ΔW of exactly ``rank``; None: full), and the ΔWs."""
    g = torch.Generator().manual_seed(seed)
    tuned, deltas = copy.deepcopy(model), {}
    for name in find_targets(tuned, targets):
        w = tuned.get_submodule(name).weight  # (d_out, d_in)
        if rank is None:
            delta = 0.05 * torch.randn(w.shape, generator=g)
        else:
            delta = (
                0.1 * torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
            )
        w += delta
        deltas[name] = w - model.get_submodule(name).weight  # what the fine-tune changed, as fp32 sees it
    return tuned, deltas


def tail_ratio(delta: torch.Tensor, rank: int) -> float:
    """sqrt(Σ_{i>rank} σ_i²) / ‖ΔW‖_F: the best possible rank-``rank`` relative error (Eckart-Young)."""
    s = torch.linalg.svdvals(delta.double())
    return (s[rank:].square().sum().sqrt() / s.square().sum().sqrt()).item()


def test_an_exactly_rank_2_change_is_extracted_exactly_and_reproduces_the_tuned_model(unet_inputs):
    base = make_unet()
    tuned, deltas = fine_tune(base, rank=2)
    state, report = extract_lora(base, tuned, rank=2)
    assert report.keys() == {f"unet.{name}" for name in deltas}
    assert max(report.values()) < 1e-5
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert state[f"{q}.lora_A.weight"].shape == (2, 32)  # A: (r, d_in)
    assert state[f"{q}.lora_B.weight"].shape == (32, 2)  # B: (d_out, r)

    loaded = make_unet()  # a fresh base
    assert sorted(load_lora_state_dict(loaded, state, prefix="unet")) == sorted(deltas)
    assert {m.alpha for m in lora_layers(loaded).values()} == {2.0}  # alpha = rank: scaling 1
    expected = run(tuned, unet_inputs)
    assert not torch.allclose(run(base, unet_inputs), expected, atol=1e-3)  # the fine-tune matters
    torch.testing.assert_close(run(loaded, unet_inputs), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    ("true_rank", "rank"), [(2, 1), (None, 1), (None, 4)], ids=["rank2-at-1", "full-at-1", "full-at-4"]
)
def test_the_error_is_the_svd_tail(true_rank, rank):
    base = make_unet()
    tuned, deltas = fine_tune(base, rank=true_rank, seed=3)
    state, report = extract_lora(base, tuned, rank=rank)
    for name, delta in deltas.items():
        expected = tail_ratio(delta, rank)
        assert 0.05 < expected < 1  # a real truncation
        assert report[f"unet.{name}"] == pytest.approx(expected, rel=1e-4)
        b, a = state[f"unet.{name}.lora_B.weight"], state[f"unet.{name}.lora_A.weight"]
        # √S on both sides: the factors have the same norm.
        assert torch.linalg.matrix_norm(b) == pytest.approx(torch.linalg.matrix_norm(a).item(), rel=1e-4)


def test_unchanged_layers_are_skipped_and_text_encoders_work():
    base = make_text_encoder()
    tuned, deltas = fine_tune(base, rank=1, targets=["q_proj", "v_proj"])  # k_proj, out_proj left alone
    state, report = extract_lora(
        base, tuned, rank=2, target_modules=TEXT_ENCODER_ATTENTION, prefix="text_encoder"
    )
    assert report.keys() == {f"text_encoder.{name}" for name in deltas}
    assert len(state) == 2 * len(deltas) and all(k.startswith("text_encoder.") for k in state)
    assert max(report.values()) < 1e-5
    with pytest.raises(ValueError, match="nothing to extract"):
        extract_lora(base, copy.deepcopy(base), rank=2, target_modules=TEXT_ENCODER_ATTENTION)


def test_mismatched_models_are_named():
    base = make_unet()
    wider = UNet2DConditionModel(**{**make_unet().config, "cross_attention_dim": 48})
    with pytest.raises(ValueError, match=r"attn2\.to_k: base weight is \(32, 32\), tuned is \(32, 48\)"):
        extract_lora(base, wider, rank=2)
    deeper = UNet2DConditionModel(**{**make_unet().config, "layers_per_block": 2})
    with pytest.raises(ValueError, match=r"down_blocks\.0\.attentions\.1\..*only the tuned model"):
        extract_lora(base, deeper, rank=2)
    with_lora = copy.deepcopy(base)
    inject_lora(with_lora, UNET_ATTENTION)
    with pytest.raises(ValueError, match="tuned has LoRA layers"):
        extract_lora(base, with_lora, rank=2)


def trained(rank: int, alpha: float, mixed: bool = False, seed: int = 0):
    """A UNet and text encoder with random LoRA at rank and alpha; mixed: feed-forward at rank 2, alpha 1."""
    unet, text_encoder = make_unet(), make_text_encoder()
    inject_lora(unet, UNET_ATTENTION, rank=rank, alpha=alpha)
    if mixed:
        inject_lora(unet, UNET_FEED_FORWARD, rank=2, alpha=1)
    inject_lora(text_encoder, TEXT_ENCODER_ATTENTION, rank=rank, alpha=alpha)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(unet) + lora_parameters(text_encoder):
            p.normal_(std=0.1)
    return unet, text_encoder


def test_resizing_keeps_the_top_singular_directions(tmp_path):
    unet, text_encoder = trained(rank=8, alpha=16)
    lora = read_lora(save_lora_weights(tmp_path, unet=unet, text_encoder=text_encoder))
    tensors, metadata = lora.tensors, lora.metadata
    state, report = resize_lora(tensors, rank=4, metadata=metadata)
    assert state.keys() == tensors.keys()  # text_encoder. keys kept
    assert report.keys() == {k.removesuffix(".lora_A.weight") for k in tensors if k.endswith("A.weight")}
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        for name, layer in lora_layers(model).items():
            stem = f"{prefix}.{name}"
            a, b = state[f"{stem}.lora_A.weight"], state[f"{stem}.lora_B.weight"]
            assert a.shape == (4, layer.base.in_features) and b.shape == (layer.base.out_features, 4)
            delta = layer.delta_weight().detach()  # (alpha / r) B A, alpha = 16, r = 8
            s = torch.linalg.svdvals(delta)
            torch.testing.assert_close(torch.linalg.svdvals(b @ a)[:4], s[:4], atol=1e-6, rtol=1e-4)
            assert report[stem] == pytest.approx(tail_ratio(delta, 4), rel=1e-4)
            # The top-4 subspaces agree: projecting ΔW onto the result's row space keeps its top 4 energy.
            q, _ = torch.linalg.qr(a.T)
            assert torch.linalg.matrix_norm(delta @ q) == pytest.approx(
                s[:4].square().sum().sqrt().item(), rel=1e-4
            )

    fresh_unet, fresh_text_encoder = make_unet(), make_text_encoder()
    load_lora_state_dict(fresh_unet, state, prefix="unet")
    load_lora_state_dict(fresh_text_encoder, state, prefix="text_encoder")
    assert {(m.rank, m.alpha) for m in lora_layers(fresh_unet).values()} == {(4, 4.0)}


@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed-rank-and-alpha"])
def test_round_trip_at_full_rank_honours_alpha(tmp_path, mixed, unet_inputs, token_ids, pipeline_factory):
    """alpha = 16 at r = 8 (scaling 2; mixed: also rank 2 / alpha 1 layers): resizing to 8 changes nothing."""
    unet, text_encoder = trained(rank=8, alpha=16, mixed=mixed)
    expected = run(unet, unet_inputs), run(text_encoder, token_ids)
    lora = read_lora(save_lora_weights(tmp_path, unet=unet, text_encoder=text_encoder))
    tensors, metadata = lora.tensors, lora.metadata
    state, report = resize_lora(tensors, rank=8, metadata=metadata)
    assert max(report.values()) < 1e-5
    assert {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")} == {
        8
    }  # rank-2 layers padded

    path = tmp_path / "resized.safetensors"
    safetensors.torch.save_file(state, path)  # no metadata: alpha = rank is every loader's default
    fresh_unet, fresh_text_encoder = make_unet(), make_text_encoder()
    load_lora_weights(path, unet=fresh_unet, text_encoder=fresh_text_encoder)
    got = run(fresh_unet, unet_inputs), run(fresh_text_encoder, token_ids)
    pipe = pipeline_factory()
    pipe.load_lora_weights(path)  # and diffusers reads it the same way
    theirs = run(pipe.unet, unet_inputs), run(pipe.text_encoder, token_ids)
    for ours, diffusers_, want in zip(got, theirs, expected):
        torch.testing.assert_close(ours, want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(diffusers_, want, atol=ATOL, rtol=RTOL)

    ignored, _ = resize_lora(tensors, rank=8)  # without the metadata alpha = r: half the update
    plain = make_unet()
    load_lora_state_dict(plain, ignored, prefix="unet")
    assert not torch.allclose(run(plain, unet_inputs), expected[0], atol=1e-3)


def test_a_conv_layer_is_resized_in_its_kernel_shape(unet_inputs):
    """LoCon files (kohya's, ours) hold A: (r, d_in, kh, kw) and B: (d_out, r, 1, 1); resizing (and mix_loras
    with rank=) treats them as the matrices (r, d_in·kh·kw) and (d_out, r) and gives them their shape back."""
    unet = make_unet()
    inject_lora(unet, UNET_CONV, rank=4, alpha=8)
    randomize_lora(unet, 3)
    expected = run(unet, unet_inputs)
    state, report = resize_lora(
        lora_state_dict(unet),
        rank=4,
        metadata=metadata_for({f"unet.{name}": (4, 8.0) for name in lora_layers(unet)}),
    )
    assert max(report.values()) < 1e-5  # the same rank: nothing dropped
    conv = "unet.down_blocks.0.resnets.0.conv1"
    assert state[f"{conv}.lora_A.weight"].shape == lora_layers(unet)[conv[5:]].lora_A.weight.shape
    assert state[f"{conv}.lora_B.weight"].shape[2:] == (1, 1)
    fresh = make_unet()
    load_lora_state_dict(fresh, state, prefix="unet")
    torch.testing.assert_close(run(fresh, unet_inputs), expected, atol=ATOL, rtol=RTOL)

    smaller, report = resize_lora(state, rank=2)
    assert smaller[f"{conv}.lora_A.weight"].shape[0] == 2 and max(report.values()) > 0


def test_resize_names_bad_keys():
    with pytest.raises(ValueError, match="unet.x.lora.down.weight: not a LoRA factor"):
        resize_lora({"unet.x.lora.down.weight": torch.zeros(2, 3)}, 1)
    with pytest.raises(ValueError, match="unet.x.lora_A.weight: no lora_B for unet.x"):
        resize_lora({"unet.x.lora_A.weight": torch.zeros(2, 3)}, 1)
