"""The inference loader: base from the card, adapter on unmodified base weights, scale/fuse/remove."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from lora_nb import inject_lora, load_lora_pipeline, save_lora_weights
from lora_nb.course.tiny import TINY_SD_PATH
from lora_nb.inference import base_model_from_card, load_base_pipeline, sample_images

PROMPT = "a red circle"


def draw(pipe, steps=4):
    return pipe(
        PROMPT, num_inference_steps=steps, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A random (non-zero) rank-4 adapter for the tiny pipeline, with a model card naming its base."""
    from huggingface_hub import ModelCard, ModelCardData

    folder = tmp_path_factory.mktemp("adapter")
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD_PATH)
    torch.manual_seed(0)
    inject_lora(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=8)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    save_lora_weights(folder, unet=pipe.unet)
    ModelCard(f"---\n{ModelCardData(base_model=str(TINY_SD_PATH)).to_yaml()}\n---\n# test adapter\n").save(
        folder / "README.md"
    )
    return folder


@pytest.fixture(scope="module")
def base_images():
    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD_PATH)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return draw(pipe)


def test_base_model_comes_from_the_card(adapter_dir):
    assert base_model_from_card(adapter_dir / "pytorch_lora_weights.safetensors") == str(TINY_SD_PATH)
    pipe = load_lora_pipeline(adapter_dir)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.lora.base_model == str(TINY_SD_PATH)


def test_a_local_base_named_relative_to_the_adapter_is_found(tmp_path, adapter_dir):
    import os

    from huggingface_hub import ModelCard, ModelCardData

    moved = tmp_path / "elsewhere" / "adapter"
    moved.mkdir(parents=True)
    (moved / "pytorch_lora_weights.safetensors").write_bytes(
        (adapter_dir / "pytorch_lora_weights.safetensors").read_bytes()
    )
    relative = os.path.relpath(TINY_SD_PATH, moved)
    ModelCard(f"---\n{ModelCardData(base_model=relative).to_yaml()}\n---\n").save(moved / "README.md")
    assert load_lora_pipeline(moved).lora.base_model == str(TINY_SD_PATH.resolve())


def test_a_weights_file_alone_needs_base_model(tmp_path, adapter_dir):
    lone = tmp_path / "adapter.safetensors"
    lone.write_bytes((adapter_dir / "pytorch_lora_weights.safetensors").read_bytes())
    with pytest.raises(ValueError, match="no base_model for adapter .*adapter.safetensors"):
        load_lora_pipeline(lone)
    assert load_lora_pipeline(lone, base_model=str(TINY_SD_PATH)).lora.path == lone


def test_matches_diffusers_own_loader(adapter_dir):
    ours = load_lora_pipeline(adapter_dir)
    theirs = StableDiffusionPipeline.from_pretrained(TINY_SD_PATH)
    theirs.scheduler = DPMSolverMultistepScheduler.from_config(theirs.scheduler.config)
    theirs.load_lora_weights(adapter_dir)
    assert np.abs(draw(ours) - draw(theirs)).max() < 1e-5


def test_scale_fuse_unfuse_remove(adapter_dir, base_images):
    pipe = load_lora_pipeline(adapter_dir)
    weights_before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if ".base." in k}
    adapted = draw(pipe)
    assert np.abs(adapted - base_images).max() > 1e-3  # the adapter does something

    pipe.lora.set_scale(0.0)
    assert np.array_equal(draw(pipe), base_images)  # scale 0 is the base model, exactly
    pipe.lora.set_scale(1.0)

    pipe.lora.fuse()
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())  # plain layers: base-model speed
    assert np.abs(draw(pipe) - adapted).max() < 1e-4
    with pytest.raises(RuntimeError, match="unfuse"):
        pipe.lora.set_scale(0.5)
    pipe.lora.unfuse()
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())  # base weights bit-exact

    pipe.lora.remove()
    assert not any("lora" in name for name, _ in pipe.unet.named_modules())
    assert np.array_equal(draw(pipe), base_images)


def test_missing_adapter_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no LoRA weights file at .*pytorch_lora_weights.safetensors"):
        load_lora_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter not found: ./nowhere"):
        load_lora_pipeline("./nowhere")


class RecordingPipe:
    """Stands in for a pipeline: records the prompts, the generators' seeds and the settings it is called
    with."""

    def __call__(self, prompts, generator, **call):
        self.prompts, self.seeds, self.call = prompts, [g.initial_seed() for g in generator], call
        return type("Output", (), {"images": [f"image {i}" for i in range(len(prompts))]})()


def test_sample_images_seeds_image_i_with_seed_plus_i():
    pipe = RecordingPipe()
    assert sample_images(pipe, PROMPT, n=3, seed=7, guidance_scale=3.0) == ["image 0", "image 1", "image 2"]
    assert (pipe.prompts, pipe.seeds, pipe.call) == ([PROMPT] * 3, [7, 8, 9], {"guidance_scale": 3.0})
    sample_images(pipe, ["a", "b"], seed=1)
    assert (pipe.prompts, pipe.seeds) == (["a", "b"], [1, 2])
    sample_images(pipe, PROMPT)  # one image, seed 0
    assert (pipe.prompts, pipe.seeds) == ([PROMPT], [0])
    with pytest.raises(ValueError, match="n=3 with 2 prompts"):
        sample_images(pipe, ["a", "b"], n=3)


def test_sample_images_draws_the_same_image_for_the_same_seed():
    pipe = load_base_pipeline(TINY_SD_PATH)
    call = {"num_inference_steps": 2, "output_type": "np"}
    two = sample_images(pipe, PROMPT, n=2, seed=5, **call)
    assert np.array_equal(two, sample_images(pipe, PROMPT, n=2, seed=5, **call))  # reproducible
    assert np.abs(two[0] - two[1]).max() > 0.05  # seeds 5 and 6: different noise, different images
    # image 1 of the batch is seed 6's image, as if drawn alone (a batch may differ in the last bits)
    assert np.abs(two[1] - sample_images(pipe, PROMPT, seed=6, **call)[0]).max() < 1e-4
