"""scripts/binding_probe.py: the pictures it fits, read back at the ceiling, and a probe that trains."""

import math

import torch
from conftest import load_script

from lora_nb.course.evaluate import body_colour, dot_count
from lora_nb.course.tiny import load_tiny_pipeline


def test_the_pictures_are_large_bodies_with_two_dots_named_in_full():
    samples = load_script("binding_probe").two_dot_pictures(24)
    assert len(samples) == 24
    for sample in samples:
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
    rows = probe.probe(pipe, probe.two_dot_pictures(4), steps=2, every=1, lr=1e-3, read=2, batch_size=2)
    assert [step for step, _, _ in rows] == [0, 1, 2]
    assert math.isnan(rows[0][1]) and all(math.isfinite(loss) for _, loss, _ in rows[1:])
    assert all(share in (0.0, 0.5, 1.0) for _, _, share in rows)  # of two samples read
    after = (pipe.unet.conv_out.weight, pipe.text_encoder.get_input_embeddings().weight)
    assert all(not torch.equal(b, a) for b, a in zip(before, after, strict=True))  # both models trained
