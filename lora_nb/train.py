"""Text-to-image LoRA fine-tuning of Stable Diffusion, on accelerate: the blog's recipe, read top to bottom.

    python -m lora_nb.train --train_data_dir data/creatures --max_train_steps 200 --output_dir out
    accelerate launch -m lora_nb.train --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --dataset_name lambdalabs/naruto-blip-captions --resolution 512 --mixed_precision fp16 ...

The flags are those of diffusers' `train_text_to_image_lora.py`. What differs, and why:
- VAE latents and frozen text embeddings are computed once before training when the augmentations allow
  (centre crop; a random flip is cached as both orientations): the VAE and text encoder then cost nothing
  per step. The latent *distribution* is cached and sampled each step, as if the VAE ran every time.
- Gradient clipping clips: the LoRA parameters are a list, not a spent `filter(...)` iterator.
- LoRA factors stay fp32 under fp16/bf16, so the gradient scaler never meets fp16 gradients.
- Every random draw is a function of (seed, step, micro-batch, process), so resuming from a checkpoint
  gives the same adapter as a run that never stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import SchedulerType, get_scheduler
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from .data import ImageTransform, load_captioned_dataset, tokenize
from .formats import WEIGHT_NAME, read_lora_file, save_lora_weights
from .inject import TEXT_ENCODER_ATTENTION, UNET_ATTENTION, find_targets, inject_lora, lora_parameters
from .objective import denoising_loss
from .textual_inversion import (
    add_placeholder_token,
    read_learned_embedding,
    save_learned_embedding,
    train_only_rows,
)
from .tiny import TINY_SD_PATH


@dataclass
class TrainConfig:
    """The trainer's settings; field names are diffusers' flag names."""

    pretrained_model_name_or_path: str = str(TINY_SD_PATH)
    dataset_name: str | None = None
    train_data_dir: str | None = None
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int | None = None  # None: the model's native size (512 for SD 1.5, 32 for tiny-sd)
    center_crop: bool = False
    random_flip: bool = False
    train_batch_size: int = 1
    dataloader_num_workers: int = 0
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    num_train_epochs: int = 1
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    finetune: str = "lora"  # "lora"; "full": the target layers' own weights; "embedding": textual inversion
    rank: int = 4
    lora_alpha: float | None = None  # None: = rank, so the adapter's scale alpha/r is 1
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(UNET_ATTENTION))
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_ATTENTION))
    placeholder_token: str | None = None  # a new word, e.g. "<sks>", added to the tokenizer
    initializer_token: str | None = None  # the word whose embedding the new one starts from
    learned_embedding: str | None = None  # or a learned_embeds.safetensors (pivotal tuning's second phase)
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    prediction_type: str | None = None
    mixed_precision: str | None = None  # "no", "fp16", "bf16", or "auto"
    gradient_checkpointing: bool = False
    allow_tf32: bool = False
    cache_latents: bool | None = None  # None: whenever the augmentations allow it
    output_dir: str = "sd-model-finetuned-lora"
    logging_dir: str = "logs"
    report_to: str = "none"
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest"
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_steps: int | None = None  # None: at the end of training only
    validation_epochs: int | None = None
    seed: int | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None
    max_train_samples: int | None = None
    show_progress: bool = True


@dataclass
class TrainResult:
    output_dir: Path
    lora_path: Path
    losses: list[float]  # one per optimiser step (mean over its micro-batches and processes)
    lrs: list[float]
    global_step: int
    unet: UNet2DConditionModel  # the trained model, LoRA layers in place
    text_encoder: CLIPTextModel
    validation_images: list = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


# ---------------------------------------------------------------- checks made before any training starts


def check_config(config: TrainConfig, needs_data: bool = True) -> None:
    if needs_data and config.dataset_name is None and config.train_data_dir is None:
        raise ValueError("give --dataset_name (a hub id or a local folder) or --train_data_dir (a local folder)")
    try:
        SchedulerType(config.lr_scheduler)
    except ValueError:
        names = ", ".join(s.value for s in SchedulerType)
        raise ValueError(f"unknown --lr_scheduler {config.lr_scheduler!r}; choose one of: {names}") from None
    if config.prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"unknown --prediction_type {config.prediction_type!r}: use epsilon or v_prediction")
    if config.finetune not in ("lora", "full", "embedding"):
        raise ValueError(f"unknown --finetune {config.finetune!r}: use lora, full or embedding")
    if config.finetune == "embedding" and not config.placeholder_token:
        raise ValueError("--finetune embedding (textual inversion) needs a --placeholder_token to learn")
    if config.mixed_precision not in (None, "no", "fp16", "bf16", "auto"):
        raise ValueError(f"unknown --mixed_precision {config.mixed_precision!r}: use no, fp16, bf16 or auto")
    if config.push_to_hub:
        check_hub(config)
    if config.report_to in ("wandb", "all"):
        check_wandb()


def check_hub(config: TrainConfig) -> None:
    """Fail now, not after hours of training, when the upload could not happen."""
    from huggingface_hub import HfApi

    repo = config.hub_model_id or Path(config.output_dir).name
    try:
        HfApi(token=config.hub_token).create_repo(repo, exist_ok=True)
    except Exception as error:  # noqa: BLE001 -- offline, no token, no rights: all end the same way
        raise RuntimeError(f"--push_to_hub: cannot create or reach hub repo {repo!r} ({type(error).__name__}: "
                           f"{error}). Log in with `hf auth login`, check the network, or drop --push_to_hub.") from None


def check_wandb() -> None:
    try:
        import wandb
    except ImportError:
        raise RuntimeError("--report_to wandb: wandb is not installed (pip install wandb), "
                           "or choose --report_to tensorboard") from None
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb.api.api_key:
        raise RuntimeError("--report_to wandb: not logged in to wandb; run `wandb login`, "
                           "or set WANDB_MODE=offline to log locally")


def auto_mixed_precision() -> str:
    """bf16 where the GPU computes in it (compute capability 8.0+), fp16 on older GPUs, none on a CPU.

    Decided by compute capability: a T4 (7.5) has no bf16 units, although torch.cuda.is_bf16_supported()
    may say True there (it emulates).
    """
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"


def training_resolution(config: TrainConfig) -> int:
    """The image size to train at: --resolution, checked against the model, or the model's native size.

    Reads only the configs, so a wrong value is reported before any weights load.
    """
    unet_config = UNet2DConditionModel.load_config(config.pretrained_model_name_or_path, subfolder="unet")
    vae_config = AutoencoderKL.load_config(config.pretrained_model_name_or_path, subfolder="vae")
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    resolution = config.resolution or unet_config["sample_size"] * factor
    if resolution <= 0 or resolution % factor:
        raise ValueError(f"--resolution {resolution}: this model's VAE needs a positive multiple of {factor}")
    return resolution


# ---------------------------------------------------------------- the model and the data


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler


def load_components(path: str, dtype: torch.dtype, device) -> Components:
    """The frozen pipeline parts, in the training dtype; LoRA factors added later stay fp32."""
    parts = Components(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype),
        scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    )
    for model in (parts.text_encoder, parts.vae, parts.unet):
        model.requires_grad_(False).to(device)
    return parts


class CaptionedImages(torch.utils.data.Dataset):
    """Items for the training loop: each is a list of examples (one here; DreamBooth pairs two).

    An example is a dict with either `latent_mean`/`latent_std` (cached) or `pixels`, either
    `text_embedding` (cached) or `input_ids`, and a loss `weight`.
    """

    def __init__(self, images, captions, transform: ImageTransform, seed: int, weight: float = 1.0):
        self.images, self.captions, self.transform = images, captions, transform
        self.seed, self.weight, self.epoch = seed, weight, 0
        self.latents: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per image, per flip
        self.text_embeddings: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def _rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}-{self.epoch}-{index}")

    def example(self, index: int) -> dict:
        rng = self._rng(index)
        example = {"weight": self.weight}
        if self.latents is not None:
            flip = int(self.transform.random_flip and rng.random() < 0.5)
            example["latent_mean"], example["latent_std"] = (t[flip] for t in self.latents[index])
        else:
            example["pixels"] = self.transform(self.images[index], rng)
        if self.text_embeddings is not None:
            example["text_embedding"] = self.text_embeddings[index]
        else:
            example["caption"] = self.captions[index]
        return example

    def __getitem__(self, index: int) -> list[dict]:
        return [self.example(index)]

    @torch.no_grad()
    def cache(self, parts: Components, latents: bool, text: bool, device, batch_size: int = 32) -> None:
        """Run the frozen VAE / text encoder over the whole set once (or forget what an earlier run cached)."""
        self.latents = self.text_embeddings = None
        if latents:
            flips = [False, True] if self.transform.random_flip else [False]
            self.latents = []
            for first in range(0, len(self), batch_size):
                chunk = range(first, min(len(self), first + batch_size))
                per_flip = []
                for flip in flips:
                    transform = ImageTransform(self.transform.resolution, True, False)
                    pixels = torch.stack([transform(self.images[i]) for i in chunk])
                    if flip:
                        pixels = pixels.flip(-1)
                    dist = parts.vae.encode(pixels.to(device, parts.vae.dtype)).latent_dist
                    per_flip.append((dist.mean.float().cpu(), dist.std.float().cpu()))
                for j in range(len(chunk)):
                    self.latents.append((torch.stack([m[j] for m, _ in per_flip]),
                                         torch.stack([s[j] for _, s in per_flip])))
        if text:
            embeddings = []
            for first in range(0, len(self), batch_size):
                ids = tokenize(parts.tokenizer, self.captions[first:first + batch_size]).to(device)
                embeddings.append(parts.text_encoder(ids)[0].cpu())
            self.text_embeddings = torch.cat(embeddings)


def collate(items: list[list[dict]]) -> dict:
    examples = [ex for item in items for ex in item]
    batch = {"items": len(items), "weight": torch.tensor([ex["weight"] for ex in examples])}
    for key in ("latent_mean", "latent_std", "pixels", "text_embedding"):
        if key in examples[0]:
            batch[key] = torch.stack([ex[key] for ex in examples])
    if "caption" in examples[0]:
        batch["caption"] = [ex["caption"] for ex in examples]
    return batch


def load_training_set(config: TrainConfig, resolution: int, seed: int) -> CaptionedImages:
    if config.train_data_dir:  # always a local folder, as in diffusers
        dataset = load_captioned_dataset(config.train_data_dir, config.image_column, config.caption_column, local=True)
    else:
        dataset = load_captioned_dataset(config.dataset_name, config.image_column, config.caption_column)
    if config.max_train_samples:
        dataset = dataset.select(range(min(config.max_train_samples, len(dataset))))
    transform = ImageTransform(resolution, config.center_crop, config.random_flip)
    return CaptionedImages(dataset[config.image_column], dataset[config.caption_column], transform, seed)


# ---------------------------------------------------------------- one step


def batch_latents(batch: dict, parts: Components, device) -> torch.Tensor:
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        latents = mean + std * torch.randn_like(mean)  # a fresh sample of the cached distribution
    else:
        with torch.no_grad():
            latents = parts.vae.encode(batch["pixels"].to(device, parts.vae.dtype)).latent_dist.sample()
    return latents * parts.vae.config.scaling_factor


def batch_text(batch: dict, parts: Components, device) -> torch.Tensor:
    if "text_embedding" in batch:
        return batch["text_embedding"].to(device)
    return parts.text_encoder(tokenize(parts.tokenizer, batch["caption"]).to(device))[0]


def step_seed(seed: int, step: int, micro: int, process: int) -> int:
    return hash((seed, step, micro, process)) % 2**63


# ---------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(output_dir: Path, step: int, parts: Components, optimizer, lr_scheduler, accelerator,
                    history: dict, total_limit: int | None) -> Path:
    """Write checkpoint-N atomically (a temporary folder renamed into place), then prune old ones."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_unwrapped_lora(tmp, parts, accelerator)
    state = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    torch.save(state, tmp / "training_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step, **history}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if total_limit:
        for old in checkpoint_dirs(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def save_unwrapped_lora(folder: Path, parts: Components, accelerator) -> Path:
    return save_lora_weights(
        folder,
        unet=accelerator.unwrap_model(parts.unet),
        text_encoder=accelerator.unwrap_model(parts.text_encoder) if has_lora(parts.text_encoder) else None,
    )


def full_finetune_parameters(unet: UNet2DConditionModel, target_modules) -> list[torch.nn.Parameter]:
    """The target layers' own weights and biases, made trainable and fp32 (the full fine-tune reference)."""
    params = []
    for name in find_targets(unet, target_modules):
        layer = unet.get_submodule(name).float()
        params += [p.requires_grad_(True) for p in layer.parameters()]
    return params


def has_lora(model) -> bool:
    return bool(lora_parameters(model))


def restore_lora(checkpoint: Path, unet, text_encoder=None) -> None:
    """Copy a checkpoint's factors into the freshly injected layers (same targets, rank, dropout)."""
    tensors, _ = read_lora_file(checkpoint)
    for prefix, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is None:
            continue
        state = {k.removeprefix(f"{prefix}."): v for k, v in tensors.items() if k.startswith(f"{prefix}.")}
        wanted = {k for k in model.state_dict() if ".lora_" in k}
        if set(state) != wanted:
            odd = sorted(set(state) ^ wanted)[:3]
            raise ValueError(f"checkpoint {checkpoint} does not match this run's {prefix} LoRA layers "
                             f"(first differing keys: {odd}); resume with the same targets and rank")
        model.load_state_dict(state, strict=False)


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        found = checkpoint_dirs(Path(config.output_dir))
        return found[-1] if found else None  # nothing to resume: start fresh, as diffusers does
    path = Path(config.resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(config.output_dir) / path
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {config.resume_from_checkpoint}: no checkpoint at {path}")
    return path


# ---------------------------------------------------------------- validation and the model card


@torch.no_grad()
def validate(config: TrainConfig, parts: Components, accelerator, step: int, tag: str = "validation") -> list:
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=accelerator.unwrap_model(parts.text_encoder), tokenizer=parts.tokenizer,
        unet=accelerator.unwrap_model(parts.unet),
        scheduler=DPMSolverMultistepScheduler.from_config(parts.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(config.seed or 0)
    with accelerator.autocast():
        images = pipe(config.validation_prompt, num_images_per_prompt=config.num_validation_images,
                      num_inference_steps=25, generator=generator).images
    folder = Path(config.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"step-{step:06d}-{i}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im, caption=config.validation_prompt) for im in images]}, step=step)
    return images


def write_model_card(config: TrainConfig, result: TrainResult, sample_images: list) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    out = Path(config.output_dir)
    names = []
    for i, image in enumerate(sample_images):
        image.save(out / f"image_{i}.png")
        names.append(f"image_{i}.png")
    base_model = config.pretrained_model_name_or_path
    if Path(base_model).exists():  # a local base: named relative to the adapter, so the two can move together
        base_model = os.path.relpath(Path(base_model).resolve(), out.resolve())
    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        license="creativeml-openrail-m" if "stable-diffusion" in config.pretrained_model_name_or_path else "apache-2.0",
        tags=["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "lora",
              "diffusers-training", "lora_nb"],
        inference=True,
    )
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("hub_token", "show_progress") and v not in (None, False)}
    images = "\n".join(f"![{config.validation_prompt}](./{name})" for name in names)
    body = f"""
# LoRA text-to-image weights for {config.pretrained_model_name_or_path}

LoRA adaptation weights (rank {config.rank}, alpha {config.lora_alpha or config.rank}) for
`{config.pretrained_model_name_or_path}`, fine-tuned on `{config.train_data_dir or config.dataset_name}`
with [lora_nb](https://github.com/) for {result.global_step} steps. Final training loss:
{result.losses[-1] if result.losses else float('nan'):.4f}.

{"Samples for the prompt “" + config.validation_prompt + "”:" if names else ""}

{images}

## Use it

```python
from lora_nb import load_lora_pipeline
pipe = load_lora_pipeline("{config.hub_model_id or config.output_dir}")  # reads base_model from this card
image = pipe("{config.validation_prompt or 'a prompt'}", num_inference_steps=25).images[0]
```

or with diffusers alone: `pipe = StableDiffusionPipeline.from_pretrained(base_model)` then
`pipe.load_lora_weights("{config.hub_model_id or config.output_dir}")`.

## Training settings

```json
{json.dumps(settings, indent=2, default=str)}
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    card.save(out / "README.md")


# ---------------------------------------------------------------- the training loop


def train(config: TrainConfig, dataset: CaptionedImages | None = None) -> TrainResult:
    """Fine-tune LoRA layers on `config`'s data (or on `dataset`, a ready CaptionedImages-like set)."""
    check_config(config, needs_data=dataset is None)
    output_dir = Path(config.output_dir)
    # accelerate keeps one global state per process; a notebook that trains twice (say fp32, then bf16)
    # needs it cleared. The process group (PartialState) stays, so multi-process runs are unaffected.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        # accelerate reads several CPU processes (torchrun without GPUs) as MULTI_CPU only when told cpu=True.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=auto_mixed_precision() if config.mixed_precision == "auto" else config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed or 0),
    )
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    seed = config.seed if config.seed is not None else 0

    if dataset is None:
        dataset = load_training_set(config, training_resolution(config), seed)
    parts = load_components(config.pretrained_model_name_or_path, dtype, accelerator.device)
    if config.placeholder_token:
        start = read_learned_embedding(config.learned_embedding)[1] if config.learned_embedding else None
        token_id = add_placeholder_token(parts.tokenizer, parts.text_encoder, config.placeholder_token,
                                         config.initializer_token, start)
    text_trains = config.train_text_encoder or config.finetune == "embedding"
    restore_other_rows = None

    resume_from = find_resume_checkpoint(config)
    if config.finetune == "full":
        if resume_from:
            raise ValueError("--resume_from_checkpoint is for LoRA runs; a full fine-tune is the short reference")
        params = full_finetune_parameters(parts.unet, config.target_modules)
    elif config.finetune == "embedding":
        restore_other_rows = train_only_rows(parts.text_encoder.get_input_embeddings(), [token_id])
        params = [parts.text_encoder.get_input_embeddings().weight]
    else:
        torch.manual_seed(seed)  # the A factors' initialisation
        inject_lora(parts.unet, config.target_modules, config.rank, config.lora_alpha, config.lora_dropout)
        if config.train_text_encoder:
            inject_lora(parts.text_encoder, config.text_encoder_target_modules, config.rank,
                        config.lora_alpha, config.lora_dropout)
        if resume_from:
            restore_lora(resume_from, parts.unet, parts.text_encoder if config.train_text_encoder else None)
        params = lora_parameters(parts.unet) + lora_parameters(parts.text_encoder)
    if config.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            parts.text_encoder.gradient_checkpointing_enable()

    cache = dataset.transform.center_crop if config.cache_latents is None else config.cache_latents
    if cache and not dataset.transform.center_crop:
        raise ValueError("--cache_latents needs --center_crop: a random crop differs at every step")
    with accelerator.autocast():
        dataset.cache(parts, latents=cache, text=not text_trains, device=accelerator.device)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    loader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, shuffle=True,
                                         collate_fn=collate, num_workers=config.dataloader_num_workers,
                                         generator=torch.Generator().manual_seed(seed))
    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)
    # accelerate steps a prepared scheduler once per process, hence the scaling (as diffusers does).
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    trained = [parts.unet] + ([parts.text_encoder] if text_trains else [])
    *trained, optimizer, loader, lr_scheduler = accelerator.prepare(*trained, optimizer, loader, lr_scheduler)
    parts.unet = trained[0]
    if text_trains:
        parts.text_encoder = trained[1]

    history = {"losses": [], "lrs": []}
    global_step = 0
    if resume_from:
        state = torch.load(resume_from / "training_state.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if accelerator.scaler is not None and "scaler" in state:
            accelerator.scaler.load_state_dict(state["scaler"])
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        global_step = saved.pop("global_step")
        history = saved
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("lora_nb", config={k: str(v) for k, v in asdict(config).items()
                                                      if k != "hub_token"})

    progress = tqdm(total=max_steps, initial=global_step, desc="steps",
                    disable=not (accelerator.is_local_main_process and config.show_progress))
    validation_images = []
    for model in trained:
        model.train()
    with torch.random.fork_rng(devices=[]):
        for epoch in range(global_step // steps_per_epoch, epochs):
            dataset.epoch = epoch
            loader.set_epoch(epoch)
            skip = (global_step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
            batches = accelerator.skip_first_batches(loader, skip) if skip > 0 else loader
            step_loss, micro = 0.0, 0
            for batch in batches:
                torch.manual_seed(step_seed(seed, global_step, micro, accelerator.process_index))
                with accelerator.accumulate(*trained):
                    latents = batch_latents(batch, parts, accelerator.device)
                    per_example = denoising_loss(
                        parts.unet, parts.scheduler, latents, batch_text(batch, parts, accelerator.device),
                        prediction_type=config.prediction_type, snr_gamma=config.snr_gamma,
                        noise_offset=config.noise_offset, reduce=False)
                    loss = (per_example * batch["weight"].to(per_example.device)).sum() / batch["items"]
                    mean_loss = accelerator.gather(loss.detach()).mean().item()
                    if not math.isfinite(mean_loss):
                        kept = checkpoint_dirs(output_dir)
                        raise TrainingDiverged(
                            f"loss is {mean_loss} at step {global_step + 1}; stopped. Last good checkpoint: "
                            f"{kept[-1] if kept else 'none'}. Lower --learning_rate, or use bf16 or fp32.")
                    step_loss += mean_loss / config.gradient_accumulation_steps
                    micro += 1
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    if restore_other_rows:
                        restore_other_rows()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                history["losses"].append(step_loss)
                history["lrs"].append(lr_scheduler.get_last_lr()[0])
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{history['lrs'][-1]:.2e}")
                accelerator.log({"train_loss": step_loss, "lr": history["lrs"][-1]}, step=global_step)
                step_loss, micro = 0.0, 0
                if accelerator.is_main_process and config.checkpointing_steps and \
                        global_step % config.checkpointing_steps == 0 and global_step < max_steps:
                    save_checkpoint(output_dir, global_step, parts, optimizer, lr_scheduler, accelerator,
                                    history, config.checkpoints_total_limit)
                if accelerator.is_main_process and config.validation_prompt and config.validation_steps and \
                        global_step % config.validation_steps == 0 and global_step < max_steps:
                    validate(config, parts, accelerator, global_step)
                if global_step >= max_steps:
                    break
            if config.validation_prompt and config.validation_epochs and (epoch + 1) % config.validation_epochs == 0 \
                    and accelerator.is_main_process and global_step < max_steps:
                validate(config, parts, accelerator, global_step)
            if global_step >= max_steps:
                break
    progress.close()

    accelerator.wait_for_everyone()
    unet, text_encoder = accelerator.unwrap_model(parts.unet), accelerator.unwrap_model(parts.text_encoder)
    lora_path = output_dir / WEIGHT_NAME
    if accelerator.is_main_process:
        if config.finetune == "full":
            lora_path = output_dir / "unet"
            unet.save_pretrained(lora_path)
        if config.placeholder_token:
            lora_path = save_learned_embedding(output_dir, parts.tokenizer, text_encoder, config.placeholder_token)
        if config.finetune == "lora":
            lora_path = save_unwrapped_lora(output_dir, parts, accelerator)
        if config.validation_prompt:
            validation_images = validate(config, parts, accelerator, global_step, tag="test")
    result = TrainResult(output_dir, lora_path, history["losses"], history["lrs"], global_step, unet,
                         text_encoder, validation_images)
    if accelerator.is_main_process and config.finetune == "lora":
        write_model_card(config, result, validation_images)
        if config.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(repo_id=config.hub_model_id or output_dir.name, folder_path=output_dir,
                          ignore_patterns=["checkpoint-*", ".checkpoint-*", "logs/*"], token=config.hub_token)
    accelerator.end_training()
    return result


# ---------------------------------------------------------------- the command line


def build_parser(config_class: type = TrainConfig, description: str | None = __doc__) -> argparse.ArgumentParser:
    """One flag per config field, named as in diffusers (`--max_train_steps`, `--center_crop`, ...)."""
    defaults = config_class()
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(config_class):
        default = getattr(defaults, f.name)
        flag = f"--{f.name}"
        if f.type in ("bool", bool) or isinstance(default, bool) and f.name != "cache_latents":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "cache_latents":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name.endswith("target_modules"):
            parser.add_argument(flag, nargs="+", default=default, help="module names, or one regex")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" | ")[0], str)
            parser.add_argument(flag, type=kind, default=default)
    return parser


def config_from_args(argv: list[str] | None = None, config_class: type = TrainConfig,
                     description: str | None = __doc__) -> TrainConfig:
    args = build_parser(config_class, description).parse_args(argv)
    values = vars(args)
    for key in ("target_modules", "text_encoder_target_modules"):
        if len(values[key]) == 1 and set(values[key][0]) & set("*+?[](){}|^$\\"):
            values[key] = values[key][0]  # one regex, matched in full as peft does
    return config_class(**values)


def main(argv: list[str] | None = None) -> None:
    result = train(config_from_args(argv))
    if result.lora_path.exists():
        print(f"wrote {result.lora_path} ({result.lora_path.stat().st_size / 1e6:.2f} MB) after "
              f"{result.global_step} steps; final loss {result.losses[-1]:.4f}")


if __name__ == "__main__":
    main()
