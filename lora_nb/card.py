"""What a run shows of itself: validation images (--validation_prompt), drawn during training and at its
end, and the model card (README.md) written beside the adapter, with those images, how to load it and every
setting it was trained with."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

if TYPE_CHECKING:  # the trainer's types; train.py imports this module
    from .config import TrainConfig
    from .train import Components, TrainResult


@torch.no_grad()
def sample_validation_images(
    config: TrainConfig, components: Components, accelerator, step: int, tag: str = "validation"
) -> list:
    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=accelerator.unwrap_model(components.text_encoder),
        tokenizer=components.tokenizer,
        unet=accelerator.unwrap_model(components.unet),
        scheduler=DPMSolverMultistepScheduler.from_config(components.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(config.seed or 0)
    with accelerator.autocast():
        images = pipe(
            config.validation_prompt,
            num_images_per_prompt=config.num_validation_images,
            num_inference_steps=25,
            generator=generator,
        ).images
    folder = Path(config.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"step-{step:06d}-{i}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images(
                tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC"
            )
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {tag: [wandb.Image(im, caption=config.validation_prompt) for im in images]}, step=step
            )
    return images


def write_model_card(config: TrainConfig, result: TrainResult, sample_images: list) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    out = Path(config.output_dir)
    names = []
    for i, image in enumerate(sample_images):
        image.save(out / f"image_{i}.png")
        names.append(f"image_{i}.png")
    base_model = config.pretrained_model_name_or_path
    if Path(base_model).exists():  # a local base: named relative to the adapter, so the two can move together
        base_model = os.path.relpath(Path(base_model).resolve(), out.resolve())
    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        license="creativeml-openrail-m"
        if "stable-diffusion" in config.pretrained_model_name_or_path
        else "apache-2.0",
        tags=[
            "stable-diffusion",
            "stable-diffusion-diffusers",
            "text-to-image",
            "diffusers",
            "lora",
            "diffusers-training",
            "lora_nb",
        ],
        inference=True,
    )
    settings = {
        k: v
        for k, v in asdict(config).items()
        if k not in ("hub_token", "show_progress") and v not in (None, False)
    }
    images = "\n".join(f"![{config.validation_prompt}](./{name})" for name in names)
    body = f"""
# LoRA text-to-image weights for {config.pretrained_model_name_or_path}

LoRA adaptation weights (rank {config.rank}, alpha {config.lora_alpha or config.rank}) for
`{config.pretrained_model_name_or_path}`, fine-tuned on `{config.train_data_dir or config.dataset_name}`
with [lora_nb](https://github.com/) for {result.global_step} steps. Final training loss:
{result.losses[-1] if result.losses else float("nan"):.4f}.

{"Samples for the prompt “" + config.validation_prompt + "”:" if names else ""}

{images}

## Use it

```python
from lora_nb import load_lora_pipeline
pipe = load_lora_pipeline("{config.hub_model_id or config.output_dir}")  # reads base_model from this card
image = pipe("{config.validation_prompt or "a prompt"}", num_inference_steps=25).images[0]
```

or with diffusers alone: `pipe = StableDiffusionPipeline.from_pretrained(base_model)` then
`pipe.load_lora_weights("{config.hub_model_id or config.output_dir}")`.

## Training settings

```json
{json.dumps(settings, indent=2, default=str)}
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    card.save(out / "README.md")
