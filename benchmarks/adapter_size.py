"""Adapter file size by rank and target set, from ``lora_nb.sizes`` (meta device) and a real saved file.

The predicted size of the tiny model's adapter is checked against a file written by ``save_lora_weights``
from a real ``inject_lora``-ed UNet: they must agree to the byte.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lora_nb.course.tiny import TINY_SD_PATH

from .common import Section, Settings

MODELS = (str(TINY_SD_PATH), "sd15", "sdxl")
TARGETS = ("attention", "cross-attention", "attention+ff")
RANKS = (1, 4, 16, 64)


def saved_tiny_file(model: Path, rank: int, targets: str) -> int:
    from diffusers import UNet2DConditionModel

    from lora_nb import inject_lora, save_lora_weights
    from lora_nb.inject import TARGET_SETS

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    torch.manual_seed(0)
    inject_lora(unet, TARGET_SETS[targets][0], rank=rank)
    with tempfile.TemporaryDirectory(prefix="lora_nb-bench-") as tmp:
        path = save_lora_weights(Path(tmp), unet=unet)
        return path.stat().st_size


def benchmark(settings: Settings) -> Section:
    from lora_nb.sizes import size_table

    ranks = RANKS[:2] if settings.quick else RANKS
    rows = []
    half = {(r["model"], r["targets"], r["rank"]): r for r in size_table(MODELS, TARGETS, ranks, ("fp16",))}
    for row in size_table(MODELS, TARGETS, ranks, ("fp32",)):
        fp16 = half[row["model"], row["targets"], row["rank"]]
        rows.append(
            [
                row["model"],
                row["targets"],
                str(row["rank"]),
                str(row["layers"]),
                f"{row['lora_params']:,}",
                f"{row['file_mb']:.3f}",
                f"{fp16['file_mb']:.3f}",
                f"{row['base_mb']:,.1f}",
                f"{row['ratio']:.3%}",
            ]
        )
    checks = []
    for rank in ranks:
        for targets in TARGETS:
            predicted = (
                next(r for r in size_table((str(TINY_SD_PATH),), (targets,), (rank,), ("fp32",)))["file_mb"]
                * 1e6
            )
            actual = saved_tiny_file(settings.model, rank, targets)
            if round(predicted) != actual:
                raise AssertionError(
                    f"lora_nb.sizes predicts {predicted:.0f} bytes for tiny/{targets}/r{rank}, "
                    f"the saved file has {actual}"
                )
            checks.append(f"{targets} r{rank}: {actual:,} B")
    notes = [
        (
            "MB = 10^6 bytes. lora_nb saves fp32; fp16 is what a half-precision export of the same adapter "
            "weighs. Sizes are computed on the meta device (no weights loaded) by `lora_nb.sizes`."
        ),
        "Saved-file check (tiny-sd UNet, `inject_lora` + `save_lora_weights`, fp32): the predicted size "
        "equals the file on disk to the byte for " + "; ".join(checks) + ".",
    ]
    return Section(
        "Adapter file size (UNet LoRA, by rank and targets)",
        [
            "model",
            "targets",
            "rank",
            "layers",
            "LoRA params",
            "file MB (fp32)",
            "file MB (fp16)",
            "UNet MB (fp32)",
            "file / UNet (fp32)",
        ],
        rows,
        [],
        notes,
    )
