"""The 64 px world: pretraining shows the parts, never what the course's adapters are there to teach."""

import hashlib
import json
import random

import pytest

from lora_nb.course.tiny import TINY_SD_PATH, build_tokenizer
from lora_nb.course.world import (
    ATTACHMENTS,
    CREATURE_WORDS,
    DATASETS,
    IMAGE_SIZE,
    PRETRAINING_FIRST_SEED,
    RESERVED_IDENTIFIERS,
    SUBJECT_BODY,
    SUBJECT_CLASS,
    SUBJECT_DOT,
    draw_creature_sample,
    draw_parts_sample,
    draw_subject_sample,
    parts_caption,
    vocabulary,
    write_imagefolder,
)

PRETRAINING_SEEDS = range(PRETRAINING_FIRST_SEED, PRETRAINING_FIRST_SEED + 2000)  # the pool's first draws
DATA = TINY_SD_PATH.parent


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


@pytest.mark.parametrize("name", list(DATASETS))
def test_shipped_sets_are_what_the_script_writes(name, tmp_path):
    folder = write_imagefolder(name, tmp_path)
    shipped = DATA / name
    assert (folder / "metadata.jsonl").read_text() == (shipped / "metadata.jsonl").read_text()
    for line in (shipped / "metadata.jsonl").read_text().splitlines()[:40]:
        file_name = json.loads(line)["file_name"]
        assert (folder / file_name).read_bytes() == (shipped / file_name).read_bytes(), file_name
    assert sorted(p.name for p in shipped.iterdir()) == sorted(p.name for p in folder.iterdir())


def test_shipped_sets_are_held_out_of_pretraining():
    for name, (_, count, first_seed) in DATASETS.items():
        assert first_seed + count <= PRETRAINING_FIRST_SEED, name
    assert 5 <= DATASETS["subject"][1] <= 8  # DreamBooth's few photos


def test_the_nonsquare_set_is_landscape_and_portrait_with_both_bodies_inside():
    from lora_nb.course.evaluate import colour_mask
    from lora_nb.course.world import draw_nonsquare_sample
    from lora_nb.data import bucket_sizes, nearest_bucket

    _, count, first_seed = DATASETS["nonsquare"]
    samples = [draw_nonsquare_sample(first_seed + i) for i in range(count)]
    sizes = {s.image.size for s in samples}
    assert sizes == {(IMAGE_SIZE * 3 // 2, IMAGE_SIZE), (IMAGE_SIZE, IMAGE_SIZE * 3 // 2)}
    buckets = bucket_sizes(IMAGE_SIZE, 16)
    assert {nearest_bucket(*size, buckets) for size in sizes} == {(80, 48), (48, 80)}  # not the square one
    for s in samples:
        width, height = s.image.size
        for obj in s.attributes["objects"]:
            ys, xs = colour_mask(s.image, obj["colour"]).nonzero()
            assert len(xs) and xs.min() > 0 and ys.min() > 0, s.caption  # the whole body on the sheet
            assert xs.max() < width - 1 and ys.max() < height - 1, s.caption
