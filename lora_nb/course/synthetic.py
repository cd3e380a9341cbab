"""The course's synthetic worlds: shapes (pretraining), creatures (a new style) and one subject (DreamBooth).

Every image is drawn from a seed, so a data set is a pure function of (kind, count, seed) and can be
written again bit for bit with `python -m lora_nb.course.synthetic`. Drawing happens at 4x the final size and is
downsampled, which gives anti-aliased edges the VAE can learn.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 32  # the tiny pipeline's native resolution
SUPERSAMPLE = 4

# Named colours: the words the base model learns and the palette the evaluator classifies against.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.17, "medium": 0.27, "large": 0.4}  # radius as a fraction of the image side
POSITIONS = {
    "center": (0.0, 0.0),
    "left": (-0.2, 0.0),
    "right": (0.2, 0.0),
    "top": (0.0, -0.2),
    "bottom": (0.0, 0.2),
}

# The creatures' style: pastel paper, thick dark outlines, eyes. The shapes world has none of it.
PASTELS = {"pink": (250, 215, 225), "cream": (250, 240, 205), "mint": (210, 245, 225), "sky": (210, 230, 250)}
OUTLINE = (30, 25, 35)

# The DreamBooth subject: one particular orange star with a purple dot, of the class "star".
SUBJECT_CLASS = "star"
SUBJECT_BODY, SUBJECT_DOT = (245, 135, 30), (140, 60, 190)

EXTRA_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "photo",
    "picture",
    "drawing",
    "cartoon",
    "image",
    "toy",
    "big",
]


@dataclass
class Sample:
    image: Image.Image
    caption: str
    attributes: dict


def _jitter(colour: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners, radius = 4, [r * 1.2] * 4
        angle += math.pi / 4
    elif shape == "triangle":
        corners, radius = 3, [r * 1.25] * 3
        angle -= math.pi / 2
    elif shape == "star":
        corners, radius = 10, [r * 1.25, r * 0.55] * 5
        angle -= math.pi / 2
    else:
        raise ValueError(f"not a polygon shape: {shape!r}")
    return [
        (
            cx + radius[i] * math.cos(angle + 2 * math.pi * i / corners),
            cy + radius[i] * math.sin(angle + 2 * math.pi * i / corners),
        )
        for i in range(corners)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill,
    angle=0.0,
    outline=None,
    width=0,
) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill, outline=outline, width=width)


def _canvas(background) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    side = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (side, side), background)
    return image, ImageDraw.Draw(image), side


def _finish(image: Image.Image) -> Image.Image:
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def shape_caption(attributes: dict, rng: random.Random | None = None) -> str:
    """'a large red circle on the left on a white background'; with `rng`, parts are dropped at random
    so the model also learns short prompts such as 'a red circle'."""
    keep = (lambda p: rng.random() >= p) if rng else (lambda p: True)
    words = ["a"]
    if keep(0.5):
        words.append(attributes["size"])
    if keep(0.1):
        words.append(attributes["colour"])
    words.append(attributes["shape"] if keep(0.1) else "shape")
    if attributes["position"] != "center" and keep(0.5):
        words.append(f"on the {attributes['position']}")
    if keep(0.5):
        words.append(f"on a {attributes['background']} background")
    return " ".join(words)


def draw_shape_sample(seed: int, **fixed) -> Sample:
    """One image of the shapes world; any attribute (colour, shape, size, position, background) may be fixed."""
    rng = random.Random(seed)
    attributes = {
        "colour": rng.choice(list(COLOURS)),
        "shape": rng.choice(SHAPES),
        "size": rng.choice(list(SIZES)),
        "position": rng.choice(list(POSITIONS)),
        "background": rng.choice(list(BACKGROUNDS)),
    }
    attributes.update(fixed)
    image, draw, side = _canvas(_jitter(BACKGROUNDS[attributes["background"]], rng, 8))
    dx, dy = POSITIONS[attributes["position"]]
    r = SIZES[attributes["size"]] * side * rng.uniform(0.9, 1.1)
    cx, cy = side * (0.5 + dx + rng.uniform(-0.03, 0.03)), side * (0.5 + dy + rng.uniform(-0.03, 0.03))
    angle = rng.uniform(-0.3, 0.3)
    _draw_shape(draw, attributes["shape"], cx, cy, r, _jitter(COLOURS[attributes["colour"]], rng), angle)
    return Sample(_finish(image), shape_caption(attributes), attributes)


def draw_creature_sample(seed: int) -> Sample:
    """A pocket-monster-like creature: outlined round body, ears, two big eyes, on pastel paper."""
    rng = random.Random(seed)
    body, eyes = rng.sample(list(COLOURS), 2)
    paper = rng.choice(list(PASTELS))
    ears = rng.choice(["pointy ears", "round ears", "antennae"])
    image, draw, side = _canvas(_jitter(PASTELS[paper], rng, 6))
    width = SUPERSAMPLE * 1.5
    cx, cy = side * rng.uniform(0.42, 0.58), side * rng.uniform(0.52, 0.62)
    rx, ry = side * rng.uniform(0.24, 0.32), side * rng.uniform(0.22, 0.28)
    fill = _jitter(COLOURS[body], rng)
    for sign in (-1, 1):
        ex = cx + sign * rx * 0.6
        if ears == "pointy ears":
            draw.polygon(
                [
                    (ex - sign * rx * 0.35, cy - ry * 0.5),
                    (ex + sign * rx * 0.25, cy - ry * 1.6),
                    (ex + sign * rx * 0.35, cy - ry * 0.4),
                ],
                fill=fill,
                outline=OUTLINE,
                width=int(width),
            )
        elif ears == "round ears":
            er = rx * 0.35
            draw.ellipse(
                [ex - er, cy - ry - er * 0.8, ex + er, cy - ry + er * 1.2],
                fill=fill,
                outline=OUTLINE,
                width=int(width),
            )
        else:
            tip = (ex + sign * rx * 0.3, cy - ry * 1.7)
            draw.line([(ex, cy - ry * 0.6), tip], fill=OUTLINE, width=int(width))
            draw.ellipse(
                [tip[0] - width * 1.5, tip[1] - width * 1.5, tip[0] + width * 1.5, tip[1] + width * 1.5],
                fill=_jitter(COLOURS[eyes], rng),
            )
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill, outline=OUTLINE, width=int(width))
    eye_r = rx * rng.uniform(0.22, 0.3)
    for sign in (-1, 1):
        ex, ey = cx + sign * rx * 0.42, cy - ry * 0.15
        draw.ellipse(
            [ex - eye_r, ey - eye_r, ex + eye_r, ey + eye_r],
            fill=_jitter(COLOURS[eyes], rng),
            outline=OUTLINE,
            width=int(width),
        )
        draw.ellipse(
            [ex - eye_r * 0.35, ey - eye_r * 0.35, ex + eye_r * 0.35, ey + eye_r * 0.35], fill=OUTLINE
        )
    attributes = {"body": body, "eyes": eyes, "ears": ears, "paper": paper}
    caption = f"a drawing of a {body} creature with {eyes} eyes and {ears}"
    return Sample(_finish(image), caption, attributes)


def draw_subject_sample(seed: int) -> Sample:
    """The one subject DreamBooth learns: an orange star with a purple dot, in varied pose, scale, place."""
    rng = random.Random(seed)
    background = rng.choice(list(BACKGROUNDS))
    image, draw, side = _canvas(_jitter(BACKGROUNDS[background], rng, 8))
    r = side * rng.uniform(0.25, 0.38)
    cx, cy = side * rng.uniform(0.4, 0.6), side * rng.uniform(0.4, 0.6)
    angle = rng.uniform(-0.6, 0.6)
    _draw_shape(draw, "star", cx, cy, r, _jitter(SUBJECT_BODY, rng, 6), angle)
    dot = r * 0.33
    draw.ellipse([cx - dot, cy - dot, cx + dot, cy + dot], fill=_jitter(SUBJECT_DOT, rng, 6))
    attributes = {"background": background, "angle": round(angle, 3), "radius": round(r / side, 3)}
    return Sample(_finish(image), f"a photo of a {SUBJECT_CLASS} on a {background} background", attributes)


DATASETS = {
    # name: (drawing function, number of images, first seed)
    "shapes": (draw_shape_sample, 1200, 0),
    "creatures": (draw_creature_sample, 300, 10_000),
    "subject": (draw_subject_sample, 6, 20_000),
}


def vocabulary() -> list[str]:
    """Every word the course's captions use: the tiny tokenizer learns one token for each."""
    words = set(EXTRA_WORDS) | set(COLOURS) | set(BACKGROUNDS) | set(SHAPES) | set(SIZES) | set(POSITIONS)
    words |= set(PASTELS) | {"shape", "background", "creature", "eyes", "ears", "pointy", "round", "antennae"}
    return sorted(words)


def write_imagefolder(name: str, root: Path | str) -> Path:
    """Write data set `name` as a `datasets` imagefolder: PNGs plus metadata.jsonl (file_name, text)."""
    draw, count, first_seed = DATASETS[name]
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        sample = draw(first_seed + i)
        file_name = f"{i:04d}.png"
        sample.image.save(folder / file_name, optimize=True)
        lines.append(json.dumps({"file_name": file_name, "text": sample.caption, **sample.attributes}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the course's synthetic data sets as imagefolders.")
    parser.add_argument("--out", default="data", help="folder that receives one subfolder per data set")
    parser.add_argument("names", nargs="*", default=list(DATASETS), help=f"any of {list(DATASETS)}")
    args = parser.parse_args(argv)
    for name in args.names:
        print(write_imagefolder(name, args.out))


if __name__ == "__main__":
    main()
