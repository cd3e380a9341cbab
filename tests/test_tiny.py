"""The embedded tiny Stable Diffusion: SD 1.5's classes and names, offline, small, and it draws."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from lora_nb.course.evaluate import foreground_mask
from lora_nb.course.tiny import (
    MAX_TOKENS,
    TINY_SD_PATH,
    build_tokenizer,
    learn_bpe_merges,
    load_tiny_pipeline,
)
from lora_nb.course.world import IMAGE_SIZE, vocabulary


@pytest.fixture(scope="module")
def pipe():
    return load_tiny_pipeline()


def test_tokenizer_gives_every_course_word_one_token():
    tokenizer = build_tokenizer()
    for word in vocabulary():
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, word
    assert tokenizer.model_max_length == MAX_TOKENS


def test_tokenizer_spells_unknown_words_with_characters():
    tokenizer = build_tokenizer()
    tokens = tokenizer.tokenize("a sks star zebra")
    assert tokens[0] == "a</w>" and "star</w>" in tokens
    assert "".join(tokens).replace("</w>", " ").split() == ["a", "sks", "star", "zebra"]
    assert tokenizer.unk_token_id not in tokenizer("qxj zz").input_ids[1:-1]


def test_bpe_merges_build_each_word():
    merges = learn_bpe_merges(["red", "green"])
    assert ("re", "d</w>") in merges or ("r", "ed</w>") in merges
    assert len(merges) == len("red") - 1 + len("green") - 1 - 1  # "re" shared: one merge less


def test_loads_offline_with_diffusers_itself():
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD_PATH)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 4  # 64 px images, 16x16 latents
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == IMAGE_SIZE


def test_sd15_module_names_are_kept(pipe):
    names = {n for n, _ in pipe.unet.named_modules()}
    for suffix in ("attn1.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"):
        assert any(n.endswith(suffix) for n in names), suffix
    te_names = {n for n, _ in pipe.text_encoder.named_modules()}
    assert any(n.endswith("self_attn.q_proj") for n in te_names)


def test_shipped_size_is_small():
    total = sum(f.stat().st_size for f in TINY_SD_PATH.rglob("*") if f.is_file())
    assert total < 20e6  # of the 30 MB the repository allows data/
    assert (TINY_SD_PATH / "README.md").read_text().startswith("---")


def test_draws_a_non_degenerate_image(pipe):
    image = pipe(
        "a large red circle on a white background",
        num_inference_steps=25,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    array = np.asarray(image, dtype=np.float32)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and array.std() > 10  # not a flat or blank picture
    assert 0.02 < foreground_mask(image).mean() < 0.9  # something stands out from the background


def test_a_sampled_latent_is_its_mean(pipe):
    """Fine-tuning samples the VAE's posterior; the UNet was pretrained on its means. A posterior as wide as
    the encoder alone learns (std up to 1 where the decoder ignores a latent) makes a LoRA fit noise."""
    from lora_nb.course.world import draw_creature_sample

    pixels = torch.from_numpy(
        np.stack([np.asarray(draw_creature_sample(seed).image, dtype=np.float32) for seed in range(8)])
        / 127.5
        - 1
    ).permute(0, 3, 1, 2)
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels).latent_dist
    assert posterior.std.max() < 0.01 * posterior.mean.std()
