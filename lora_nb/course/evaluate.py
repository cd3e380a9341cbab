"""Measuring what the synthetic worlds make measurable: colour, shape, position and style of an image.

The background is the median colour of the image's border; the foreground is every pixel far from it.
A foreground pixel votes for the named colour nearest to it, if it is saturated enough to have a hue.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..data import tokenize
from ..inference import sample_images
from ..inject import lora_layers
from .world import (
    ATTACHMENTS,
    COLOURS,
    OUTLINE_COLOURS,
    PAIRS,
    PAPERS,
    SHAPES,
    SIZES,
    SUBJECT_BODY,
    SUBJECT_CLASS,
    SUBJECT_DOT,
    parts_caption,
    random_object,
)

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


def paper_of(image) -> str:
    """The named paper (PAPERS) nearest to the image's background colour."""
    background = background_colour(image)
    return min(PAPERS, key=lambda name: np.linalg.norm(background - np.array(PAPERS[name])))


def foreground_mask(image) -> np.ndarray:
    rgb = _rgb(image)
    return np.linalg.norm(rgb - background_colour(rgb), axis=-1) > FOREGROUND_DISTANCE


def colour_mask(image, colour: str, max_distance: float = 70.0) -> np.ndarray:
    """The saturated foreground pixels near `colour` and nearer to it than to any other named colour.

    `max_distance` leaves out the blends at an edge (yellow fading into a black outline reads as green).
    """
    rgb = _rgb(image)
    saturated = (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1.0) >= MIN_SATURATION
    distance = np.linalg.norm(rgb[..., None, :] - _PALETTE, axis=-1)  # (h, w, colours)
    index = _NAMES.index(colour)
    near = (distance.argmin(-1) == index) & (distance[..., index] <= max_distance)
    return foreground_mask(rgb) & saturated & near


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`mask` with every region it encloses filled: outside is what the border reaches without crossing it."""
    outside = np.zeros_like(mask)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        outside[edge] = ~mask[edge]
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~mask
        if (grown == outside).all():
            return ~outside
        outside = grown


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the mask's pixels in [0, 1], y down; the image centre for an empty mask."""
    if not mask.any():
        return 0.5, 0.5
    ys, xs = np.nonzero(mask)
    return (xs.mean() + 0.5) / mask.shape[1], (ys.mean() + 0.5) / mask.shape[0]


def position_of(mask: np.ndarray, margin: float = 0.06) -> str:
    """'left', 'right', 'top' or 'bottom' where the centroid is off centre by more than `margin`, else
    'center'."""
    x, y = (c - 0.5 for c in centroid(mask))
    if max(abs(x), abs(y)) <= margin:
        return "center"
    if abs(x) >= abs(y):
        return "left" if x < 0 else "right"
    return "top" if y < 0 else "bottom"


# A body's outline seen from its centre is flat for a circle and has 3, 4 or 5 bumps for a triangle, a
# square or a star: the relative size of those harmonics of the radial profile tells the shape. The
# typical sizes were read off drawn shapes; tests/test_evaluate.py checks the reading on the drawings.
SHAPE_HARMONICS = {"triangle": (3, 0.28), "square": (4, 0.15), "star": (5, 0.3)}


def radial_profile(mask: np.ndarray, rays: int = 90) -> np.ndarray:
    """The distance from the mask's centroid to its farthest pixel along each of `rays` directions."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    angles = np.linspace(0, 2 * np.pi, rays, endpoint=False)[:, None]
    steps = np.arange(0, max(h, w), 0.5)[None]
    px = np.clip(np.round(xs.mean() + np.cos(angles) * steps).astype(int), 0, w - 1)
    py = np.clip(np.round(ys.mean() + np.sin(angles) * steps).astype(int), 0, h - 1)
    inside = mask[py, px]  # (rays, steps)
    last = inside.shape[1] - 1 - np.argmax(inside[:, ::-1], axis=1)
    return np.where(inside.any(1), steps[0, last], 0.0)


def shape_of(image, colour: str | None = None, min_pixels: int = 12) -> str | None:
    """The shape of an image's single object: its silhouette (the foreground, or the pixels of `colour`, with
    what they enclose) read by SHAPE_HARMONICS."""
    silhouette = fill_holes(foreground_mask(image) if colour is None else colour_mask(image, colour))
    if silhouette.sum() < min_pixels:
        return None
    profile = radial_profile(silhouette)
    spectrum = np.abs(np.fft.rfft(profile)) * 2 / len(profile) / profile.mean()
    scores = {name: spectrum[k] / typical for name, (k, typical) in SHAPE_HARMONICS.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] >= 0.4 else "circle"


def erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    shrunk = mask.copy()
    for _ in range(pixels):
        shrunk[1:-1, 1:-1] &= shrunk[:-2, 1:-1] & shrunk[2:, 1:-1] & shrunk[1:-1, :-2] & shrunk[1:-1, 2:]
    return shrunk


def body_colour(image, min_pixels: int = 8) -> str | None:
    """The named colour most of the body's inside has: its silhouette less a rim where an outline may be."""
    rgb = _rgb(image)
    inside = erode(fill_holes(foreground_mask(rgb)), 2)
    votes = {name: int((colour_mask(rgb, name) & inside).sum()) for name in _NAMES}
    name = max(votes, key=votes.get)
    return name if votes[name] >= min_pixels else None


def dot_count(image, dots: str, min_pixels: int = 3) -> int:
    """How many separate blobs of colour `dots` lie inside an image's single object, counted left to right."""
    inside = erode(fill_holes(foreground_mask(image)), 1) & colour_mask(image, dots)
    columns = inside.sum(0) > 0
    runs = np.flatnonzero(np.diff(np.concatenate([[0], columns.astype(int), [0]])) == 1)
    return len(runs) if inside.sum() >= min_pixels else 0


def outline_share(image, body: str, outline: str | None = None) -> float:
    """The share of the body's rim (the pixels just outside it) that is dark (or of colour `outline`)."""
    rgb = _rgb(image)
    body_mask = fill_holes(colour_mask(rgb, body))
    grown = body_mask.copy()
    for _ in range(2):
        grown[1:] |= grown[:-1].copy()
        grown[:-1] |= grown[1:].copy()
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
    rim = grown & ~body_mask
    if not rim.any():
        return 0.0
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    drawn = colour_mask(rgb, outline) if outline else luma < 80
    return float((drawn & rim).sum() / rim.sum())


# --- does the base model follow its prompts? ---------------------------------------------------------------


@dataclass
class Case:
    """A prompt, what its image must show (the world's attributes), and the skill it tests."""

    skill: str
    prompt: str
    attributes: dict


def _case(skill: str, rng: random.Random, objects: list[dict], paper: str | None = None) -> Case:
    attributes = {"paper": paper or rng.choice(list(PAPERS)), "objects": objects}
    caption = parts_caption(attributes)
    return Case(skill, caption if paper else caption.rsplit(" on a ", 1)[0], attributes)


def prompt_suite(per_case: int = 4, seed: int = 0) -> list[Case]:
    """Prompts for every colour at every size, every shape, every side, two objects, and parts on request:
    an outline, two dots, and both ("parts")."""

    rng = random.Random(seed)

    def plain(position="center", **fixed) -> dict:
        obj = random_object(rng, position)
        return {**obj, "outline": None, "mark": None, "attachment": None, **fixed}

    cases = []
    for _ in range(per_case):
        for colour in COLOURS:
            cases += [
                _case(f"colour ({size})", rng, [plain(colour=colour, size=size)], paper="gray")
                for size in SIZES
            ]
        cases += [_case("shape", rng, [plain(shape=shape, size="large")]) for shape in SHAPES]
        cases += [
            _case(f"position ({position})", rng, [plain(position, size="medium")])
            for position in ("left", "right", "top", "bottom")
        ]
        a, b = rng.sample(list(COLOURS), 2)
        pair = rng.choice(PAIRS)
        cases.append(
            _case(
                "two objects",
                rng,
                [plain(pair[0], colour=a, size="small"), plain(pair[1], colour=b, size="small")],
            )
        )
        body, dots = rng.sample(list(COLOURS), 2)
        shape = rng.choice(("circle", "square"))
        outline = {"outline": "thick", "outline_colour": "black"}
        two_dots = {"mark": "two dots", "mark_colour": dots}
        for skill, parts in (("outline", outline), ("two dots", two_dots), ("parts", outline | two_dots)):
            cases.append(_case(skill, rng, [plain(shape=shape, colour=body, size="large", **parts)]))
    return cases


def follows(case: Case, image) -> bool:
    """Whether `image` shows what `case` asks for, as far as the case's skill goes."""
    objects = case.attributes["objects"]
    first = objects[0]
    if case.skill.startswith("colour"):
        return body_colour(image) == first["colour"]
    if case.skill == "shape":
        return shape_of(image) == first["shape"]
    if case.skill.startswith("position") or case.skill == "two objects":
        return all(
            position_of(colour_mask(image, o["colour"])) == o["position"]
            and colour_mask(image, o["colour"]).sum() >= 6
            for o in objects
        )
    if case.skill in ("outline", "two dots", "parts"):
        return (
            body_colour(image) == first["colour"]
            and (first["outline"] is None or outline_share(image, first["colour"]) > 0.5)
            and (first["mark"] is None or dot_count(image, first["mark_colour"]) == 2)
        )
    raise ValueError(f"unknown skill {case.skill!r}")


def has_creature_colours(image, body: str, eyes: str) -> bool:
    """Whether an image shows a body of colour `body` with two eyes of colour `eyes` in it."""
    return body_colour(image) == body and dot_count(image, eyes) == 2


def shows_subject(image) -> bool:
    """Whether an image shows the DreamBooth subject: an orange star with one purple dot in it."""
    return (
        shape_of(image, SUBJECT_BODY) == SUBJECT_CLASS  # the body's own outline: smudges on the paper aside
        and body_colour(image) == SUBJECT_BODY
        and dot_count(image, SUBJECT_DOT) == 1
    )


def shows_plain(image, shape: str = SUBJECT_CLASS) -> bool:
    """Whether an image shows a body of `shape` that is not the subject: the class, as the prior keeps it."""
    return shape_of(image) == shape and not shows_subject(image)


@torch.no_grad()
def prompt_following(
    pipe,
    cases: list[Case],
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 16,
) -> dict[str, float]:
    """Per skill, the share of `cases` whose image (case i drawn from seed `seed + i`) shows what it asks."""
    hits: dict[str, list[bool]] = {}
    for first in range(0, len(cases), batch_size):
        batch = cases[first : first + batch_size]
        images = sample_images(
            pipe,
            [c.prompt for c in batch],
            seed=seed + first,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )
        for case, image in zip(batch, images, strict=True):
            hits.setdefault(case.skill, []).append(follows(case, image))
    return {skill: float(np.mean(h)) for skill, h in hits.items()}


@torch.no_grad()
def encoding_change(pipe, prompt: str, other: str) -> tuple[float, float]:
    """How far the text encoding moves from `prompt` to `other`, relative to its size: (over the padding
    after both prompts, over all positions). The padding has read the whole prompt through CLIP's causal
    attention, and the UNet reads it (02 shows how much): what it barely carries, the UNet
    can read only at the word's own positions."""
    ids = tokenize(pipe.tokenizer, [prompt, other]).to(pipe.text_encoder.device)
    text = pipe.text_encoder(ids)[0].float()  # (2, positions, width)
    end = max(len(pipe.tokenizer(p).input_ids) for p in (prompt, other))  # past both prompts' end tokens
    if end >= ids.shape[1]:
        raise ValueError(
            f"{prompt!r} or {other!r} fills all {ids.shape[1]} text positions: no padding to compare"
        )
    relative = lambda a, b: float((a - b).norm() / a.norm())
    return relative(text[0, end:], text[1, end:]), relative(text[0], text[1])


# What `text_sensitivity` changes, one at a time, in an object that has every part.
SENSITIVITY_CHANGES = {
    "body colour": ("colour", list(COLOURS)),
    "shape": ("shape", ["circle", "square"]),  # the shapes that take ears
    "size": ("size", ["medium", "large"]),  # the sizes with room for two dots
    "position": ("position", ["left", "right", "top", "bottom"]),
    "outline colour": ("outline_colour", list(OUTLINE_COLOURS)),
    "dots' colour": ("mark_colour", list(COLOURS)),
    "a dot or two dots": ("mark", ["a dot", "two dots"]),
    "ears / antennae / horns": ("attachment", list(ATTACHMENTS)),
    "paper": ("paper", list(PAPERS)),
}


def text_sensitivity(pipe, count: int = 24, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Per attribute of `SENSITIVITY_CHANGES`, the mean `encoding_change` when only it changes in the full
    caption of one of `count` random objects (a body with an outline, dots and an attachment)."""
    rng = random.Random(seed)
    values_of = dict(SENSITIVITY_CHANGES.values())  # {attribute key: the values it takes here}
    changes: dict[str, list[tuple[float, float]]] = {name: [] for name in SENSITIVITY_CHANGES}
    for _ in range(count):
        obj = random_object(rng, rng.choice(values_of["position"]))
        obj.update(shape=rng.choice(values_of["shape"]), size=rng.choice(values_of["size"]))
        obj.update(outline="thick", mark="two dots", attachment=rng.choice(values_of["attachment"]))
        scene = {"paper": rng.choice(values_of["paper"]), **obj}
        for name, (key, values) in SENSITIVITY_CHANGES.items():
            taken = {scene["colour"], scene["outline_colour"], scene["mark_colour"], scene[key]}
            other = {**scene, key: rng.choice([v for v in values if v not in taken])}
            captions = [parts_caption({"paper": s["paper"], "objects": [s]}) for s in (scene, other)]
            changes[name].append(encoding_change(pipe, *captions))
    return {name: tuple(np.mean(pairs, axis=0).tolist()) for name, pairs in changes.items()}


def style_statistics(image) -> dict[str, float]:
    """The creatures' style in numbers: dark outline pixels that are not background, and the paper's
    lightness."""
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


class HeldOut:
    """Denoising loss on images a model was not trained on, comparable between models.

    The diffusion loss of one example depends on its random timestep and noise, so every model measured
    gets the same draws (`repeats` per image, from `seed`); the frozen VAE's latents are computed once.
    """

    @torch.no_grad()
    def __init__(self, pipe, images, captions, seed: int = 0, repeats: int = 4, batch_size: int = 32):
        from diffusers import DDPMScheduler

        from ..data import ImageTransform

        self.captions, self.seed, self.repeats, self.batch_size = list(captions), seed, repeats, batch_size
        transform = ImageTransform(pipe.unet.config.sample_size * pipe.vae_scale_factor, center_crop=True)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise schedule
        device, dtype = pipe.unet.device, pipe.unet.dtype
        self.latents = []  # per batch: (batch, 4, h, w), scaled as the UNet sees them
        for first in range(0, len(images), batch_size):
            pixels = torch.stack([transform(im) for im in images[first : first + batch_size]]).to(
                device, dtype
            )
            self.latents.append(pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor)

    @torch.no_grad()
    def loss(self, pipe) -> float:
        from ..data import tokenize
        from ..objective import denoising_loss

        generator = torch.Generator().manual_seed(self.seed)
        losses = []
        for i, latents in enumerate(self.latents):
            ids = tokenize(pipe.tokenizer, self.captions[i * self.batch_size : (i + 1) * self.batch_size])
            text = pipe.text_encoder(ids.to(latents.device))[0]
            for _ in range(self.repeats):
                losses.append(
                    denoising_loss(
                        pipe.unet, self.scheduler, latents, text, generator=generator, reduce=False
                    ).cpu()
                )
        return float(torch.cat(losses).mean())


def heldout_denoising_loss(
    pipe, images, captions, seed: int = 0, repeats: int = 4, batch_size: int = 32
) -> float:
    """`pipe`'s mean denoising loss on held-out images, with fixed noise and timesteps (see HeldOut)."""
    return HeldOut(pipe, images, captions, seed, repeats, batch_size).loss(pipe)


def colour_histogram(image, bins: int = 4) -> np.ndarray:
    """The foreground's colours as a normalised bins^3 histogram: what a subject 'looks like' to this
    evaluator."""
    rgb = _rgb(image)
    pixels = rgb[foreground_mask(rgb)]
    if len(pixels) == 0:
        return np.zeros(bins**3)
    index = np.clip((pixels / 256 * bins).astype(int), 0, bins - 1) @ np.array([bins * bins, bins, 1])
    counts = np.bincount(index, minlength=bins**3).astype(np.float64)
    return counts / counts.sum()


def subject_distance(images, references) -> float:
    """Mean over `images` of the distance to the nearest reference, in [0, 1] (half the L1 histogram
    distance).

    0: every image has a reference with the same foreground colours; 1: no colour in common.
    """
    refs = [colour_histogram(r) for r in references]
    return float(np.mean([min(0.5 * np.abs(colour_histogram(im) - r).sum() for r in refs) for im in images]))


def pixel_drift(images, baseline) -> float:
    """Mean absolute pixel difference (0-1) between images drawn with the same seeds by two models."""
    return float(
        np.mean([np.abs(_rgb(a) - _rgb(b)).mean() / 255 for a, b in zip(images, baseline, strict=True)])
    )


@torch.no_grad()
def reconstruction_error(vae, images, batch_size: int = 64) -> dict[str, float]:
    """How well the VAE gives `images` back: mean squared error (pixels in [0, 1]) and PSNR in dB."""
    errors = []
    for first in range(0, len(images), batch_size):
        pixels = np.stack([_rgb(im) for im in images[first : first + batch_size]]) / 127.5 - 1.0
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(vae.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        errors.append(((y - x).float() / 2).pow(2).mean(dim=(1, 2, 3)).cpu())
    mse = float(torch.cat(errors).mean())
    return {"mse": mse, "psnr": float(10 * np.log10(1.0 / mse))}


@torch.no_grad()
def magnitude_and_direction(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """DoRA's analysis of an update (Liu et al., 2024, sec. 2): per LoRA layer in `model`, with W the frozen
    weight and W' the weight the layer computes with (``merged_weight``), compared output channel by output
    channel (each row of W): the mean relative magnitude change |‖W'ᵢ‖ - ‖Wᵢ‖| / ‖Wᵢ‖ and the mean
    direction change 1 - cos(W'ᵢ, Wᵢ)."""
    changes = {}
    for name, layer in lora_layers(model).items():
        if layer.merged:
            raise ValueError(f"{name} is merged: unmerge it first, its base weight is no longer W")
        before = layer.base.weight.flatten(1).float()
        after = layer.merged_weight().flatten(1).float()
        norms = before.norm(dim=1)
        magnitude = ((after.norm(dim=1) - norms).abs() / norms).mean()
        direction = (1 - torch.nn.functional.cosine_similarity(after, before, dim=1)).mean()
        changes[name] = (float(magnitude), float(direction))
    return changes
