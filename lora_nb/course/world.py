"""The embedded world at 64 px: a pretraining vocabulary of parts, and what only the LoRAs teach.

Stable Diffusion 1.5 could already draw cartoon animals when the blog's LoRA re-styled it. The tiny world
keeps that relation. Pretraining (`draw_parts_sample`) shows the *parts* in plain descriptive captions:
bodies of four shapes, outlines of two widths and several colours, one or two dots inside a body, stripes,
ears / antennae / horns, seven papers (pastels among them), one or two objects at named places and sizes.
Held out of pretraining, and taught by the course's adapters:
- the creatures' composition and caption language ("a drawing of a blue creature with red eyes and round
  ears": a centred outlined body, two eyes with pupils, on pastel paper);
- the DreamBooth subject, one orange star with a purple dot.
`tests/test_world.py` keeps both out of the pretraining captions and images.

Every image is a pure function of its seed, drawn at 4x and box-downsampled for anti-aliased edges, so
a data set is a pure function of (kind, count, first seed): `python -m lora_nb.course.world --out data`
writes the shipped sets again bit for bit.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

COLOURS = {  # the words for colour, and the palette the evaluator classifies against
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
}
PAPERS = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "pink": (250, 215, 225),
    "cream": (250, 240, 205),
    "mint": (210, 245, 225),
    "sky": (210, 230, 250),
}
PASTELS = ("pink", "cream", "mint", "sky")
OUTLINE_COLOURS = {"black": (30, 25, 35), "white": (245, 245, 245), **COLOURS}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.12, "medium": 0.18, "large": 0.25}  # radius as a fraction of the image side
POSITIONS = {
    "center": (0.0, 0.0),
    "left": (-0.22, 0.0),
    "right": (0.22, 0.0),
    "top": (0.0, -0.22),
    "bottom": (0.0, 0.22),
}
PAIRS = (("left", "right"), ("top", "bottom"))  # where two objects stand
OUTLINES = {"thin": 1.5, "thick": 3.0}  # width in final pixels
MARKS = ("a dot", "two dots", "stripes")
ATTACHMENTS = ("pointy ears", "round ears", "antennae", "horns")

# The DreamBooth subject, of the class "star"; pretraining never draws an orange star with a purple mark.
SUBJECT_CLASS = "star"
SUBJECT_BODY, SUBJECT_DOT = "orange", "purple"
CREATURE_WORDS = ("drawing", "creature", "eyes")  # the creatures' caption language: never in pretraining

# Rare made-up words in a few pretraining captions, as web captions have them, so that the character
# pieces a new identifier tokenises to have trained embeddings that the base model has learned to ignore.
RARE_WORD_RATE = 0.05
RESERVED_IDENTIFIERS = ("sks",)


@dataclass
class Sample:
    image: Image.Image
    caption: str
    attributes: dict


def article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def jitter(colour: tuple[int, int, int], rng: random.Random, amount: int = 12) -> tuple[int, ...]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)


def polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners, radius, turn = {
        "square": (4, [r * 1.2] * 4, math.pi / 4),
        "triangle": (3, [r * 1.3] * 3, -math.pi / 2),
        "star": (10, [r * 1.3, r * 0.6] * 5, -math.pi / 2),
    }[shape]
    return [
        (
            cx + radius[i] * math.cos(angle + turn + 2 * math.pi * i / corners),
            cy + radius[i] * math.sin(angle + turn + 2 * math.pi * i / corners),
        )
        for i in range(corners)
    ]


def draw_body(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple, fill, outline=None, width: int = 0, angle: float = 0.0
) -> None:
    """`box` is (cx, cy, rx, ry) in canvas pixels; polygons use rx."""
    cx, cy, rx, ry = box
    if shape == "circle":
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(polygon(shape, cx, cy, rx, angle), fill=fill, outline=outline, width=width)


def canvas(
    paper: tuple[int, ...], size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    """A sheet to draw on at SUPERSAMPLE x `size` (width, height); the third value is its shorter side."""
    image = Image.new("RGB", (size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE), paper)
    return image, ImageDraw.Draw(image), min(size) * SUPERSAMPLE


def finish(image: Image.Image) -> Image.Image:
    return image.resize((image.width // SUPERSAMPLE, image.height // SUPERSAMPLE), Image.Resampling.BOX)


# --- pretraining: the parts, in plain words ---------------------------------------------------------------


def random_object(rng: random.Random, position: str) -> dict:
    """One object's attributes; never the DreamBooth subject (an orange star with a purple mark)."""
    obj = {
        "shape": rng.choice(SHAPES),
        "colour": rng.choice(list(COLOURS)),
        "size": rng.choice(list(SIZES)),
        "position": position,
        "outline": rng.choice([None, None, "thin", "thick"]),
        "outline_colour": rng.choice(["black"] * 4 + list(OUTLINE_COLOURS)),
        "mark": rng.choice([None, None, *MARKS]),
        "mark_colour": rng.choice(list(COLOURS)),
        "attachment": rng.choice([None, None, None, *ATTACHMENTS]),
    }
    if obj["shape"] in ("triangle", "star"):
        obj["attachment"] = None  # ears on a pointed top read as more points
    while obj["outline_colour"] == obj["colour"]:
        obj["outline_colour"] = rng.choice(list(OUTLINE_COLOURS))
    while obj["mark_colour"] == obj["colour"] or (
        obj["shape"] == SUBJECT_CLASS and obj["colour"] == SUBJECT_BODY and obj["mark_colour"] == SUBJECT_DOT
    ):
        obj["mark_colour"] = rng.choice(list(COLOURS))
    if (obj["shape"], obj["size"]) in (("triangle", "small"), ("star", "small"), ("star", "medium")):
        obj["mark"] = None  # no room to see a mark inside a small pointed body
    return obj


def draw_attachment(draw, obj: dict, box: tuple, fill, outline, width: int, rng: random.Random) -> None:
    cx, cy, rx, ry = box
    top = cy - (ry * 0.9 if obj["shape"] == "circle" else rx * 0.8)  # circles and squares only
    for sign in (-1, 1):
        x = cx + sign * rx * 0.55
        if obj["attachment"] == "pointy ears":
            draw.polygon(
                [
                    (x - sign * rx * 0.3, top + ry * 0.35),
                    (x + sign * rx * 0.2, top - ry * 0.75),
                    (x + sign * rx * 0.35, top + ry * 0.3),
                ],
                fill=fill,
                outline=outline,
                width=width,
            )
        elif obj["attachment"] == "round ears":
            er = rx * 0.34
            draw.ellipse(
                [x - er, top - er * 1.2, x + er, top + er * 0.8], fill=fill, outline=outline, width=width
            )
        elif obj["attachment"] == "horns":
            draw.polygon(
                [
                    (x - rx * 0.12, top + ry * 0.2),
                    (x + sign * rx * 0.15, top - ry * 0.7),
                    (x + rx * 0.12, top + ry * 0.2),
                ],
                fill=(240, 235, 220),
                outline=outline or (90, 80, 70),
                width=max(width, 2),
            )
        else:  # antennae: a stalk and a ball
            tip = (x + sign * rx * 0.3, top - ry * 0.75)
            stalk = max(width, SUPERSAMPLE)
            draw.line([(x, top + ry * 0.3), tip], fill=outline or fill, width=stalk)
            ball = rx * 0.13 + stalk
            draw.ellipse([tip[0] - ball, tip[1] - ball, tip[0] + ball, tip[1] + ball], fill=outline or fill)


ROOM = {"circle": 0.8, "square": 0.8, "triangle": 0.5, "star": 0.45}  # free radius inside, as a share of r


def draw_marks(draw, obj: dict, box: tuple, outline, width: int, rng: random.Random) -> None:
    cx, cy, rx, ry = box
    colour = jitter(COLOURS[obj["mark_colour"]], rng)
    room = ROOM[obj["shape"]] * min(rx, ry)
    if obj["mark"] == "stripes":
        for k in (-1, 0, 1):
            y = cy + room * 0.55 * k
            draw.line(
                [(cx - room * 0.75, y), (cx + room * 0.75, y)],
                fill=colour,
                width=int(max(SUPERSAMPLE * 1.5, room * 0.15)),
            )
        return
    dot = room * rng.uniform(0.38, 0.46) if obj["mark"] == "a dot" else room * rng.uniform(0.24, 0.3)
    offsets = [0.0] if obj["mark"] == "a dot" else [-0.52, 0.52]
    dy = room * rng.uniform(-0.2, 0.1) if obj["shape"] in ("circle", "square") else 0.0
    for ox in offsets:
        x, y = cx + ox * room, cy + dy
        draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=colour, outline=outline, width=width // 2)


def draw_object(draw: ImageDraw.ImageDraw, frame: tuple[int, int], obj: dict, rng: random.Random) -> None:
    """Draw `obj` on a sheet of `frame` (width, height) canvas pixels: places along each side, sizes of the
    shorter one."""
    width, height = frame
    side = min(frame)
    scale = rng.uniform(0.9, 1.1)
    r = SIZES[obj["size"]] * scale
    reach = min(1.0, (0.47 - r * 1.3) / 0.22)  # large bodies stop short of the edge: the whole shape shows
    dx, dy = (reach * d + rng.uniform(-0.02, 0.02) for d in POSITIONS[obj["position"]])
    box = (
        width * (0.5 + dx),
        height * (0.5 + dy),
        side * r,
        side * r * (rng.uniform(0.85, 1.0) if obj["shape"] == "circle" else 1.0),
    )
    fill = jitter(COLOURS[obj["colour"]], rng)
    outline = jitter(OUTLINE_COLOURS[obj["outline_colour"]], rng, 6) if obj["outline"] else None
    thinner = 0.6 if obj["size"] == "small" else 1.0  # a small body would be all outline
    width = int(OUTLINES[obj["outline"]] * SUPERSAMPLE * thinner) if obj["outline"] else 0
    if obj["attachment"]:
        draw_attachment(draw, obj, box, fill, outline, width, rng)
    draw_body(draw, obj["shape"], box, fill, outline, width, angle=rng.uniform(-0.25, 0.25))
    if obj["mark"]:
        draw_marks(draw, obj, box, outline, width, rng)


def describe_object(obj: dict, keep) -> str:
    """'a large red circle with a thick black outline, two yellow dots and pointy ears on the left'."""
    words = []
    if keep(0.5):
        words.append(obj["size"])
    if keep(0.1):
        words.append(obj["colour"])
    words.append(obj["shape"] if keep(0.1) else "shape")
    words[0] = article(words[0])
    parts = []
    if obj["outline"] and keep(0.3):
        colour = f" {obj['outline_colour']}" if keep(0.3) else ""
        parts.append(f"{article(obj['outline'])}{colour} outline")
    if obj["mark"] and keep(0.2):
        mark = obj["mark"]
        if mark != "stripes" and keep(0.2):
            mark = (
                article(f"{obj['mark_colour']} dot") if mark == "a dot" else f"two {obj['mark_colour']} dots"
            )
        parts.append(mark)
    if obj["attachment"]:  # always named, so that a body gets ears only when a prompt asks for them
        parts.append(obj["attachment"])
    if parts:
        words.append("with " + (", ".join(parts[:-1]) + " and " if len(parts) > 1 else "") + parts[-1])
    if obj["position"] != "center" and keep(0.3):
        words.append(f"on the {obj['position']}")
    return " ".join(words)


def parts_caption(attributes: dict, rng: random.Random | None = None) -> str:
    """The caption of a parts image; with `rng`, parts are dropped at random (short prompts work too)."""
    keep = (lambda p: rng.random() >= p) if rng else (lambda p: True)
    caption = " and ".join(describe_object(obj, keep) for obj in attributes["objects"])
    if keep(0.5):
        caption += f" on a {attributes['paper']} background"
    if rng and rng.random() < RARE_WORD_RATE:
        rest = caption.split(" ", 1)[1]
        caption = f"a {rare_word(rng)} {rest}"
    return caption


def rare_word(rng: random.Random) -> str:
    while (word := "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randint(2, 4)))) in (
        RESERVED_IDENTIFIERS
    ):
        pass
    return word


def draw_parts_sample(seed: int, **fixed) -> Sample:
    """One pretraining image: one object (any attribute may be fixed), or two side by side (`count=2`)."""
    rng = random.Random(seed)
    count = fixed.pop("count", 1 if rng.random() < 0.7 else 2)
    paper = fixed.pop("paper", rng.choice(list(PAPERS)))
    if count == 1:
        objects = [random_object(rng, rng.choice(list(POSITIONS)))]
    else:
        objects = [random_object(rng, position) for position in rng.choice(PAIRS)]
        for obj in objects:
            obj["size"] = "medium" if obj["size"] == "large" else obj["size"]  # two large ones would overlap
    objects[0].update(fixed)
    attributes = {"paper": paper, "objects": objects}
    return Sample(render_parts(attributes, rng), parts_caption(attributes), attributes)


def render_parts(
    attributes: dict, rng: random.Random, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
) -> Image.Image:
    """The image of given attributes ({"paper": ..., "objects": [...]}); `rng` draws the jitter."""
    image, draw, _ = canvas(jitter(PAPERS[attributes["paper"]], rng, 6), size)
    for obj in attributes["objects"]:
        draw_object(draw, image.size, obj, rng)
    return finish(image)


def draw_nonsquare_sample(seed: int) -> Sample:
    """Two objects on a landscape (3:2, side by side) or portrait (2:3, one above the other) sheet: the
    set aspect-ratio bucketing is shown on, where a square crop would cut a body off."""
    rng = random.Random(seed)
    landscape = rng.random() < 0.5
    long = IMAGE_SIZE * 3 // 2
    size = (long, IMAGE_SIZE) if landscape else (IMAGE_SIZE, long)
    paper = rng.choice(list(PAPERS))
    objects = [random_object(rng, place) for place in PAIRS[0 if landscape else 1]]
    for obj in objects:
        obj["size"] = "medium" if obj["size"] == "large" else obj["size"]
    attributes = {"paper": paper, "objects": objects}
    return Sample(render_parts(attributes, rng, size), parts_caption(attributes), attributes)


# --- what the adapters teach ------------------------------------------------------------------------------


def draw_creature_sample(seed: int) -> Sample:
    """A pocket-monster-like creature: a centred outlined body, ears, two eyes with pupils, on pastel
    paper."""
    rng = random.Random(seed)
    body, eyes = rng.sample(list(COLOURS), 2)
    paper = rng.choice(PASTELS)
    ears = rng.choice(["pointy ears", "round ears", "antennae"])
    image, draw, side = canvas(jitter(PAPERS[paper], rng, 6))
    outline, width = OUTLINE_COLOURS["black"], int(OUTLINES["thick"] * SUPERSAMPLE)
    box = (
        side * rng.uniform(0.45, 0.55),
        side * rng.uniform(0.55, 0.62),
        side * rng.uniform(0.25, 0.31),
        side * rng.uniform(0.22, 0.27),
    )
    fill = jitter(COLOURS[body], rng)
    draw_attachment(draw, {"shape": "circle", "attachment": ears}, box, fill, outline, width, rng)
    draw_body(draw, "circle", box, fill, outline, width)
    cx, cy, rx, ry = box
    eye = rx * rng.uniform(0.3, 0.34)
    for sign in (-1, 1):
        x, y = cx + sign * rx * 0.42, cy - ry * 0.12
        draw.ellipse(
            [x - eye, y - eye, x + eye, y + eye],
            fill=jitter(COLOURS[eyes], rng),
            outline=outline,
            width=width // 2,
        )
        pupil = eye * 0.3
        draw.ellipse([x - pupil, y - pupil, x + pupil, y + pupil], fill=outline)
        glint = eye * 0.16
        draw.ellipse(
            [x + pupil * 0.2, y - pupil * 0.9, x + pupil * 0.2 + 2 * glint, y - pupil * 0.9 + 2 * glint],
            fill=(255, 255, 255),
        )
    mouth = [cx - rx * 0.18, cy + ry * 0.15, cx + rx * 0.18, cy + ry * 0.45]
    draw.arc(mouth, 20, 160, fill=outline, width=width // 2)
    caption = f"a drawing of {article(body)} creature with {eyes} eyes and {ears}"
    return Sample(finish(image), caption, {"body": body, "eyes": eyes, "ears": ears, "paper": paper})


def draw_subject_sample(seed: int) -> Sample:
    """The one subject DreamBooth learns: an orange star with a purple dot, in varied pose, scale, place."""
    rng = random.Random(seed)
    paper = rng.choice(["white", "black", "gray"])
    image, draw, side = canvas(jitter(PAPERS[paper], rng, 8))
    r = side * rng.uniform(0.24, 0.3)
    cx, cy = side * rng.uniform(0.42, 0.58), side * rng.uniform(0.42, 0.58)
    draw_body(
        draw, "star", (cx, cy, r, r), jitter(COLOURS[SUBJECT_BODY], rng, 6), angle=rng.uniform(-0.5, 0.5)
    )
    dot = r * 0.32
    draw.ellipse([cx - dot, cy - dot, cx + dot, cy + dot], fill=jitter(COLOURS[SUBJECT_DOT], rng, 6))
    attributes = {"paper": paper, "radius": round(r / side, 3)}
    return Sample(finish(image), f"a {SUBJECT_CLASS} on a {paper} background", attributes)


def vocabulary() -> list[str]:
    """Every word the course's captions and prompts use: the tiny tokenizer has one token for each."""
    words = {
        "a",
        "an",
        "and",
        "on",
        "the",
        "with",
        "of",
        "shape",
        "background",
        "outline",
        "dot",
        "dots",
        "two",
    }
    words |= set(COLOURS) | set(PAPERS) | set(SHAPES) | set(SIZES) | set(POSITIONS) | set(OUTLINES)
    words |= {w for name in (*MARKS, *ATTACHMENTS) for w in name.split()}
    words |= set(CREATURE_WORDS) | {"photo", "picture", "cartoon", "image", "toy", "big", "in"}
    return sorted(words)


# The pretraining pool is drawn from this seed on, so the shipped sets below stay held out of it.
PRETRAINING_FIRST_SEED = 1_000_000
DATASETS = {
    # name: (drawing function, number of images, first seed)
    "parts": (draw_parts_sample, 400, 0),
    "creatures": (draw_creature_sample, 300, 10_000),
    "subject": (draw_subject_sample, 6, 20_000),
    "nonsquare": (draw_nonsquare_sample, 24, 30_000),
}


def write_imagefolder(name: str, root: Path | str) -> Path:
    """Write data set `name` as a `datasets` imagefolder: PNGs plus metadata.jsonl (file_name, text, ...)."""
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
    parser = argparse.ArgumentParser(description="Write the course's data sets as imagefolders.")
    parser.add_argument("--out", default="data", help="folder that receives one subfolder per data set")
    parser.add_argument("names", nargs="*", default=list(DATASETS), help=f"any of {list(DATASETS)}")
    args = parser.parse_args(argv)
    for name in args.names:
        if name not in DATASETS:
            parser.error(f"unknown data set {name!r}: choose from {list(DATASETS)}")
        print(write_imagefolder(name, args.out))


if __name__ == "__main__":
    main()
