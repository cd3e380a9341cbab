"""Attention layers of a UNet, token lookup, and cross-attention capture (the image must not change)."""

import numpy as np
import pytest
import torch
from conftest import TEXT_DIM

from lora_nb import UNET_CROSS_ATTENTION, inject_lora
from lora_nb.course.attention import (
    AttentionStore,
    attention_modules,
    attention_table,
    capture_cross_attention,
    concentration,
    cross_attention_maps,
    describe_attention,
    prompt_tokens,
    token_indices,
)
from lora_nb.course.tiny import build_tokenizer


def processors(unet):
    return {name: m.processor for name, m in attention_modules(unet).items()}


def cross_layers(unet):
    return [name for name, m in attention_modules(unet).items() if m.is_cross_attention]


# ---------------------------------------------------------------- the attention layers


def test_describe_attention_tells_self_from_cross(unet):
    rows = describe_attention(unet)
    assert {r.kind for r in rows} == {"self", "cross"}
    for r in rows:
        assert r.name.endswith("attn2" if r.kind == "cross" else "attn1")
        # keys/values read the text in cross-attention, the image itself in self-attention
        assert r.context_dim == (TEXT_DIM if r.kind == "cross" else r.query_dim)
        assert r.inner_dim % r.heads == 0


def test_describe_attention_grid_follows_the_blocks(unet):
    # sample_size 8, two levels: down_blocks.0 and up_blocks.1 at 8x8, the mid block at 4x4
    grids = {r.name.split(".attentions")[0]: r.grid for r in describe_attention(unet)}
    assert grids == {"down_blocks.0": 8, "up_blocks.1": 8, "mid_block": 4}


def test_attention_table_has_a_row_per_layer(unet):
    lines = attention_table(unet).splitlines()
    assert len(lines) == 2 + len(attention_modules(unet))  # header and rule
    assert "to_k/to_v" in lines[0] and f"{TEXT_DIM}->" in attention_table(unet)


# ---------------------------------------------------------------- tokens


def test_token_indices_one_token_per_word():
    tokenizer = build_tokenizer()  # the tiny model's: one token per known word
    prompt = "a red circle on the left"
    assert prompt_tokens(tokenizer, prompt) == [
        "<|startoftext|>",
        "a",
        "red",
        "circle",
        "on",
        "the",
        "left",
        "<|endoftext|>",
    ]
    assert token_indices(tokenizer, prompt, "circle") == [3]
    assert token_indices(tokenizer, prompt, "left") == [6]


def test_token_indices_word_split_into_pieces(tokenizer):
    # the letters tokenizer has no merges: "cab" is c, a, b</w>; the first "a" is the word "a" (a</w>)
    assert token_indices(tokenizer, "a cab", "cab") == [2, 3, 4]
    assert token_indices(tokenizer, "a cab", "a") == [1]
    with pytest.raises(ValueError, match="not in the prompt"):
        token_indices(tokenizer, "a cab", "dog")


# ---------------------------------------------------------------- the store


def test_store_grid_of_non_square_latent():
    store = AttentionStore((12, 20), (12, 20))
    assert store.grid_of(240) == (12, 20)
    assert store.grid_of(60) == (6, 10)
    assert store.grid_of(15) == (3, 5)
    assert store.grid_of(6) == (2, 3)  # 3 x 5 halved, rounded up, as the UNet's convolutions do
    with pytest.raises(ValueError, match="grid"):
        store.grid_of(7)


def test_store_resizes_and_keeps_rows_summing_to_one():
    heads, tokens = 2, 5
    store = AttentionStore((8, 8), (8, 8))
    for pixels in (64, 16):  # an 8x8 and a 4x4 layer
        probs = torch.randn(3 * heads, pixels, tokens).softmax(-1)
        store.add(probs, heads)
    maps = store.mean()
    assert maps.shape == (3, tokens, 8, 8) and store.count == 2
    torch.testing.assert_close(maps.sum(1), torch.ones(3, 8, 8))


# ---------------------------------------------------------------- capturing


def test_capture_restores_processors(unet, unet_inputs):
    before = processors(unet)
    with capture_cross_attention(unet, (8, 8)):
        during = processors(unet)
        unet(*unet_inputs)
    assert all(type(during[n]).__name__ == "CaptureProcessor" for n in cross_layers(unet))
    assert all(during[n] is before[n] for n in before if n not in cross_layers(unet))  # attn1 left alone
    assert all(processors(unet)[n] is p for n, p in before.items())


def test_capture_restores_processors_on_error(unet):
    before = processors(unet)
    with pytest.raises(RuntimeError, match="boom"), capture_cross_attention(unet, (8, 8)):
        raise RuntimeError("boom")
    assert all(processors(unet)[n] is p for n, p in before.items())


def test_capture_does_not_change_the_output(unet, unet_inputs):
    with torch.no_grad():
        expected = unet(*unet_inputs).sample
        with capture_cross_attention(unet, (8, 8)):
            watched = unet(*unet_inputs).sample
    assert torch.equal(expected, watched)


def test_captured_maps_shape_and_sum(unet, unet_inputs):
    latents, _, text = unet_inputs  # 2 images, 5 text tokens
    with torch.no_grad(), capture_cross_attention(unet, (8, 8), size=(16, 16)) as store:
        unet(*unet_inputs)
        unet(*unet_inputs)
    assert store.count == 2 * len(cross_layers(unet))  # every cross-attention layer, every call
    maps = store.mean()
    assert maps.shape == (latents.shape[0], text.shape[1], 16, 16)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 16, 16))


def test_capture_sees_through_lora(unet, unet_inputs):
    with torch.no_grad(), capture_cross_attention(unet, (8, 8)) as store:
        unet(*unet_inputs)
    inject_lora(unet, UNET_CROSS_ATTENTION, rank=2)
    for name, p in unet.named_parameters():
        if "attn2.to_k.lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a trained adapter on the keys: other maps
    with torch.no_grad(), capture_cross_attention(unet, (8, 8)) as with_lora:
        unet(*unet_inputs)
    assert not torch.allclose(store.mean(), with_lora.mean())


# ---------------------------------------------------------------- through a pipeline


def test_cross_attention_maps_keeps_the_image(pipeline_factory):
    pipe = pipeline_factory()
    pipe.set_progress_bar_config(disable=True)
    before = processors(pipe.unet)
    kwargs = {"num_inference_steps": 2, "output_type": "np"}
    result = cross_attention_maps(pipe, "a cab", generator=torch.Generator().manual_seed(0), **kwargs)
    plain = pipe("a cab", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.array_equal(result.images, plain)
    assert all(processors(pipe.unet)[n] is p for n, p in before.items())
    assert result.tokens == ["<|startoftext|>", "a", "c", "a", "b", "<|endoftext|>"]
    assert result.maps.shape == (1, pipe.tokenizer.model_max_length, 8, 8)  # one image (the CFG half)
    torch.testing.assert_close(result.maps.sum(1), torch.ones(1, 8, 8))
    torch.testing.assert_close(result.word(pipe.tokenizer, "cab"), result.maps[:, 2:5].sum(1))


def test_cross_attention_maps_keeps_the_prompt_half(pipeline_factory):
    """Under classifier-free guidance the UNet sees [empty prompt, prompt]; the maps must be the prompt's."""
    pipe = pipeline_factory()
    pipe.set_progress_bar_config(disable=True)
    result = cross_attention_maps(
        pipe, "a cab", num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0)
    )
    # The same single UNet call by hand: both halves captured.
    prompt_embeds, negative_embeds = pipe.encode_prompt("a cab", "cpu", 1, True)
    pipe.scheduler.set_timesteps(1)
    latents = pipe.prepare_latents(1, 4, 8, 8, prompt_embeds.dtype, "cpu", torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_cross_attention(pipe.unet, (8, 8)) as store:
        pipe.unet(
            torch.cat([latents] * 2), pipe.scheduler.timesteps[0], torch.cat([negative_embeds, prompt_embeds])
        )
    both = store.mean()
    torch.testing.assert_close(result.maps[0], both[1])
    assert not torch.allclose(result.maps[0], both[0])


def test_concentration_reads_where_a_map_points():
    mask = np.zeros((64, 64), dtype=bool)
    mask[16:32, 0:16] = True  # an object on the left, 1/16 of the image
    uniform = torch.ones(8, 8)
    assert concentration(uniform, mask) == pytest.approx(1.0)
    pointed = torch.zeros(8, 8)
    pointed[2:4, 0:2] = 1.0  # the same place on the 8x8 grid
    assert concentration(pointed, mask) > 8
    elsewhere = torch.zeros(8, 8)
    elsewhere[5:8, 5:8] = 1.0
    assert concentration(elsewhere, mask) < 0.2
    with pytest.raises(ValueError, match="mask is empty"):
        concentration(uniform, np.zeros((64, 64), dtype=bool))
