"""DreamBooth with LoRA: teach the model one subject from a handful of photos, under a rare identifier.

    python -m lora_nb.dreambooth --pretrained_model_name_or_path data/tiny-sd \
        --instance_data_dir data/subject --instance_prompt "a photo of sks star" \
        --with_prior_preservation --class_prompt "a photo of a star" --class_data_dir class-star \
        --max_train_steps 300 --learning_rate 1e-3 --output_dir sks-star-lora

The recipe of Ruiz et al. (2022, arXiv 2208.12242) with LoRA in place of full fine-tuning, and the flags of
diffusers' `train_dreambooth_lora.py`. Each training item pairs an instance image ("a photo of sks star")
with, under prior preservation, an image the base model itself drew for the class ("a photo of a star"):
loss = instance loss + prior_loss_weight x class loss, so learning the subject does not overwrite what
"star" meant. The training loop is `lora_nb.train`'s; this module only builds the data.

Pivotal tuning (`--pivotal`): first learn a new word's embedding alone (textual inversion, the "pivot"),
then train LoRA with that word frozen. In that order, not jointly: the word absorbs what the text side
can express before the UNet moves, so the LoRA has less to change; trained together, the LoRA fits the
subject within a few steps and the word barely learns anything.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from .config import LORA_ONLY, TrainConfig, config_from_args, flag
from .data import CaptionedImages, DataError, ImageTransform
from .inference import load_base_pipeline, sample_images
from .textual_inversion import check_new_token
from .train import TrainResult, train, training_resolution

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# The LoRA-only flags at their defaults (each off): what the pivotal phase trains with.
LORA_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.name in LORA_ONLY}


@dataclass
class DreamBoothConfig(TrainConfig):
    instance_data_dir: str | None = flag(None, "folder of the subject's photos")
    instance_prompt: str | None = flag(None, "prompt naming the subject, e.g. 'a photo of sks star'")
    class_data_dir: str | None = flag(None, "folder of class images (drawn by the base model if short)")
    class_prompt: str | None = flag(None, "prompt for the class, e.g. 'a photo of a star'")
    with_prior_preservation: bool = flag(False, "also train on class images, keeping what the class meant")
    prior_loss_weight: float = flag(1.0, "weight of the class images' loss", at_least=0)
    num_class_images: int = flag(
        100, "class images to train with (drawn first if the folder has fewer)", at_least=1
    )
    sample_batch_size: int = flag(4, "batch size for drawing class images", at_least=1)
    pre_compute_text_embeddings: bool = flag(
        False, "accepted for diffusers' sake: done whenever the text encoder is frozen"
    )
    pivotal: bool = flag(False, "textual inversion of --placeholder_token first, then LoRA with it")
    ti_steps: int = flag(200, "textual inversion steps (with --pivotal)", at_least=1)
    ti_learning_rate: float = flag(5e-3, "textual inversion learning rate (with --pivotal)", above=0)


def read_images(folder: str | Path, role: str) -> list[Image.Image]:
    """Every image file in `folder`, sorted by name; a missing folder or unreadable file is named."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{role} folder not found: {folder}")
    images = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"unreadable {role} image {path} ({error})") from None
    if not images:
        raise DataError(f"{role} folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


@torch.no_grad()
def generate_class_images(
    base_model: str,
    class_prompt: str,
    folder: str | Path,
    count: int,
    batch_size: int = 4,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> None:
    """Draw class images with the base model until `folder` holds `count` of them (kept for later runs)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    have = len([p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES])
    if have >= count:
        return
    pipe = load_base_pipeline(base_model, dtype=dtype, device="cuda" if torch.cuda.is_available() else None)
    for first in tqdm(range(have, count, batch_size), desc="class images", unit="batch"):
        n = min(batch_size, count - first)
        images = sample_images(pipe, class_prompt, n, seed=seed + first, num_inference_steps=25)
        for i, image in enumerate(images):
            tmp = folder / f".class-{first + i:05d}.png"
            image.save(tmp)
            tmp.rename(folder / f"class-{first + i:05d}.png")  # a half-written file never looks like an image


class DreamBoothPairs(torch.utils.data.Dataset):
    """A TrainingSet whose item i is instance example i (mod their number), plus class example i under prior
    preservation: the two losses add up."""

    def __init__(self, instance: CaptionedImages, prior: CaptionedImages | None = None):
        self.instance, self.prior = instance, prior
        self.transform = instance.transform

    @property
    def sets(self) -> list[CaptionedImages]:
        return [self.instance] + ([self.prior] if self.prior else [])

    @property
    def epoch(self) -> int:
        return self.instance.epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        for images in self.sets:
            images.epoch = epoch

    def __len__(self) -> int:
        return max(len(images) for images in self.sets)

    def __getitem__(self, index: int) -> list[dict]:
        return [images.example(index % len(images)) for images in self.sets]

    def cache(self, *args, **kwargs) -> None:
        for images in self.sets:
            images.cache(*args, **kwargs)


def check_config(config: DreamBoothConfig) -> None:
    config.validate()
    config.check_own_data_set("DreamBooth")
    if not config.instance_data_dir or not config.instance_prompt:
        raise ValueError("DreamBooth needs --instance_data_dir and --instance_prompt")
    if config.with_prior_preservation and not (config.class_data_dir and config.class_prompt):
        raise ValueError("--with_prior_preservation needs --class_data_dir and --class_prompt")
    if config.train_text_encoder and config.pre_compute_text_embeddings:
        raise ValueError(
            "--pre_compute_text_embeddings needs a frozen text encoder; drop it or --train_text_encoder"
        )
    if config.pivotal and not config.placeholder_token:
        raise ValueError(
            "--pivotal needs --placeholder_token (a new word such as '<sks>') and --initializer_token"
        )
    if config.placeholder_token:
        tokenizer = CLIPTokenizer.from_pretrained(config.pretrained_model_name_or_path, subfolder="tokenizer")
        check_new_token(tokenizer, config.placeholder_token)
    if config.placeholder_token and config.placeholder_token not in config.instance_prompt:
        raise ValueError(
            f"--instance_prompt {config.instance_prompt!r} does not contain the placeholder token "
            f"{config.placeholder_token!r}: it is the word the subject is learned under"
        )


def dreambooth(config: DreamBoothConfig) -> TrainResult:
    """Train a DreamBooth LoRA (and, with `pivotal`, its textual-inversion word first); returns the result."""
    check_config(config)
    resolution = training_resolution(config)
    seed = config.seed or 0
    transform = ImageTransform(resolution, config.center_crop, config.random_flip)
    instance_images = read_images(config.instance_data_dir, "instance")
    instance = CaptionedImages(
        instance_images, [config.instance_prompt] * len(instance_images), transform, seed
    )
    prior = None
    if config.with_prior_preservation:
        generate_class_images(
            config.pretrained_model_name_or_path,
            config.class_prompt,
            config.class_data_dir,
            config.num_class_images,
            config.sample_batch_size,
            seed,
        )
        class_images = read_images(config.class_data_dir, "class")[: config.num_class_images]
        prior = CaptionedImages(
            class_images,
            [config.class_prompt] * len(class_images),
            transform,
            seed + 1,
            weight=config.prior_loss_weight,
        )
    dataset = DreamBoothPairs(instance, prior)
    if config.pivotal:
        pivot = train(
            replace(
                config,
                finetune="embedding",
                max_train_steps=config.ti_steps,
                learning_rate=config.ti_learning_rate,
                lr_scheduler="constant",
                lr_warmup_steps=0,
                output_dir=str(Path(config.output_dir) / "textual_inversion"),
                validation_prompt=None,
                checkpointing_steps=0,
                resume_from_checkpoint=None,
                **LORA_DEFAULTS,  # the pivot learns a word, not LoRA: its layers' and optimiser's flags wait
            ),
            dataset,
        )
        config = replace(config, learned_embedding=str(pivot.embedding_path))
    return train(config, dataset)


def main(argv: list[str] | None = None) -> None:
    result = dreambooth(config_from_args(argv, DreamBoothConfig, __doc__))
    print(f"wrote {result.lora_path} after {result.global_step} steps; final loss {result.losses[-1]:.4f}")


if __name__ == "__main__":
    main()
