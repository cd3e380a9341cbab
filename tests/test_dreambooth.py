"""DreamBooth-LoRA, text-encoder LoRA and pivotal tuning: short CPU runs whose outputs load in diffusers."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from lora_nb import load_lora_pipeline
from lora_nb.course.tiny import TINY_SD_PATH
from lora_nb.data import DataError
from lora_nb.dreambooth import DreamBoothConfig, DreamBoothPairs, dreambooth
from lora_nb.formats import read_lora
from lora_nb.textual_inversion import EMBEDDING_NAME

SUBJECT = TINY_SD_PATH.parent / "subject"


def config(tmp_path, **overrides) -> DreamBoothConfig:
    settings = {
        "pretrained_model_name_or_path": str(TINY_SD_PATH),
        "instance_data_dir": str(SUBJECT),
        "instance_prompt": "a photo of sks star",
        "center_crop": True,
        "train_batch_size": 2,
        "max_train_steps": 3,
        "learning_rate": 1e-3,
        "seed": 0,
        "output_dir": str(tmp_path / "out"),
        "show_progress": False,
        "checkpointing_steps": 0,
    }
    settings.update(overrides)
    return DreamBoothConfig(**settings)


def draw(pipe, prompt):
    return pipe(
        prompt, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images


def diffusers_pipeline(folder, with_embedding=False):
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD_PATH)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    if with_embedding:
        pipe.load_textual_inversion(folder, weight_name=EMBEDDING_NAME)
    pipe.load_lora_weights(folder)
    return pipe


def test_prior_preservation_pairs_instance_and_class_examples(tmp_path):
    class_dir = tmp_path / "class"
    result = dreambooth(
        config(
            tmp_path,
            with_prior_preservation=True,
            class_prompt="a photo of a star",
            class_data_dir=str(class_dir),
            num_class_images=4,
            prior_loss_weight=0.5,
        )
    )
    assert sorted(p.name for p in class_dir.iterdir()) == [f"class-{i:05d}.png" for i in range(4)]
    assert result.global_step == 3 and (result.output_dir / "pytorch_lora_weights.safetensors").is_file()
    stamp = {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()}
    dreambooth(
        config(
            tmp_path / "again",
            with_prior_preservation=True,
            class_prompt="a photo of a star",
            class_data_dir=str(class_dir),
            num_class_images=4,
        )
    )
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()} == stamp  # cached, not drawn again


def test_pairs_weigh_class_examples_by_the_prior_loss_weight():
    from lora_nb.data import CaptionedImages, ImageTransform, collate

    transform = ImageTransform(32)
    images = [torch.zeros(1)] * 3
    instance = CaptionedImages(images, ["a sks star"] * 3, transform, seed=0)
    prior = CaptionedImages(images * 2, ["a star"] * 6, transform, seed=1, weight=0.25)
    pairs = DreamBoothPairs(instance, prior)
    assert len(pairs) == 6
    instance.text_embeddings = prior.text_embeddings = torch.zeros(6, 2)  # as if cached; no images needed
    instance.latents = prior.latents = [(torch.zeros(1, 1), torch.zeros(1, 1))] * 6
    batch = collate([pairs[0], pairs[4]])
    assert batch["items"] == 2 and batch["weight"].tolist() == [1.0, 0.25, 1.0, 0.25]


def test_text_encoder_lora_is_saved_and_loads_in_diffusers(tmp_path):
    result = dreambooth(config(tmp_path, train_text_encoder=True, max_train_steps=2))
    tensors = read_lora(result.lora_path).tensors
    assert any(k.startswith("text_encoder.") and "q_proj.lora_A" in k for k in tensors)
    ours = load_lora_pipeline(result.output_dir)
    assert (
        np.abs(
            draw(ours, "a photo of sks star")
            - draw(diffusers_pipeline(result.output_dir), "a photo of sks star")
        ).max()
        < 1e-5
    )


def test_pivotal_tuning_saves_a_word_and_a_lora_that_load_together(tmp_path):
    result = dreambooth(
        config(
            tmp_path,
            instance_prompt="a photo of <sks> star",
            placeholder_token="<sks>",
            initializer_token="star",
            pivotal=True,
            ti_steps=3,
        )
    )
    folder = result.output_dir
    assert (folder / EMBEDDING_NAME).is_file() and (folder / "textual_inversion" / EMBEDDING_NAME).is_file()
    ours = load_lora_pipeline(folder)
    assert ours.lora.token == "<sks>"
    prompt = "a photo of <sks> star"
    assert (
        np.abs(draw(ours, prompt) - draw(diffusers_pipeline(folder, with_embedding=True), prompt)).max()
        < 1e-5
    )
    ours.lora.remove()
    assert "<sks>" not in ours.tokenizer.get_vocab()


def test_the_learned_word_moved_and_nothing_else(tmp_path):
    from lora_nb.course.tiny import load_tiny_pipeline
    from lora_nb.textual_inversion import read_learned_embedding

    result = dreambooth(
        config(
            tmp_path,
            instance_prompt="a photo of <sks> star",
            placeholder_token="<sks>",
            initializer_token="star",
            pivotal=True,
            ti_steps=3,
            max_train_steps=1,
        )
    )
    token, vector = read_learned_embedding(result.output_dir / "textual_inversion")
    base = load_tiny_pipeline()
    star = base.text_encoder.get_input_embeddings().weight[base.tokenizer.convert_tokens_to_ids("star</w>")]
    assert token == "<sks>" and not torch.allclose(vector, star)  # it learned, starting from "star"


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (
            {
                "instance_prompt": "a photo of a star",
                "placeholder_token": "<sks>",
                "initializer_token": "star",
                "pivotal": True,
            },
            ValueError,
            "does not contain the placeholder token '<sks>'",
        ),
        (
            {
                "instance_prompt": "a photo of star",
                "placeholder_token": "star",
                "initializer_token": "shape",
                "pivotal": True,
            },
            ValueError,
            "'star' already exists in the tokenizer's vocabulary",
        ),
        ({"with_prior_preservation": True}, ValueError, "needs --class_data_dir and --class_prompt"),
    ],
)
def test_bad_settings_fail_before_anything_is_written(tmp_path, overrides, error, message):
    cfg = config(tmp_path, class_data_dir=None, **overrides)
    with pytest.raises(error, match=message):
        dreambooth(cfg)
    assert not Path(cfg.output_dir).exists()


def test_empty_or_unreadable_instance_folders_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="instance folder .*empty holds no images"):
        dreambooth(config(tmp_path, instance_data_dir=str(empty)))
    (empty / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="unreadable instance image .*broken.png"):
        dreambooth(config(tmp_path, instance_data_dir=str(empty)))
    assert not (tmp_path / "out").exists()
