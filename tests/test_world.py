"""The 64 px world: pretraining shows the parts, never what the course's adapters are there to teach."""

import hashlib
import random

import pytest

from lora_nb.course.tiny import build_tokenizer
from lora_nb.course.world import (
    ATTACHMENTS,
    CREATURE_WORDS,
    IMAGE_SIZE,
    RESERVED_IDENTIFIERS,
    SUBJECT_BODY,
    SUBJECT_CLASS,
    SUBJECT_DOT,
    draw_creature_sample,
    draw_parts_sample,
    draw_subject_sample,
    parts_caption,
    vocabulary,
)

PRETRAINING_SEEDS = range(1_000_000, 1_002_000)  # the pretraining pool's first seeds


def digest(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def pretraining_samples():
    return [draw_parts_sample(seed) for seed in PRETRAINING_SEEDS]


@pytest.fixture(scope="module")
def pretraining_captions(pretraining_samples):
    rng = random.Random(0)
    return [parts_caption(s.attributes, rng) for s in pretraining_samples for _ in range(3)]


def test_every_image_is_a_pure_function_of_its_seed():
    for draw in (draw_parts_sample, draw_creature_sample, draw_subject_sample):
        a, b = draw(123), draw(123)
        assert digest(a.image) == digest(b.image) and a.caption == b.caption
        assert digest(draw(124).image) != digest(a.image)
        assert a.image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_pretraining_never_draws_the_dreambooth_subject(pretraining_samples):
    objects = [obj for s in pretraining_samples for obj in s.attributes["objects"]]
    orange_stars = [o for o in objects if o["shape"] == SUBJECT_CLASS and o["colour"] == SUBJECT_BODY]
    assert len(orange_stars) > 20  # orange stars are drawn ...
    assert all(
        not (o["mark"] and o["mark_colour"] == SUBJECT_DOT) for o in orange_stars
    )  # ... never purple-dotted
    assert any(
        o["mark"] and o["mark_colour"] == SUBJECT_DOT for o in objects
    )  # purple dots are drawn elsewhere


def test_pretraining_captions_never_speak_the_creatures_language(pretraining_captions):
    words = {w for c in pretraining_captions for w in c.split()}
    assert not words & set(CREATURE_WORDS)
    assert not words & set(RESERVED_IDENTIFIERS)
    assert "ears" in words and "antennae" in words  # the parts are named; the composition is not
    assert all(w in draw_creature_sample(0).caption for w in ("drawing", "creature", "eyes"))


def test_captions_are_well_formed_and_name_every_attachment(pretraining_samples, pretraining_captions):
    assert all(c.startswith(("a ", "an ")) and "  " not in c for c in pretraining_captions)
    assert not any(f"a {v}" in c.split(" ", 1)[1] for c in pretraining_captions for v in "aeiou" if " " in c)
    rng = random.Random(1)
    for sample in pretraining_samples[:300]:
        attachments = [o["attachment"] for o in sample.attributes["objects"] if o["attachment"]]
        caption = parts_caption(sample.attributes, rng)
        assert all(a in caption for a in attachments), caption
        assert not any(a in caption for a in ATTACHMENTS if a not in attachments), caption


def test_caption_dropout_gives_short_and_full_prompts(pretraining_samples):
    rng = random.Random(0)
    attributes = pretraining_samples[0].attributes
    captions = {parts_caption(attributes, rng) for _ in range(300)}
    full = parts_caption(attributes)
    assert full in captions or len(captions) > 20
    assert min(map(len, captions)) < len(full) * 0.6


def test_the_tokenizer_has_one_token_per_caption_word(pretraining_samples):
    tokenizer = build_tokenizer(vocabulary())
    captions = [parts_caption(s.attributes) for s in pretraining_samples[:500]]  # full, without rare words
    captions += [draw_creature_sample(i).caption for i in range(50)] + [draw_subject_sample(0).caption]
    words = {w.strip(",") for c in captions for w in c.split()}
    assert len(words) > 40
    assert {w: tokenizer.tokenize(w) for w in words} == {w: [w + "</w>"] for w in words}
    assert len(tokenizer.tokenize("sks")) > 1  # a rare identifier falls back to pieces, as in SD 1.5
