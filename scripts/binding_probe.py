"""Can a tiny-SD design bind a second colour to a small part? A probe of minutes, before a long pretraining.

    python scripts/binding_probe.py --model data/tiny-sd --steps 1000

It continues the model's UNet and text encoder on pictures of one large circle or square with two dots on
white paper, under their full captions ("a large yellow circle with two orange dots on a white background"),
and 10 % empty captions, as pretraining has them, so that guidance keeps its unconditional prediction.
Every `--every` steps it draws 32 of those captions, and 32 of colour pairs it never trains on
(HELD_OUT_PAIRS), and reads back the share of samples with the body's colour and two dots of the named
colour. Fitting the pictures is easy (the loss falls); a design that can follow "two orange dots" in
pretraining should first raise that share here, on its own training captions, and then on the held-out
ones.

Two measures say where a design fails. The read-back is split: the body's colour; some of the dots' colour
inside the body; and exactly two dots of it (the full criterion), so a colour that is drawn as one smear or
three blobs shows as geometry, not as colour. Before and after training, `caption_follow` changes the dots'
colour (or the body's) in each caption and asks how much of that change reaches the UNet's prediction of the
clean latent from the same noisy picture, noise level by noise level: exactly where the picture changes, and
as colour anywhere in the image.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from lora_nb.course.evaluate import body_colour, colour_mask, dot_count, erode, fill_holes, foreground_mask
from lora_nb.course.tiny import TINY_SD_PATH, load_tiny_pipeline
from lora_nb.course.world import COLOURS, Sample, draw_parts_sample, parts_caption, render_parts
from lora_nb.data import ImageTransform, tokenize
from lora_nb.inference import sample_images
from lora_nb.objective import denoising_loss

FIRST_SEED = 900_000  # far from the pretraining pool's seeds
HELD_OUT_SEED = 950_000
EMPTY_CAPTION_RATE = 0.1  # as in pretraining: guidance extrapolates from the empty caption's prediction
TWO_DOTS = {  # what draw_parts_sample fixes: one large body with two dots, nothing else, on white
    "count": 1,
    "paper": "white",
    "mark": "two dots",
    "attachment": None,
    "outline": None,
    "size": "large",
    "position": "center",
}


HELD_OUT_PAIRS = {  # (body, dots) colours the probe never trains on: binding that generalises draws them
    ("red", "green"),
    ("green", "blue"),
    ("blue", "yellow"),
    ("yellow", "purple"),
    ("purple", "orange"),
    ("orange", "red"),
}


def two_dot_pictures(count: int, held_out: bool = False) -> list[Sample]:
    """`count` pictures of a large circle or square with two dots on white paper, in the colour pairs the
    probe trains on, or (`held_out`) in HELD_OUT_PAIRS only."""
    samples, seed = [], HELD_OUT_SEED if held_out else FIRST_SEED
    while len(samples) < count:
        sample = draw_parts_sample(seed, **TWO_DOTS)
        seed += 1
        obj = sample.attributes["objects"][0]
        pair_held_out = (obj["colour"], obj["mark_colour"]) in HELD_OUT_PAIRS
        if obj["shape"] in ("circle", "square") and pair_held_out == held_out:
            samples.append(sample)
    return samples


READ_BACK = ("body colour", "dots' colour in it", "two dots of it")
FOLLOW_TIMESTEPS = (999, 750, 500, 250)


def read_back(pipe, samples: list[Sample]) -> dict[str, float]:
    """The shares of the model's samples of `samples`' captions with the body's colour; with it and some of
    the dots' colour inside the body; and with it and exactly two dots of that colour (READ_BACK's order)."""
    images = sample_images(pipe, [s.caption for s in samples], num_inference_steps=25, guidance_scale=7.5)
    counts = np.zeros(len(READ_BACK))
    for image, sample in zip(images, samples, strict=True):
        obj = sample.attributes["objects"][0]
        body = body_colour(image) == obj["colour"]
        inside = erode(fill_holes(foreground_mask(image)), 1)
        coloured = body and bool((inside & colour_mask(image, obj["mark_colour"])).any())
        counts += [body, coloured, body and dot_count(image, obj["mark_colour"]) == 2]
    return dict(zip(READ_BACK, (counts / len(samples)).tolist(), strict=True))


def latents_of(pipe, images) -> torch.Tensor:
    """(n, 4, h, w): the frozen VAE's latents of PIL `images`, with the pixels the trainer would give it."""
    transform = ImageTransform(pipe.unet.config.sample_size * pipe.vae_scale_factor, center_crop=True)
    with torch.no_grad():
        pixels = torch.stack([transform(image) for image in images])  # (n, 3, h, w) in [-1, 1]
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


def read_all(pipe, reading: dict) -> dict[str, dict[str, float]]:
    return {name: read_back(pipe, samples) for name, samples in reading.items()}


def changed_pair(sample: Sample, key: str, index: int) -> tuple[tuple, tuple]:
    """(image, caption) of `sample`'s attributes and of the same with the object's `key` ("mark_colour" or
    "colour") set to another colour, both drawn with the same jitter."""
    obj = sample.attributes["objects"][0]
    other = [c for c in COLOURS if c not in (obj["colour"], obj["mark_colour"])][index % 4]
    pair = []
    for attributes in (sample.attributes, {**sample.attributes, "objects": [{**obj, key: other}]}):
        pair.append((render_parts(attributes, random.Random(index)), parts_caption(attributes)))
    return tuple(pair)


@torch.no_grad()
def caption_follow(pipe, samples: list[Sample], key: str) -> dict[int, tuple[float, float]]:
    """{timestep: (exact, anywhere)}: how much of a change of the object's `key` in the caption reaches the
    UNet's prediction of the clean latent x0 from the noisy latent of the unchanged picture (1: all of it).
    Exact: the prediction's change projected on the latents' change. Anywhere: the same on the change
    summed over the image, per latent channel, blind to where the colour is put."""
    pairs = [changed_pair(sample, key, i) for i, sample in enumerate(samples)]
    latents, texts = [], []
    for images_and_captions in zip(*pairs, strict=True):  # the unchanged pictures, then the changed ones
        latents.append(latents_of(pipe, [image for image, _ in images_and_captions]))
        texts.append(pipe.text_encoder(tokenize(pipe.tokenizer, [c for _, c in images_and_captions]))[0])
    change = latents[1] - latents[0]  # (n, 4, h, w)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training schedule, as the probe's
    generator, follow = torch.Generator().manual_seed(0), {}
    for t in FOLLOW_TIMESTEPS:
        timesteps = torch.full((len(samples),), t)
        noise = torch.randn(change.shape, generator=generator)
        noisy = scheduler.add_noise(latents[0], noise, timesteps)
        x0 = [clean_latent(pipe.unet, scheduler, noisy, timesteps, text) for text in texts]
        moved = x0[1] - x0[0]
        exact = (moved * change).sum((1, 2, 3)) / change.pow(2).sum((1, 2, 3))
        moved, total = moved.sum((2, 3)), change.sum((2, 3))  # (n, 4): colour, wherever it is
        follow[t] = (exact.mean().item(), ((moved * total).sum(1) / total.pow(2).sum(1)).mean().item())
    return follow


def clean_latent(unet, scheduler, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor):
    """The UNet's prediction of the clean latent x0 from `noisy` at `timesteps`."""
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    output = unet(noisy, timesteps, encoder_hidden_states=text).sample
    if scheduler.config.prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noisy - (1 - alpha_bar).sqrt() * output
    return (noisy - (1 - alpha_bar).sqrt() * output) / alpha_bar.sqrt()


def print_follow(pipe, samples: list[Sample], when: str) -> None:
    print(f"{when}: share of a caption's colour change in the UNet's x0, exact / anywhere, by timestep")
    for key, name in (("mark_colour", "dots' colour"), ("colour", "body colour")):
        cells = [f"t {t}: {a:.2f} / {b:.2f}" for t, (a, b) in caption_follow(pipe, samples, key).items()]
        print(f"  {name}: " + ", ".join(cells), flush=True)


def probe(
    pipe, samples: list[Sample], steps: int, every: int, lr: float, reading: dict, batch_size: int = 64
) -> list[tuple]:
    """Train on `samples`; at step 0 and every `every` steps a row (step, mean loss since the last row,
    {name: read-back shares} of each list of samples in `reading`)."""
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the sampler's betas, as trained
    latents = latents_of(pipe, [s.image for s in samples])  # computed once: the VAE is frozen
    captions = [s.caption for s in samples]  # the full caption: no part left out, or none
    params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(0)
    rows, losses = [(0, float("nan"), read_all(pipe, reading))], []
    for step in range(1, steps + 1):
        pipe.unet.train()
        pipe.text_encoder.train()
        index = torch.randint(0, len(samples), (batch_size,), generator=generator)
        empty = torch.rand(batch_size, generator=generator) < EMPTY_CAPTION_RATE
        batch = ["" if drop else captions[i] for i, drop in zip(index, empty, strict=True)]
        text = pipe.text_encoder(tokenize(pipe.tokenizer, batch))[0]
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
            rows.append((step, float(np.mean(losses)), read_all(pipe, reading)))
            losses = []
            read = "; ".join(
                f"{name}: " + ", ".join(f"{criterion} {share:.0%}" for criterion, share in shares.items())
                for name, shares in rows[-1][2].items()
            )
            print(f"step {step}: loss {rows[-1][1]:.4f}; {read}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=TINY_SD_PATH)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument(
        "--read", type=int, default=32, help="how many training and held-out captions to draw and read"
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    samples = two_dot_pictures(args.images)
    reading = {"trained on": samples[: args.read], "held out": two_dot_pictures(args.read, held_out=True)}
    pipe = load_tiny_pipeline(args.model)
    print_follow(pipe, reading["trained on"], "before")
    rows = probe(pipe, samples, args.steps, args.every, args.lr, reading)
    print_follow(pipe, reading["trained on"], "after")
    columns = [f"{name}: {criterion}" for name in reading for criterion in READ_BACK]
    print("| step | loss | " + " | ".join(columns) + " |\n| --- | --- |" + " --- |" * len(columns))
    for step, loss, read in rows:
        cells = " | ".join(f"{share:.0%}" for shares in read.values() for share in shares.values())
        print(f"| {step} | {f'{loss:.4f}' if step else '-'} | {cells} |")


if __name__ == "__main__":
    main()
