"""Captioned images in, training tensors out: loading, checking, transforming, tokenising.

A local folder is a `datasets` imagefolder (images plus a `metadata.jsonl` with `file_name` and a caption
column); anything else is a hub data set id. A local folder is checked whole before training starts, so a
missing file, an unreadable image or an empty caption is reported by name instead of failing mid-run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """A data set that cannot be trained on, with the file, line or column at fault in the message."""


def check_imagefolder(folder: str | Path, caption_column: str = "text") -> list[dict]:
    """Read and check `folder/metadata.jsonl`: every line names a readable image and a non-empty caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise DataError(f"{metadata} is missing: an imagefolder needs one line per image with "
                        f"'file_name' and '{caption_column}'")
    records = []
    for number, line in enumerate(metadata.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        for key in ("file_name", caption_column):
            if key not in record:
                raise DataError(f"{where}: no '{key}' key (keys: {sorted(record)})")
        if not isinstance(record[caption_column], str) or not record[caption_column].strip():
            raise DataError(f"{where}: empty caption in '{caption_column}' for {record['file_name']}")
        image_path = folder / record["file_name"]
        if not image_path.is_file():
            raise DataError(f"{where}: image file not found: {image_path}")
        try:
            with Image.open(image_path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"{where}: unreadable image {image_path} ({error})") from None
        records.append(record)
    if not records:
        raise DataError(f"{metadata} lists no images")
    return records


def load_captioned_dataset(name_or_folder: str | Path, image_column: str = "image", caption_column: str = "text",
                           split: str = "train", cache_dir: str | None = None, local: bool = False):
    """A `datasets.Dataset` of images and captions, from a local imagefolder or a hub data set id.

    A path that exists (or any path, with `local=True`) is read as an imagefolder and checked first.
    """
    from datasets import load_dataset

    if local or Path(name_or_folder).exists():
        check_imagefolder(name_or_folder, caption_column)
        dataset = load_dataset("imagefolder", data_dir=str(name_or_folder), split=split, cache_dir=cache_dir)
    else:
        dataset = load_dataset(str(name_or_folder), split=split, cache_dir=cache_dir)
    for role, column in (("image", image_column), ("caption", caption_column)):
        if column not in dataset.column_names:
            raise DataError(f"{role} column '{column}' not in data set {name_or_folder}; "
                            f"its columns are {dataset.column_names}")
    return dataset


class ImageTransform:
    """Resize the short side to `resolution`, crop a square (centre or random), maybe flip, scale to [-1, 1].

    Returns a (3, resolution, resolution) float tensor. `rng` makes the random crop and flip reproducible.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False):
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random.Random(0)
        image = image.convert("RGB")
        scale = self.resolution / min(image.size)
        if scale != 1:
            size = (max(self.resolution, round(image.width * scale)), max(self.resolution, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR)
        spare_x, spare_y = image.width - self.resolution, image.height - self.resolution
        left, top = (spare_x // 2, spare_y // 2) if self.center_crop else (rng.randint(0, spare_x), rng.randint(0, spare_y))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (h, w, 3)
        return torch.from_numpy(array).permute(2, 0, 1)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length (77 in SD), as the pipeline pads prompts."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
