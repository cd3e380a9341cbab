"""Measure the embedded tiny SD: prompt following per skill, VAE reconstruction per world, a sample grid.

    python scripts/evaluate_tiny_sd.py --model data/tiny-sd --grid outputs/tiny-sd-samples.png

Prints markdown tables (paste them into the model card). Every figure is at SD's default guidance 7.5
unless `--guidance` says otherwise, with 25 DPM-Solver steps and fixed seeds, so it is repeatable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lora_nb.course.evaluate import prompt_following, prompt_suite, reconstruction_error
from lora_nb.course.tiny import TINY_SD_PATH, load_tiny_pipeline
from lora_nb.course.viz import image_grid, save_figure
from lora_nb.course.world import COLOURS, SHAPES, draw_creature_sample, draw_parts_sample, draw_subject_sample

HELD_OUT_SEEDS = range(50_000, 50_200)  # never in the pretraining pool


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=TINY_SD_PATH)
    parser.add_argument("--per-case", type=int, default=6, help="prompts per case of the suite")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--grid", type=Path, default=Path("outputs/tiny-sd-samples.png"))
    args = parser.parse_args()

    pipe = load_tiny_pipeline(args.model)
    cases = prompt_suite(per_case=args.per_case)
    following = prompt_following(pipe, cases, guidance_scale=args.guidance)
    print(f"\n| skill | prompts | followed (guidance {args.guidance}) |\n| --- | --- | --- |")
    for skill, share in following.items():
        print(f"| {skill} | {sum(c.skill == skill for c in cases)} | {share:.0%} |")

    print("\n| images | VAE MSE (pixels in [0, 1]) | PSNR |\n| --- | --- | --- |")
    for name, draw in (
        ("parts", draw_parts_sample),
        ("creatures", draw_creature_sample),
        ("subject", draw_subject_sample),
    ):
        error = reconstruction_error(pipe.vae, [draw(seed).image for seed in HELD_OUT_SEEDS])
        print(f"| {name} ({len(HELD_OUT_SEEDS)}) | {error['mse']:.5f} | {error['psnr']:.1f} dB |")

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
