"""Can a tiny-SD design bind a second colour to a small part? A probe of minutes, before a long pretraining.

    python scripts/binding_probe.py --model data/tiny-sd --steps 1000

It continues the model's UNet and text encoder on pictures of one large circle or square with two dots on
white paper, under their full captions ("a large yellow circle with two orange dots on a white background"),
and every `--every` steps draws those captions and reads back the share of samples with the body's colour
and two dots of the named colour. Fitting the pictures is easy (the loss falls); a design that can follow
"two orange dots" in pretraining should first raise that share here, on its own training captions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from lora_nb.course.evaluate import body_colour, dot_count
from lora_nb.course.tiny import TINY_SD_PATH, load_tiny_pipeline
from lora_nb.course.world import Sample, draw_parts_sample
from lora_nb.data import ImageTransform, tokenize
from lora_nb.inference import sample_images
from lora_nb.objective import denoising_loss

FIRST_SEED = 900_000  # far from the pretraining pool's seeds
TWO_DOTS = {  # what draw_parts_sample fixes: one large body with two dots, nothing else, on white
    "count": 1,
    "paper": "white",
    "mark": "two dots",
    "attachment": None,
    "outline": None,
    "size": "large",
    "position": "center",
}


def two_dot_pictures(count: int) -> list[Sample]:
    """`count` pictures of a large circle or square with two dots on white paper."""
    samples, seed = [], FIRST_SEED
    while len(samples) < count:
        sample = draw_parts_sample(seed, **TWO_DOTS)
        seed += 1
        if sample.attributes["objects"][0]["shape"] in ("circle", "square"):
            samples.append(sample)
    return samples


def read_back(pipe, samples: list[Sample]) -> float:
    """The share of the model's samples of `samples`' captions with the body's colour and its two dots'."""
    images = sample_images(pipe, [s.caption for s in samples], num_inference_steps=25, guidance_scale=7.5)
    objects = [s.attributes["objects"][0] for s in samples]
    return float(
        np.mean(
            [
                body_colour(im) == o["colour"] and dot_count(im, o["mark_colour"]) == 2
                for im, o in zip(images, objects, strict=True)
            ]
        )
    )


def probe(
    pipe, samples: list[Sample], steps: int, every: int, lr: float, read: int = 32, batch_size: int = 64
) -> list[tuple]:
    """Train on `samples`; (step, mean loss since the last row, read-back share of the first `read`) at step 0
    and every `every` steps."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the sampler's betas, as trained
    transform = ImageTransform(pipe.unet.config.sample_size * pipe.vae_scale_factor, center_crop=True)
    pixels = torch.stack([transform(s.image) for s in samples])  # (n, 3, h, w) in [-1, 1], as the trainer's
    with torch.no_grad():  # (n, 4, h, w): the frozen VAE's latents, computed once
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    captions = [s.caption for s in samples]  # the full caption: no part left out
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(0)
    rows, losses = [(0, float("nan"), read_back(pipe, samples[:read]))], []
    for step in range(1, steps + 1):
        pipe.unet.train()
        pipe.text_encoder.train()
        index = torch.randint(0, len(samples), (batch_size,), generator=generator)
        text = pipe.text_encoder(tokenize(pipe.tokenizer, [captions[i] for i in index]))[0]
        loss = denoising_loss(
            pipe.unet, scheduler, latents[index], text, multires_discount=0.8, generator=generator
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            pipe.unet.eval()
            pipe.text_encoder.eval()
            rows.append((step, float(np.mean(losses)), read_back(pipe, samples[:read])))
            losses = []
            print(f"step {rows[-1][0]}: loss {rows[-1][1]:.4f}, read back {rows[-1][2]:.0%}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=TINY_SD_PATH)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument(
        "--read", type=int, default=32, help="how many of the training captions to draw and read"
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    samples = two_dot_pictures(args.images)
    pipe = load_tiny_pipeline(args.model)
    rows = probe(pipe, samples, args.steps, args.every, args.lr, args.read)
    print("| step | loss | body + two dots of the named colours |\n| --- | --- | --- |")
    for step, loss, share in rows:
        print(f"| {step} | {f'{loss:.4f}' if step else '-'} | {share:.0%} |")


if __name__ == "__main__":
    main()
