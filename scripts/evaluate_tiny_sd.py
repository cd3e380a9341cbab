"""Measure the embedded tiny SD: prompt following per skill, creatures not yet known, what the text encoding
carries, VAE PSNR, a sample grid.

    python scripts/evaluate_tiny_sd.py --model data/tiny-sd --grid outputs/tiny-sd-samples.png --card

Prints markdown tables; `--card` also writes them into the model's README.md (its "## Measured" section).
Every figure is at SD's default guidance 7.5 unless `--guidance` says otherwise, with 25 DPM-Solver steps
and fixed seeds, so it is repeatable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_nb.course.evaluate import (
    has_creature_colours,
    mean_style,
    prompt_following,
    prompt_suite,
    reconstruction_error,
    text_sensitivity,
)
from lora_nb.course.tiny import TINY_SD_PATH, load_tiny_pipeline
from lora_nb.course.viz import image_grid, save_figure
from lora_nb.course.world import COLOURS, SHAPES, draw_creature_sample, draw_parts_sample, draw_subject_sample

HELD_OUT_SEEDS = range(50_000, 50_200)  # never in the pretraining pool
CREATURES = TINY_SD_PATH.parent / "creatures"
SENSITIVITY_OBJECTS = 24


def following_table(pipe, per_case: int, guidance: float) -> str:
    cases = prompt_suite(per_case=per_case)
    following = prompt_following(pipe, cases, guidance_scale=guidance)
    rows = [
        f"| {skill} | {sum(c.skill == skill for c in cases)} | {share:.0%} |"
        for skill, share in following.items()
    ]
    return "\n".join([f"| skill | prompts | followed (guidance {guidance}) |", "| --- | --- | --- |", *rows])


def creatures_table(pipe, guidance: float, count: int = 30) -> str:
    """From the creatures' own captions the base must not draw them yet: that is what 03's LoRA teaches."""
    lines = (CREATURES / "metadata.jsonl").read_text().splitlines()[-count:]  # 03 holds these out
    records = [json.loads(line) for line in lines]
    images = pipe(
        [r["text"] for r in records],
        num_inference_steps=25,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
    ).images
    originals = [Image.open(CREATURES / r["file_name"]) for r in records]

    def colours(images) -> float:  # the evaluator's reading, on the originals too: not taken on trust
        return np.mean(
            [has_creature_colours(im, r["body"], r["eyes"]) for im, r in zip(images, records, strict=True)]
        )

    training, sampled = mean_style(originals), mean_style(images)
    return "\n".join(
        [
            (
                "| from the creatures' captions | body + two eyes of the named colours | outline share "
                "| paper luma |"
            ),
            "| --- | --- | --- | --- |",
            (
                f"| the creatures themselves ({count}) | {colours(originals):.0%} "
                f"| {training['outline']:.3f} | {training['background_luma']:.0f} |"
            ),
            (
                f"| this base model, guidance {guidance} | {colours(images):.0%} | {sampled['outline']:.3f} "
                f"| {sampled['background_luma']:.0f} |"
            ),
        ]
    )


def vae_table(vae) -> str:
    rows = []
    for name, draw in (
        ("parts", draw_parts_sample),
        ("creatures", draw_creature_sample),
        ("subject", draw_subject_sample),
    ):
        error = reconstruction_error(vae, [draw(seed).image for seed in HELD_OUT_SEEDS])
        rows.append(f"| {name} ({len(HELD_OUT_SEEDS)}) | {error['mse']:.5f} | {error['psnr']:.1f} dB |")
    return "\n".join(["| images | VAE MSE (pixels in [0, 1]) | PSNR |", "| --- | --- | --- |", *rows])


def text_table(pipe, count: int) -> str:
    """Which words the text encoding carries: a skill whose words barely move it is hard to learn."""
    rows = [
        f"| {name} | {padding:.1%} | {whole:.1%} |"
        for name, (padding, whole) in text_sensitivity(pipe, count=count).items()
    ]
    return "\n".join(
        [
            "| changed in the caption | padding after the prompt moves | all 77 positions move |",
            "| --- | --- | --- |",
            *rows,
        ]
    )


def write_card_section(model: Path, text: str) -> None:
    card = model / "README.md"
    body = card.read_text().split("\n## Measured\n")[0].rstrip("\n")
    card.write_text(f"{body}\n\n## Measured\n\n{text}\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=TINY_SD_PATH)
    parser.add_argument("--per-case", type=int, default=12, help="prompts per case of the suite")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--grid", type=Path, default=Path("outputs/tiny-sd-samples.png"))
    parser.add_argument("--card", action="store_true", help="write the tables into the model card")
    args = parser.parse_args()

    pipe = load_tiny_pipeline(args.model)
    tables = [
        (
            "Prompt following (`lora_nb.course.evaluate.prompt_suite`: plain prompts, each read back from "
            "the image):"
        ),
        following_table(pipe, args.per_case, args.guidance),
        "Not yet a creature drawer (the style notebook 03 teaches):",
        creatures_table(pipe, args.guidance),
        (
            "What the text encoder carries (`lora_nb.course.evaluate.text_sensitivity`: one attribute "
            f"changed in the full caption of {SENSITIVITY_OBJECTS} objects with every part; the relative "
            "change of the encoding):"
        ),
        text_table(pipe, SENSITIVITY_OBJECTS),
        f"VAE reconstruction on {len(HELD_OUT_SEEDS)} held-out draws of each world:",
        vae_table(pipe.vae),
    ]
    text = "\n\n".join(tables)
    print(text)
    if args.card:
        write_card_section(args.model, text)

    prompts = [f"a large {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    images = pipe(
        prompts,
        num_inference_steps=25,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(0),
    ).images
    save_figure(
        image_grid(images, prompts, ncols=len(SHAPES), title=f"{args.model.name}, seed 0"),
        args.grid.parent,
        args.grid.name,
    )
    print(f"\nsample grid: {args.grid}")


if __name__ == "__main__":
    main()
