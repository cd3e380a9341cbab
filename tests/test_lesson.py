"""The helpers the notebooks share: the trainer's precision rule for drawing, and the subject measures."""

import random

import pytest
import torch
from PIL import Image

from lora_nb.course.lesson import device_and_dtype, subject_counts, subject_measures, subject_table
from lora_nb.course.world import draw_subject_sample, render_parts

ORANGE, BLUE, RED = (255, 128, 0), (0, 0, 255), (255, 0, 0)


def square(colour, side=32):
    """A white image with a centred square of ``colour`` covering a quarter of it."""
    image = Image.new("RGB", (side, side), "white")
    image.paste(colour, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    return image


def on_machine(monkeypatch, capability=None):
    """Pretend to be a CPU-only machine (None) or one with a CUDA GPU of this compute capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: capability)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # the notebooks draw on the CPU


@pytest.mark.parametrize(
    ("setting", "dtype"),
    [("no", torch.float32), (None, torch.float32), ("auto", torch.float32), ("fp16", torch.float32)]
    + [("bf16", torch.bfloat16)],
)
def test_on_a_cpu_only_bf16_draws_in_reduced_precision(monkeypatch, setting, dtype):
    on_machine(monkeypatch)
    assert device_and_dtype(setting) == ("cpu", dtype)


@pytest.mark.parametrize(
    ("capability", "setting", "dtype"),
    [
        ((8, 0), "auto", torch.bfloat16),  # an A100 computes in bf16
        ((7, 5), "auto", torch.float16),  # a T4 does not: "auto" is fp16 there
        ((7, 5), "fp16", torch.float16),
        ((7, 5), "bf16", torch.bfloat16),
        ((8, 0), "no", torch.float32),
    ],
)
def test_on_a_gpu_auto_is_what_the_trainer_picks(monkeypatch, capability, setting, dtype):
    on_machine(monkeypatch, capability)
    assert device_and_dtype(setting) == ("cuda", dtype)


def test_an_unknown_precision_is_refused_with_the_trainers_message():
    with pytest.raises(ValueError, match=r"unknown --mixed_precision 'fp8': use no, fp16, bf16, auto"):
        device_and_dtype("fp8")


def test_subject_measures_fidelity_leakage_and_drift():
    instance = [square(ORANGE)] * 2
    samples = {
        "base": ([square(BLUE)] * 2, [square(BLUE)] * 2),
        "learned": ([square(ORANGE)] * 2, [square(RED), square(BLUE)]),
    }
    rows = subject_measures(samples, instance)
    assert rows["base"] == {"fidelity": 1.0, "leakage": 1.0, "drift": 0.0}
    assert rows["learned"]["fidelity"] == 0.0  # the subject's own colours
    assert rows["learned"]["leakage"] == 1.0  # red and blue share no colour with orange
    # one class image changed from blue to red on a quarter of its pixels: (255 + 0 + 255) / 3 / 255 / 4,
    # the other not at all
    assert rows["learned"]["drift"] == pytest.approx((2 / 3 / 4) / 2)


def test_subject_measures_need_the_baseline():
    with pytest.raises(ValueError, match="no 'base' in samples"):
        subject_measures({"learned": ([square(ORANGE)], [square(RED)])}, [square(ORANGE)])


def test_subject_counts_ask_each_prompts_images_their_own_question():
    subject = [draw_subject_sample(seed).image for seed in range(3)]
    star = {
        "shape": "star",
        "size": "large",
        "position": "center",
        "outline": None,
        "outline_colour": "black",
    }
    star |= {"mark": None, "mark_colour": "purple", "attachment": None}
    plain = [
        render_parts({"paper": "white", "objects": [star | {"colour": c}]}, random.Random(0))
        for c in ("blue", "orange")
    ]
    counts = subject_counts(
        {"learned": (subject, plain), "leaked": (subject, subject), "swapped": (plain, subject)}
    )
    # the subject prompt is asked for the subject, the class prompt for a star that is not the subject
    assert counts == {"learned": (3, 2), "leaked": (3, 0), "swapped": (0, 0)}


def test_subject_table_one_line_per_model_under_its_headers():
    rows = {
        "base": {"fidelity": 1.0, "leakage": 0.5, "drift": 0.0},
        "a long name": {"fidelity": 0.25, "leakage": 0.75, "drift": 0.125},
    }
    header, *lines = subject_table(rows).splitlines()
    assert header.split(" | ") == [
        "      model",
        "fidelity (lower: like the subject)",
        "leakage (higher: class kept)",
        "drift (lower: kept)",
    ]
    assert [line.split(" | ")[0] for line in lines] == ["       base", "a long name"]
    assert [float(v) for v in lines[1].split(" | ")[1:]] == [0.25, 0.75, 0.125]
    assert all(len(line) == len(header) for line in lines)  # the columns line up


def test_measure_checkpoints_measures_each_checkpoint_on_the_unchanged_base(tmp_path):
    from lora_nb.course.evaluate import HeldOut
    from lora_nb.course.lesson import measure_checkpoints
    from lora_nb.course.tiny import TINY_SD_PATH
    from lora_nb.data import load_captioned_dataset
    from lora_nb.formats import load_lora_weights
    from lora_nb.inference import load_base_pipeline
    from lora_nb.train import TrainConfig, train

    creatures = TINY_SD_PATH.parent / "creatures"
    settings = {"pretrained_model_name_or_path": str(TINY_SD_PATH), "dataset_name": str(creatures)}
    settings |= {"max_train_samples": 4, "train_batch_size": 2, "seed": 0, "show_progress": False}
    train(TrainConfig(**settings, max_train_steps=4, checkpointing_steps=2, output_dir=str(tmp_path / "run")))
    pipe = load_base_pipeline(TINY_SD_PATH)
    held = load_captioned_dataset(creatures).select(range(296, 300))
    held_out = HeldOut(pipe, held["image"], held["text"], repeats=1)
    base = held_out.loss(pipe)
    call = {"num_inference_steps": 2}
    rows = measure_checkpoints(pipe, tmp_path / "run", [held_out], ["a red circle"], final_step=4, **call)
    assert [r["step"] for r in rows] == [2, 4] and len(rows[0]["images"]) == 1
    assert rows[0]["losses"][0] != base != rows[1]["losses"][0]  # each adapter was on while measured
    assert held_out.loss(pipe) == base  # and taken off again
    # the same numbers as the final adapter measured on its own
    final = load_base_pipeline(TINY_SD_PATH)
    load_lora_weights(tmp_path / "run", unet=final.unet)
    assert held_out.loss(final) == pytest.approx(rows[1]["losses"][0], rel=1e-6)
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        measure_checkpoints(pipe, tmp_path, [held_out], ["a red circle"], **call)
