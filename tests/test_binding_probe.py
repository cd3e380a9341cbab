"""scripts/binding_probe.py: the pictures it fits, read back at the ceiling, and a probe that trains."""

import math

import torch
from conftest import load_script

from lora_nb.course.evaluate import body_colour, dot_count
from lora_nb.course.tiny import load_tiny_pipeline
from lora_nb.data import tokenize


def test_the_pictures_are_large_bodies_with_two_dots_named_in_full_and_the_held_out_pairs_never_trained():
    probe = load_script("binding_probe")
    samples, held_out = probe.two_dot_pictures(256), probe.two_dot_pictures(24, held_out=True)
    assert (len(samples), len(held_out)) == (256, 24)

    def pairs(pictures):
        return {
            (p.attributes["objects"][0]["colour"], p.attributes["objects"][0]["mark_colour"])
            for p in pictures
        }

    assert pairs(held_out) <= probe.HELD_OUT_PAIRS and not pairs(samples) & probe.HELD_OUT_PAIRS
    for sample in samples + held_out:
        obj = sample.attributes["objects"][0]
        assert (obj["shape"] in ("circle", "square")) and (obj["size"], obj["mark"]) == ("large", "two dots")
        assert f"a large {obj['colour']} {obj['shape']} with two {obj['mark_colour']} dots" in sample.caption
        # the read-back's ceiling: the pictures themselves show what their captions name
        assert body_colour(sample.image) == obj["colour"] and dot_count(sample.image, obj["mark_colour"]) == 2


def test_the_probe_trains_the_model_and_reads_back_at_each_row():
    probe = load_script("binding_probe")
    pipe = load_tiny_pipeline()
    before = [
        p.detach().clone()
        for p in (pipe.unet.conv_out.weight, pipe.text_encoder.get_input_embeddings().weight)
    ]
    samples = probe.two_dot_pictures(4)
    reading = {"trained on": samples[:2], "held out": probe.two_dot_pictures(2, held_out=True)}
    rows = probe.probe(pipe, samples, steps=2, every=1, lr=1e-3, reading=reading, batch_size=2)
    assert [step for step, _, _ in rows] == [0, 1, 2]
    assert math.isnan(rows[0][1]) and all(math.isfinite(loss) for _, loss, _ in rows[1:])
    for shares in (read[name] for _, _, read in rows for name in reading):
        assert list(shares) == list(probe.READ_BACK)
        assert all(share in (0.0, 0.5, 1.0) for share in shares.values())  # of two samples read
        body, coloured, two_dots = shares.values()
        assert body >= coloured >= two_dots  # each criterion asks for the one before it and more
    after = (pipe.unet.conv_out.weight, pipe.text_encoder.get_input_embeddings().weight)
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))  # both models trained


def test_a_changed_pair_differs_in_the_one_colour_only():
    probe = load_script("binding_probe")
    sample = probe.two_dot_pictures(1)[0]
    obj = sample.attributes["objects"][0]
    (image, caption), (changed, changed_caption) = probe.changed_pair(sample, "mark_colour", 0)
    other = changed_caption.split(" with two ")[1].split(" dots")[0]
    assert other not in (obj["colour"], obj["mark_colour"])
    assert caption.replace(f"two {obj['mark_colour']} dots", f"two {other} dots") == changed_caption
    assert body_colour(image) == body_colour(changed) == obj["colour"]
    assert dot_count(image, obj["mark_colour"]) == 2 and dot_count(changed, other) == 2


def test_caption_follow_is_zero_for_a_unet_that_does_not_read_the_text_and_positive_for_the_model():
    probe = load_script("binding_probe")
    pipe, samples = load_tiny_pipeline(), probe.two_dot_pictures(6)
    follow = probe.caption_follow(pipe, samples, "colour")
    assert list(follow) == list(probe.FOLLOW_TIMESTEPS)
    exact, anywhere = follow[999]
    assert exact > 0.2 and anywhere > 0.5  # from pure noise, the caption's body colour is where it goes
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2"):
            module.to_v.weight.data.zero_()  # every text token now gives the same (zero) value
    for key in ("colour", "mark_colour"):
        for exact, anywhere in probe.caption_follow(pipe, samples, key).values():
            assert abs(exact) < 1e-5 and abs(anywhere) < 1e-5


def test_the_probe_keeps_training_the_empty_caption_that_guidance_extrapolates_from():
    probe = load_script("binding_probe")
    pipe = load_tiny_pipeline()
    batches, encode = [], pipe.text_encoder.forward

    def recording(input_ids, *args, **kwargs):
        if len(input_ids) == 64:  # the training batch, not the sampler's prompts
            batches.append(input_ids.clone())
        return encode(input_ids, *args, **kwargs)

    pipe.text_encoder.forward = recording
    samples = probe.two_dot_pictures(4)
    probe.probe(pipe, samples, steps=1, every=1, lr=1e-3, reading={"trained on": samples[:1]}, batch_size=64)
    empty = tokenize(pipe.tokenizer, [""])[0]
    dropped = sum(torch.equal(ids, empty) for ids in batches[0])
    assert len(batches) == 1 and 0 < dropped < 20  # about EMPTY_CAPTION_RATE of 64
