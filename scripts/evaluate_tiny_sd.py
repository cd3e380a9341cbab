"""Measure the embedded tiny SD: prompt-following per colour, VAE reconstruction per data set, a sample grid.

    python scripts/evaluate_tiny_sd.py --grid outputs/tiny-sd-samples.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lora_nb.data import load_captioned_dataset
from lora_nb.evaluate import colour_accuracy, reconstruction_error
from lora_nb.synthetic import COLOURS, SHAPES
from lora_nb.tiny import TINY_SD_PATH, load_tiny_pipeline
from lora_nb.viz import image_grid, save_figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=TINY_SD_PATH)
    parser.add_argument("--per-colour", type=int, default=16)
    parser.add_argument("--grid", type=Path, default=Path("outputs/tiny-sd-samples.png"))
    args = parser.parse_args()

    pipe = load_tiny_pipeline(args.model)
    accuracy = colour_accuracy(pipe, per_colour=args.per_colour)
    print(f"prompted colour is the dominant foreground colour ({args.per_colour} images each, 25 DPM-Solver "
          "steps, guidance 7.5):")
    for colour, fraction in accuracy.items():
        print(f"  {colour:>7}: {fraction:.0%}")

    print("VAE reconstruction (pixels in [0, 1]):")
    for name in ("shapes", "creatures", "subject"):
        images = load_captioned_dataset(TINY_SD_PATH.parent / name)["image"]
        error = reconstruction_error(pipe.vae, images)
        print(f"  {name:>9}: MSE {error['mse']:.5f}, PSNR {error['psnr']:.1f} dB ({len(images)} images)")

    prompts = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
    images = pipe(prompts, num_inference_steps=25, generator=torch.Generator().manual_seed(0)).images
    save_figure(image_grid(images, prompts, ncols=len(SHAPES), title=f"{args.model.name}, seed 0"),
                args.grid.parent, args.grid.name)
    print(f"sample grid: {args.grid}")


if __name__ == "__main__":
    main()
