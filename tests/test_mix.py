import re

import pytest
import safetensors.torch
import torch
from conftest import make_text_encoder, make_unet
from test_convert import as_kohya
from test_formats import outputs, randomize_lora, run_unet

from lora_nb.convert import delta_weights, metadata_for
from lora_nb.formats import (
    LoraAdapter,
    load_lora_weights,
    read_lora,
    save_lora_weights,
)
from lora_nb.inject import (
    TEXT_ENCODER_ATTENTION,
    UNET_ATTENTION,
    UNET_FEED_FORWARD,
    inject_lora,
    lora_layers,
    remove_lora,
)
from lora_nb.mix import mix_loras

# The references add ΔW to the weights; the mix runs B (A x) beside them: the same sums, rounded differently.
ATOL, RTOL = 1e-5, 1e-4
W1, W2 = 0.7, -0.4
UNET_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_FF = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"


@pytest.fixture
def adapters(tmp_path):
    """Two adapter files of different ranks, alphas, layers and layouts: lora_nb's, and a kohya one."""
    unet1, text_encoder1 = make_unet(), make_text_encoder()
    inject_lora(unet1, UNET_ATTENTION, rank=4, alpha=8)
    inject_lora(text_encoder1, TEXT_ENCODER_ATTENTION, rank=4, alpha=4)
    randomize_lora(unet1, 1)
    randomize_lora(text_encoder1, 2)
    unet2 = make_unet()
    inject_lora(unet2, UNET_ATTENTION, rank=2, alpha=1)
    inject_lora(unet2, UNET_FEED_FORWARD, rank=3, alpha=6)  # layers only the second adapter has
    randomize_lora(unet2, 3)
    first = save_lora_weights(tmp_path / "first", unet=unet1, text_encoder=text_encoder1)
    second = tmp_path / "second.safetensors"
    safetensors.torch.save_file(as_kohya(unet2), second)
    return (unet1, text_encoder1, unet2), (first, second)


@torch.no_grad()
def with_deltas(model, *weighted):
    """``model`` with W += sum w ΔW for (w, adapted model) pairs: the mix, computed on the weights."""
    for weight, adapted in weighted:
        for name, layer in lora_layers(adapted).items():
            model.get_submodule(name).weight += weight * layer.delta_weight()
    return model


def make_and_load(lora: LoraAdapter):
    unet, text_encoder = make_unet(), make_text_encoder()
    has_text = any(k.startswith("text_encoder.") for k in lora.tensors)
    load_lora_weights(lora, unet=unet, text_encoder=text_encoder if has_text else None)
    return unet, text_encoder


def test_the_mix_adds_the_weighted_updates_exactly(adapters, unet_inputs, token_ids):
    (unet1, text_encoder1, unet2), files = adapters
    unet, text_encoder = make_and_load(mix_loras(files, [W1, W2]))
    layers = {n: (m.rank, m.alpha) for n, m in lora_layers(unet).items()}
    assert layers[UNET_Q] == (6, 6)  # in both: ranks 4 + 2 stacked, scaling 1
    assert layers[UNET_FF] == (3, 6)  # only in the second: its own rank and alpha
    expected_unet = with_deltas(make_unet(), (W1, unet1), (W2, unet2))
    expected_text = with_deltas(make_text_encoder(), (W1, text_encoder1))
    got = outputs(unet, text_encoder, unet_inputs, token_ids)
    expected = outputs(expected_unet, expected_text, unet_inputs, token_ids)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=ATOL, rtol=RTOL)


def test_weights_one_and_zero_give_back_the_first_adapter_bit_for_bit(adapters):
    _, files = adapters
    mix = mix_loras(files, [1.0, 0.0])
    first = read_lora(files[0])
    assert mix.tensors.keys() == first.tensors.keys()
    assert all(torch.equal(mix.tensors[k], v) for k, v in first.tensors.items())
    assert mix.metadata == first.metadata


def test_run_time_mixing_reloads_with_new_weights(adapters, unet_inputs):
    (unet1, _, unet2), files = adapters
    unet = make_unet()
    for weights in ([1.0, 1.0], [0.25, 2.0]):
        remove_lora(unet)
        load_lora_weights(mix_loras(files, weights), unet=unet)
        expected = with_deltas(make_unet(), (weights[0], unet1), (weights[1], unet2))
        torch.testing.assert_close(
            run_unet(unet, unet_inputs), run_unet(expected, unet_inputs), atol=ATOL, rtol=RTOL
        )


def test_diffusers_loads_the_saved_mix_and_agrees(
    adapters, tmp_path, pipeline_factory, unet_inputs, token_ids
):
    _, files = adapters
    mix = mix_loras(files, [W1, W2])
    save_lora_weights(tmp_path / "mix", adapter=mix)
    assert read_lora(tmp_path / "mix").metadata["unet.rank_pattern"]  # ranks 6 and 3: a pattern is needed
    ours = outputs(*make_and_load(mix), unet_inputs, token_ids)
    pipe = pipeline_factory()
    pipe.load_lora_weights(tmp_path / "mix")
    for theirs, mine in zip(outputs(pipe.unet, pipe.text_encoder, unet_inputs, token_ids), ours):
        torch.testing.assert_close(theirs, mine, atol=ATOL, rtol=RTOL)


def test_a_mix_compressed_to_its_largest_rank_is_still_exact(adapters, unet_inputs):
    (unet1, _, unet2), files = adapters
    mix = mix_loras(files, [W1, W2], rank=6)
    assert {tensor.shape[0] for key, tensor in mix.tensors.items() if key.endswith("lora_A.weight")} == {6}
    assert mix.metadata["unet.r"] == mix.metadata["unet.lora_alpha"] == 6
    unet, _ = make_and_load(mix)
    expected = with_deltas(make_unet(), (W1, unet1), (W2, unet2))
    torch.testing.assert_close(
        run_unet(unet, unet_inputs), run_unet(expected, unet_inputs), atol=ATOL, rtol=RTOL
    )


def test_mixing_refuses_mismatched_inputs(adapters):
    _, files = adapters
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        mix_loras(files, [1.0])
    with pytest.raises(ValueError, match="every weight is 0"):
        mix_loras(files, [0, 0])
    # to_q for a model whose to_q reads 64 features, not 32
    other = LoraAdapter(
        {
            f"unet.{UNET_Q}.lora_A.weight": torch.zeros(2, 64),
            f"unet.{UNET_Q}.lora_B.weight": torch.zeros(32, 2),
        },
        {},
    )
    with pytest.raises(
        ValueError,
        match=re.escape(f"{UNET_Q}: the adapters disagree on its (d_in, d_out): [(32, 32), (64, 32)]"),
    ):
        mix_loras([files[0], other], [1.0, 1.0])


def test_delta_weights_are_what_the_layers_add_and_the_mix_sums_them(adapters):
    (unet1, _, _), files = adapters
    first, second = (read_lora(f) for f in files)
    deltas1 = delta_weights(first.tensors, first.metadata)
    for name, layer in lora_layers(unet1).items():  # the layer's own (alpha / r) B A, alpha 8 at rank 4
        torch.testing.assert_close(deltas1[f"unet.{name}"], layer.delta_weight())
    deltas2 = delta_weights(second.tensors, second.metadata)
    mixed = mix_loras(files, [W1, W2])
    for stem, delta in delta_weights(mixed.tensors, mixed.metadata).items():
        expected = W1 * deltas1.get(stem, 0) + W2 * deltas2.get(stem, 0)
        torch.testing.assert_close(delta, expected, atol=ATOL, rtol=RTOL)
    assert set(delta_weights(mixed.tensors, mixed.metadata)) == set(deltas1) | set(deltas2)


def test_delta_weights_of_a_conv_layer_have_the_kernel_shape():
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1))
    inject_lora(model, ["0"], rank=2, alpha=4)
    layer = lora_layers(model)["0"]
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    tensors = {"unet.0.lora_A.weight": layer.lora_A.weight, "unet.0.lora_B.weight": layer.lora_B.weight}
    metadata = metadata_for({"unet.0": (2, 4.0)})
    delta = delta_weights(tensors, metadata)["unet.0"]
    assert delta.shape == (5, 3, 3, 3)
    torch.testing.assert_close(delta, layer.delta_weight())
