"""The synthetic worlds are pure functions of their seeds, and the shipped sets are what the script writes."""

import hashlib
import json

from lora_nb.course.evaluate import dominant_colour
from lora_nb.course.synthetic import (
    COLOURS,
    DATASETS,
    draw_creature_sample,
    draw_shape_sample,
    draw_subject_sample,
    shape_caption,
    write_imagefolder,
)
from lora_nb.course.tiny import TINY_SD_PATH

DATA = TINY_SD_PATH.parent


def digest(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def test_same_seed_same_image_and_caption():
    for draw in (draw_shape_sample, draw_creature_sample, draw_subject_sample):
        a, b = draw(123), draw(123)
        assert digest(a.image) == digest(b.image) and a.caption == b.caption
        assert digest(draw(124).image) != digest(a.image)


def test_shipped_sets_are_reproduced_by_the_script(tmp_path):
    for name in ("subject", "creatures"):
        folder = write_imagefolder(name, tmp_path)
        shipped = DATA / name
        assert (folder / "metadata.jsonl").read_text() == (shipped / "metadata.jsonl").read_text()
        for line in (shipped / "metadata.jsonl").read_text().splitlines()[:50]:
            file_name = json.loads(line)["file_name"]
            assert (folder / file_name).read_bytes() == (shipped / file_name).read_bytes(), file_name


def test_shipped_sets_have_the_documented_sizes():
    for name, (_, count, _) in DATASETS.items():
        lines = (DATA / name / "metadata.jsonl").read_text().splitlines()
        assert len(lines) == count
    assert 5 <= DATASETS["subject"][1] <= 8


def test_fixed_attributes_are_drawn_and_captioned():
    sample = draw_shape_sample(
        7, colour="red", shape="circle", position="left", background="white", size="small"
    )
    assert sample.caption == "a small red circle on the left on a white background"
    assert dominant_colour(sample.image) == "red"


def test_caption_dropout_keeps_the_sentence_well_formed():
    import random

    rng = random.Random(0)
    attributes = draw_shape_sample(1).attributes
    captions = {shape_caption(attributes, rng) for _ in range(200)}
    assert len(captions) > 4
    assert all(c.startswith("a ") and "  " not in c for c in captions)
    assert any(attributes["colour"] in c for c in captions) and any(
        attributes["colour"] not in c for c in captions
    )


def test_every_colour_is_recognised_on_every_background():
    for colour in COLOURS:
        for background in ("white", "black", "gray"):
            image = draw_shape_sample(3, colour=colour, background=background, size="large").image
            assert dominant_colour(image) == colour, (colour, background)
