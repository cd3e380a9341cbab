"""Measuring what the synthetic worlds make measurable: colour, shape, position and style of an image.

The background is the median colour of the image's border; the foreground is every pixel far from it.
A foreground pixel votes for the named colour nearest to it, if it is saturated enough to have a hue.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .synthetic import COLOURS, SHAPES

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (colours, 3)
_NAMES = list(COLOURS)
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as foreground
MIN_SATURATION = 0.35


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)


def background_colour(image) -> np.ndarray:
    rgb = _rgb(image)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    return np.median(border, axis=0)


def foreground_mask(image) -> np.ndarray:
    rgb = _rgb(image)
    return np.linalg.norm(rgb - background_colour(rgb), axis=-1) > FOREGROUND_DISTANCE


def colour_votes(image) -> dict[str, int]:
    """How many saturated foreground pixels lie nearest to each named colour."""
    rgb = _rgb(image)
    pixels = rgb[foreground_mask(rgb)]
    saturation = (pixels.max(-1) - pixels.min(-1)) / np.maximum(pixels.max(-1), 1.0)
    pixels = pixels[saturation >= MIN_SATURATION]
    nearest = np.linalg.norm(pixels[:, None] - _PALETTE[None], axis=-1).argmin(-1)
    counts = np.bincount(nearest, minlength=len(_NAMES))
    return dict(zip(_NAMES, counts.tolist(), strict=True))


def dominant_colour(image, min_pixels: int = 8) -> str | None:
    """The named colour most of the foreground has; None when too little of the image is coloured."""
    votes = colour_votes(image)
    name = max(votes, key=votes.get)
    return name if votes[name] >= min_pixels else None


def foreground_geometry(image) -> dict[str, float]:
    """Area (fraction of the image), centroid (x, y in [0, 1], y down), and how full its bounding box is."""
    mask = foreground_mask(image)
    if not mask.any():
        return {"area": 0.0, "x": 0.5, "y": 0.5, "box_fill": 0.0}
    ys, xs = np.nonzero(mask)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    h, w = mask.shape
    return {"area": mask.mean(), "x": (xs.mean() + 0.5) / w, "y": (ys.mean() + 0.5) / h, "box_fill": mask.sum() / box}


def style_statistics(image) -> dict[str, float]:
    """The creatures' style in numbers: dark outline pixels that are not background, and the paper's lightness."""
    rgb = _rgb(image)
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    background = background_colour(rgb)
    outline = (luma < 70) & foreground_mask(rgb)
    return {
        "outline": float(outline.mean()),
        "background_luma": float(background @ np.array([0.299, 0.587, 0.114])),
    }


def mean_style(images) -> dict[str, float]:
    stats = [style_statistics(im) for im in images]
    return {key: float(np.mean([s[key] for s in stats])) for key in stats[0]}


@torch.no_grad()
def colour_accuracy(pipe, colours=tuple(COLOURS), shapes=SHAPES, per_colour: int = 16, seed: int = 0,
                    num_inference_steps: int = 25, guidance_scale: float = 7.5) -> dict[str, float]:
    """For each colour, the fraction of images of 'a <colour> <shape>' whose dominant colour is that colour.

    The prompts cycle through `shapes`; images are drawn with a fixed seed, so the figure is repeatable.
    """
    accuracy = {}
    for colour in colours:
        prompts = [f"a {colour} {shapes[i % len(shapes)]}" for i in range(per_colour)]
        images = pipe(prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      generator=torch.Generator().manual_seed(seed)).images
        accuracy[colour] = float(np.mean([dominant_colour(im) == colour for im in images]))
    return accuracy


class HeldOut:
    """Denoising loss on images a model was not trained on, comparable between models.

    The diffusion loss of one example depends on its random timestep and noise, so every model measured
    gets the same draws (`repeats` per image, from `seed`); the frozen VAE's latents are computed once.
    """

    @torch.no_grad()
    def __init__(self, pipe, images, captions, seed: int = 0, repeats: int = 4, batch_size: int = 32):
        from diffusers import DDPMScheduler

        from .data import ImageTransform

        self.captions, self.seed, self.repeats, self.batch_size = list(captions), seed, repeats, batch_size
        transform = ImageTransform(pipe.unet.config.sample_size * pipe.vae_scale_factor, center_crop=True)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
        device, dtype = pipe.unet.device, pipe.unet.dtype
        self.latents = []  # per batch: (batch, 4, h, w), scaled as the UNet sees them
        for first in range(0, len(images), batch_size):
            pixels = torch.stack([transform(im) for im in images[first:first + batch_size]]).to(device, dtype)
            self.latents.append(pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor)

    @torch.no_grad()
    def loss(self, pipe) -> float:
        from .data import tokenize
        from .objective import denoising_loss

        generator = torch.Generator().manual_seed(self.seed)
        losses = []
        for i, latents in enumerate(self.latents):
            ids = tokenize(pipe.tokenizer, self.captions[i * self.batch_size:(i + 1) * self.batch_size])
            text = pipe.text_encoder(ids.to(latents.device))[0]
            for _ in range(self.repeats):
                losses.append(denoising_loss(pipe.unet, self.scheduler, latents, text, generator=generator,
                                             reduce=False).cpu())
        return float(torch.cat(losses).mean())


def heldout_denoising_loss(pipe, images, captions, seed: int = 0, repeats: int = 4, batch_size: int = 32) -> float:
    """`pipe`'s mean denoising loss on held-out images, with fixed noise and timesteps (see HeldOut)."""
    return HeldOut(pipe, images, captions, seed, repeats, batch_size).loss(pipe)


def colour_histogram(image, bins: int = 4) -> np.ndarray:
    """The foreground's colours as a normalised bins^3 histogram: what a subject 'looks like' to this evaluator."""
    rgb = _rgb(image)
    pixels = rgb[foreground_mask(rgb)]
    if len(pixels) == 0:
        return np.zeros(bins**3)
    index = np.clip((pixels / 256 * bins).astype(int), 0, bins - 1) @ np.array([bins * bins, bins, 1])
    counts = np.bincount(index, minlength=bins**3).astype(np.float64)
    return counts / counts.sum()


def subject_distance(images, references) -> float:
    """Mean over `images` of the distance to the nearest reference, in [0, 1] (half the L1 histogram distance).

    0: every image has a reference with the same foreground colours; 1: no colour in common.
    """
    refs = [colour_histogram(r) for r in references]
    return float(np.mean([min(0.5 * np.abs(colour_histogram(im) - r).sum() for r in refs) for im in images]))


def pixel_drift(images, baseline) -> float:
    """Mean absolute pixel difference (0-1) between images drawn with the same seeds by two models."""
    return float(np.mean([np.abs(_rgb(a) - _rgb(b)).mean() / 255 for a, b in zip(images, baseline, strict=True)]))


@torch.no_grad()
def reconstruction_error(vae, images, batch_size: int = 64) -> dict[str, float]:
    """How well the VAE gives `images` back: mean squared error (pixels in [0, 1]) and PSNR in dB."""
    errors = []
    for first in range(0, len(images), batch_size):
        pixels = np.stack([_rgb(im) for im in images[first:first + batch_size]]) / 127.5 - 1.0
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(vae.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        errors.append(((y - x).float() / 2).pow(2).mean(dim=(1, 2, 3)).cpu())
    mse = float(torch.cat(errors).mean())
    return {"mse": mse, "psnr": float(10 * np.log10(1.0 / mse))}
