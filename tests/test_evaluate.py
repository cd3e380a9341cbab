"""The course's measures read the world's drawings back: the ceiling any model's score is held to."""

import numpy as np
import pytest
import torch
from conftest import MAX_TOKENS

from lora_nb.course.evaluate import (
    body_colour,
    colour_mask,
    dot_count,
    fill_holes,
    follows,
    has_creature_colours,
    outline_share,
    paper_of,
    position_of,
    prompt_suite,
    shape_of,
    shows_plain,
    shows_subject,
)
from lora_nb.course.world import (
    DATASETS,
    draw_creature_sample,
    draw_parts_sample,
    draw_subject_sample,
    render_parts,
)

SEEDS = range(7000, 7300)


@pytest.fixture(scope="module")
def single_objects():
    samples = [draw_parts_sample(seed, count=1, attachment=None) for seed in SEEDS]
    return [(s.image, s.attributes["objects"][0]) for s in samples]


def share(hits) -> float:
    hits = list(hits)
    assert len(hits) >= 20  # enough cases for the share to mean something
    return float(np.mean(hits))


def test_shape_colour_and_position_are_read_back(single_objects):
    assert share(shape_of(im) == o["shape"] for im, o in single_objects) >= 0.98
    assert share(body_colour(im) == o["colour"] for im, o in single_objects) >= 0.97
    assert (
        share(position_of(colour_mask(im, o["colour"])) == o["position"] for im, o in single_objects) >= 0.98
    )


def test_the_paper_is_read_back(single_objects):
    samples = [draw_parts_sample(seed) for seed in SEEDS] + [draw_subject_sample(seed) for seed in SEEDS[:30]]
    assert all(paper_of(s.image) == s.attributes["paper"] for s in samples)


def test_dots_are_counted(single_objects):
    for mark, count in (("a dot", 1), ("two dots", 2)):
        cases = [(im, o) for im, o in single_objects if o["mark"] == mark]
        assert share(dot_count(im, o["mark_colour"]) == count for im, o in cases) >= 0.85, mark
    far_from_yellow = {"red", "blue", "purple", "black", "white"}
    plain = [
        im
        for im, o in single_objects
        if o["mark"] is None
        and o["colour"] in far_from_yellow
        and (o["outline"] is None or o["outline_colour"] in far_from_yellow)
    ]
    assert share(dot_count(im, "yellow") == 0 for im in plain) >= 0.95


def test_a_thick_dark_outline_is_told_from_none(single_objects):
    thick = [
        outline_share(im, o["colour"])
        for im, o in single_objects
        if o["outline"] == "thick" and o["outline_colour"] == "black"
    ]
    none = [outline_share(im, o["colour"]) for im, o in single_objects if o["outline"] is None]
    assert share(s > 0.5 for s in thick) >= 0.85
    assert share(s < 0.5 for s in none) >= 0.85


def test_two_objects_are_found_on_their_sides():
    cases = [draw_parts_sample(seed, count=2).attributes for seed in range(9000, 9150)]
    images = [draw_parts_sample(seed, count=2).image for seed in range(9000, 9150)]
    found = [
        all(position_of(colour_mask(im, o["colour"])) == o["position"] for o in a["objects"])
        for im, a in zip(images, cases, strict=True)
        if a["objects"][0]["colour"] != a["objects"][1]["colour"]
    ]
    assert share(found) >= 0.9


def test_fill_holes_fills_a_ring_and_keeps_an_open_cup():
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False
    assert fill_holes(ring)[4, 4] and fill_holes(ring).sum() == 25
    cup = ring.copy()
    cup[2, 4] = False  # an opening to the outside: nothing enclosed
    assert not fill_holes(cup)[4, 4]


def test_the_prompt_suite_is_passed_by_the_world_itself_and_failed_by_a_blank():
    import random

    from PIL import Image

    cases = prompt_suite(per_case=4)
    skills = {c.skill for c in cases}
    expected = {"shape", "position (left)", "position (bottom)", "two objects", "colour (small)"}
    expected |= {"outline", "two dots", "parts"}
    assert expected <= skills
    drawn = [follows(c, render_parts(c.attributes, random.Random(i))) for i, c in enumerate(cases)]
    assert share(drawn) >= 0.95
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    assert share(follows(c, blank) for c in cases) == 0.0
    assert all(c.prompt.startswith(("a ", "an ")) for c in cases)
    assert any("on a gray background" in c.prompt for c in cases)


def test_a_creatures_body_and_eye_colours_are_read_back():
    creatures = [
        draw_creature_sample(seed).attributes | {"image": draw_creature_sample(seed).image}
        for seed in range(10_000, 10_150)
    ]
    assert share(has_creature_colours(c["image"], c["body"], c["eyes"]) for c in creatures) >= 0.95
    assert share(has_creature_colours(c["image"], c["eyes"], c["body"]) for c in creatures) <= 0.05


def test_the_subject_is_told_from_a_plain_star_and_from_near_misses():
    _, count, first_seed = DATASETS["subject"]
    assert all(shows_subject(draw_subject_sample(first_seed + i).image) for i in range(count))
    assert all(shows_subject(draw_subject_sample(seed).image) for seed in range(500, 530))
    star = {"shape": "star", "colour": "orange", "size": "large", "position": "center", "outline": None}
    star |= {"outline_colour": "black", "mark": "a dot", "mark_colour": "purple", "attachment": None}
    rng = np.random.default_rng(0)

    def image(**change):
        import random

        return render_parts(
            {"paper": "white", "objects": [{**star, **change}]}, random.Random(int(rng.integers(99)))
        )

    assert shows_subject(image())  # the subject's parts, drawn by the parts renderer
    for near_miss in ({"mark": None}, {"mark_colour": "green"}, {"colour": "yellow"}, {"shape": "circle"}):
        assert not shows_subject(image(**near_miss)), near_miss
    assert shows_plain(image(mark=None)) and shows_plain(image(colour="blue")) and not shows_plain(image())
    assert not shows_plain(image(shape="square", mark=None))


def test_the_subject_is_read_through_smudges_on_dark_paper():
    """Generated pictures of the subject on black paper have dark-blue smudges beside the star; the star's
    shape is read from its own colour, so they do not turn it into a square."""
    from PIL import ImageDraw

    subjects = map(draw_subject_sample, range(20_000, 20_006))
    on_black = [s for s in subjects if s.attributes["paper"] == "black"]
    assert on_black
    for sample in on_black:
        smudged = sample.image.copy()
        draw = ImageDraw.Draw(smudged)
        for x, y in ((12, 14), (50, 46), (14, 48)):
            draw.ellipse([x - 5, y - 4, x + 5, y + 4], fill=(30, 30, 110))
        assert shape_of(smudged) != "star"  # the whole foreground is no longer a star's outline
        assert shows_subject(smudged)


def test_magnitude_and_direction_read_a_scaling_and_a_rotation_apart():
    from torch import nn

    from lora_nb import inject_lora
    from lora_nb.course.evaluate import magnitude_and_direction

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    inject_lora(model, ["0", "1"], rank=8, alpha=8)
    first, second = model[0], model[1]
    with torch.no_grad():  # B A = 0.5 W: the same directions, 1.5 times longer
        first.lora_A.weight.copy_(torch.eye(8))
        first.lora_B.weight.copy_(0.5 * first.base.weight)
        rotation = torch.linalg.qr(torch.randn(8, 8))[0]  # B A = W R - W: the same lengths, turned
        second.lora_A.weight.copy_(rotation.T - torch.eye(8))
        second.lora_B.weight.copy_(second.base.weight)
    changes = magnitude_and_direction(model)
    assert changes["0"][0] == pytest.approx(0.5, abs=1e-5) and changes["0"][1] == pytest.approx(0, abs=1e-5)
    assert changes["1"][0] == pytest.approx(0, abs=1e-5) and changes["1"][1] > 0.1
    first.merge()
    with pytest.raises(ValueError, match="0 is merged"):
        magnitude_and_direction(model)


class PositionWiseEncoder(torch.nn.Module):
    """A text encoder without attention: each position's output depends on its own token only."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)
        self.device = torch.device("cpu")

    def forward(self, ids):
        return (self.embed(ids),)


def test_encoding_change_compares_the_padding_past_both_prompts(tokenizer):
    from types import SimpleNamespace

    from lora_nb.course.evaluate import encoding_change

    torch.manual_seed(0)
    pipe = SimpleNamespace(tokenizer=tokenizer, text_encoder=PositionWiseEncoder(len(tokenizer)))
    assert encoding_change(pipe, "ab c", "ab c") == (0.0, 0.0)
    # "de" lies past the shorter prompt's end token: its padding starts after the longer one's
    padding, whole = encoding_change(pipe, "ab c", "ab cde")
    assert padding == 0.0 and whole > 0  # no attention: the padding cannot know the prompt
    with pytest.raises(ValueError, match=f"fills all {MAX_TOKENS} text positions"):
        encoding_change(pipe, "a" * MAX_TOKENS, "b")


def test_text_sensitivity_changes_each_attribute_in_the_caption():
    from lora_nb.course.evaluate import SENSITIVITY_CHANGES, text_sensitivity
    from lora_nb.course.tiny import load_tiny_pipeline

    changes = text_sensitivity(load_tiny_pipeline(), count=3)
    assert list(changes) == list(SENSITIVITY_CHANGES)
    for name, (padding, whole) in changes.items():  # causal attention: every word reaches the padding
        assert padding > 0 and whole > 0, name
