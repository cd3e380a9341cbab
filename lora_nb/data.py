"""Captioned images in, training tensors out: loading, checking, transforming, tokenising, and the data set
the trainers share (CaptionedImages, and the TrainingSet interface the trainer reads).

A local folder is a `datasets` imagefolder (images plus a `metadata.jsonl` with `file_name` and a caption
column); anything else is a hub data set id. A local folder is checked whole before training starts, so a
missing file, an unreadable image or an empty caption is reported by name instead of failing mid-run.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # the trainer's frozen models; train.py imports this module
    from .train import Components


class DataError(ValueError):
    """A data set that cannot be trained on, with the file, line or column at fault in the message."""


def check_imagefolder(folder: str | Path, caption_column: str = "text") -> list[dict]:
    """Read and check `folder/metadata.jsonl`: every line names a readable image and a non-empty caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise DataError(
            f"{metadata} is missing: an imagefolder needs one line per image with "
            f"'file_name' and '{caption_column}'"
        )
    records = []
    for number, line in enumerate(metadata.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected a JSON object such as "
                f'{{"file_name": "0001.png", "{caption_column}": "a caption"}}, got {line.strip()!r:.80}'
            )
        for key in ("file_name", caption_column):
            if key not in record:
                raise DataError(f"{where}: no '{key}' key (keys: {sorted(record)})")
            if not isinstance(record[key], str):
                raise DataError(f"{where}: '{key}' must be a string, got {record[key]!r:.80}")
        if not record[caption_column].strip():
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


def load_captioned_dataset(
    name_or_folder: str | Path,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    cache_dir: str | None = None,
    local: bool = False,
):
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
            raise DataError(
                f"{role} column '{column}' not in data set {name_or_folder}; "
                f"its columns are {dataset.column_names}"
            )
    return dataset


class ImageTransform:
    """Resize to cover the target size, crop it (centre or random), maybe flip, scale to [-1, 1].

    The target is a square of `resolution` unless a call names a (width, height) `size` (an aspect-ratio
    bucket). Returns a (3, height, width) float tensor. `rng` makes the random crop and flip reproducible.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False):
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __call__(
        self, image: Image.Image, rng: random.Random | None = None, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        rng = rng or random.Random(0)
        width, height = size or (self.resolution, self.resolution)
        image = image.convert("RGB")
        scale = max(width / image.width, height / image.height)  # the smallest resize that covers the target
        if scale != 1:
            resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
            image = image.resize(resized, Image.Resampling.BILINEAR)
        spare_x, spare_y = image.width - width, image.height - height
        left, top = (
            (spare_x // 2, spare_y // 2)
            if self.center_crop
            else (rng.randint(0, spare_x), rng.randint(0, spare_y))
        )
        image = image.crop((left, top, left + width, top + height))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (h, w, 3)
        return torch.from_numpy(array).permute(2, 0, 1)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length (77 in SD), as the pipeline pads prompts."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def bucket_sizes(resolution: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets as kohya's sd-scripts makes them: for each width a multiple of ``multiple``,
    the tallest height (also a multiple) whose area is at most resolution², keeping aspect ratios from
    1:max_ratio to max_ratio:1. Returns (width, height) pairs, the square among them."""
    area, sizes = resolution * resolution, []
    for width in range(multiple, area // multiple + 1, multiple):
        height = area // width // multiple * multiple
        if height and 1 / max_ratio <= width / height <= max_ratio:
            sizes.append((width, height))
    return sizes


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width:height (on a log scale, so 2:1 and 1:2 are as far
    from 1:1); the image is then resized to cover it and cropped, losing the least of it."""
    return min(sizes, key=lambda size: abs(math.log(size[0] / size[1]) - math.log(width / height)))


class BucketBatches(torch.utils.data.Sampler):
    """A batch sampler whose batches each hold examples of one bucket (``sizes[i]`` is example i's), as
    latents of different shapes cannot be stacked.

    Each epoch (the data set's ``epoch``, which the trainer sets) shuffles every bucket and the order of
    the batches, from the seed alone. Every batch is full: a bucket's last one is filled up from the start
    of the same bucket. The number of batches is a multiple of ``num_processes``, whole batches repeated as
    needed, so that accelerate's BatchSamplerShard hands every process whole batches, as many on each (as
    its even_batches does for ordinary batches).
    """

    def __init__(self, dataset, sizes: list, batch_size: int, seed: int, num_processes: int = 1):
        self.dataset, self.batch_size, self.seed, self.num_processes = (
            dataset,
            batch_size,
            seed,
            num_processes,
        )
        self.buckets: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            self.buckets.setdefault(tuple(size), []).append(index)

    def __len__(self) -> int:
        batches = sum(math.ceil(len(indices) / self.batch_size) for indices in self.buckets.values())
        return math.ceil(batches / self.num_processes) * self.num_processes

    def __iter__(self):
        rng = random.Random(f"{self.seed}-{self.dataset.epoch}-buckets")
        batches = []
        for size in sorted(self.buckets):
            indices = rng.sample(self.buckets[size], len(self.buckets[size]))
            count = math.ceil(len(indices) / self.batch_size)
            filled = (indices * self.batch_size)[: count * self.batch_size]
            batches += [filled[k * self.batch_size : (k + 1) * self.batch_size] for k in range(count)]
        rng.shuffle(batches)
        return iter((batches * self.num_processes)[: len(self)])


class TrainingSet(Protocol):
    """What the trainer needs of a data set: CaptionedImages, and the sets built from it
    (dreambooth.DreamBoothPairs, sweep.SharedCache).

    Item i is a list of examples (CaptionedImages.example's dicts) whose losses add up: one for plain
    fine-tuning, an instance and a class example for DreamBooth. `collate` makes a batch of such items.
    """

    transform: ImageTransform  # the trainer caches latents only under a centre crop
    epoch: int  # set by the trainer before each epoch: the random crops and flips are drawn from it

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> list[dict]: ...

    def cache(self, components: Components, latents: bool, text: bool, device, batch_size: int = 32) -> None:
        """Encode the images (latents) and captions (text) once with the frozen models, or forget both."""


class CaptionedImages(torch.utils.data.Dataset):
    """The trainer's data set: images with their captions, each item a list of one example (a TrainingSet).

    An example is a dict with either `latent_mean`/`latent_std` (cached) or `pixels`, either
    `text_embedding` (cached) or `caption`, and a loss `weight`.
    """

    def __init__(
        self,
        images,
        captions,
        transform: ImageTransform,
        seed: int,
        weight: float = 1.0,
        caption_dropout: float = 0.0,
        sizes: list[tuple[int, int]] | None = None,
    ):
        self.images, self.captions, self.transform = images, captions, transform
        self.sizes = sizes  # each example's (width, height), its aspect-ratio bucket; None: all square
        self.seed, self.weight, self.epoch = seed, weight, 0
        self.caption_dropout = caption_dropout  # the probability that an example's caption is ""
        self.latents: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per image, per flip
        self.text_embeddings: torch.Tensor | None = None
        self.empty_embedding: torch.Tensor | None = None  # the empty caption's, cached with the others

    def __len__(self) -> int:
        return len(self.captions)

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}-{self.epoch}-{index}")

    def dropped(self, index: int) -> bool:
        """Whether example ``index`` trains on the empty caption this epoch: a draw of its own, so the same
        examples drop whether or not anything is cached, and a resumed run drops the same ones."""
        draw = random.Random(f"{self.seed}-{self.epoch}-{index}-caption").random()
        return self.caption_dropout > 0 and draw < self.caption_dropout

    def example(self, index: int) -> dict:
        rng = self._rng(index)
        example = {"weight": self.weight}
        if self.latents is not None:
            flip = int(self.transform.random_flip and rng.random() < 0.5)
            example["latent_mean"], example["latent_std"] = (t[flip] for t in self.latents[index])
        else:
            example["pixels"] = self.transform(self.images[index], rng, self.size(index))
        drop = self.dropped(index)
        if self.text_embeddings is not None:
            example["text_embedding"] = self.empty_embedding if drop else self.text_embeddings[index]
        else:  # a trained text encoder: the empty caption is tokenised like any other
            example["caption"] = "" if drop else self.captions[index]
        return example

    def __getitem__(self, index: int) -> list[dict]:
        return [self.example(index)]

    def size(self, index: int) -> tuple[int, int]:
        """Example ``index``'s (width, height): its bucket's, or the square of the transform's resolution."""
        return self.sizes[index] if self.sizes else (self.transform.resolution,) * 2

    def same_size_chunks(self, batch_size: int) -> list[list[int]]:
        """The indices in chunks of at most ``batch_size`` whose images have one size (to encode together)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for index in range(len(self)):
            groups.setdefault(self.size(index), []).append(index)
        return [ix[i : i + batch_size] for ix in groups.values() for i in range(0, len(ix), batch_size)]

    @torch.no_grad()
    def cache(self, components: Components, latents: bool, text: bool, device, batch_size: int = 32) -> None:
        """Run the frozen VAE / text encoder over the whole set once (or forget what was cached before)."""
        self.latents = self.text_embeddings = self.empty_embedding = None
        if latents:
            flips = [False, True] if self.transform.random_flip else [False]
            self.latents = [None] * len(self)  # one per example, in its bucket's shape
            for chunk in self.same_size_chunks(batch_size):
                per_flip = []
                for flip in flips:
                    transform = ImageTransform(self.transform.resolution, center_crop=True, random_flip=False)
                    pixels = torch.stack([transform(self.images[i], size=self.size(i)) for i in chunk])
                    if flip:
                        pixels = pixels.flip(-1)
                    dist = components.vae.encode(pixels.to(device, components.vae.dtype)).latent_dist
                    per_flip.append((dist.mean.float().cpu(), dist.std.float().cpu()))
                for j, index in enumerate(chunk):
                    self.latents[index] = (
                        torch.stack([m[j] for m, _ in per_flip]),
                        torch.stack([s[j] for _, s in per_flip]),
                    )
        if text:
            embeddings = []
            for first in range(0, len(self), batch_size):
                ids = tokenize(components.tokenizer, self.captions[first : first + batch_size]).to(device)
                embeddings.append(components.text_encoder(ids)[0].cpu())
            self.text_embeddings = torch.cat(embeddings)
            empty = tokenize(components.tokenizer, [""]).to(device)  # for caption dropout
            self.empty_embedding = components.text_encoder(empty)[0][0].cpu()


def collate(items: list[list[dict]]) -> dict:
    """One batch of TrainingSet items: their examples stacked, and how many items they came from."""
    examples = [ex for item in items for ex in item]
    batch = {"items": len(items), "weight": torch.tensor([ex["weight"] for ex in examples])}
    for key in ("latent_mean", "latent_std", "pixels", "text_embedding"):
        if key in examples[0]:
            batch[key] = torch.stack([ex[key] for ex in examples])
    if "caption" in examples[0]:
        batch["caption"] = [ex["caption"] for ex in examples]
    return batch
