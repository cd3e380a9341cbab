"""Text-to-image LoRA fine-tuning of Stable Diffusion, on accelerate: the blog's recipe, read top to bottom.

    python -m lora_nb.train --pretrained_model_name_or_path data/tiny-sd --train_data_dir data/creatures \\
        --max_train_steps 200 --output_dir out
    accelerate launch -m lora_nb.train \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_name lambdalabs/naruto-blip-captions --resolution 512 --mixed_precision fp16 ...

The flags are those of diffusers' `train_text_to_image_lora.py`. What differs, and why:
- VAE latents and frozen text embeddings are computed once before training when the augmentations allow
  (centre crop; a random flip is cached as both orientations): the VAE and text encoder then cost nothing
  per step. The latent *distribution* is cached and sampled each step, as if the VAE ran every time.
- Gradient clipping clips: the LoRA parameters are a list, not a spent `filter(...)` iterator.
- LoRA factors stay fp32 under fp16/bf16, so the gradient scaler never meets fp16 gradients.
- Every random draw is a function of (seed, step, micro-batch, process), so resuming from a checkpoint
  gives the same adapter, byte for byte, as a run that never stopped.
- Every flag is checked before anything loads; the weights after every update, before anything is saved.
- A checkpoint is data only (safetensors and JSON), never a pickle, so resuming runs no code from it.
- One run at a time writes to an --output_dir (a lock file holds its process id).
"""

from __future__ import annotations

from .config import TrainConfig, config_from_args

if __name__ == "__main__":  # now: a mistyped flag is reported at once, not after seconds of imports
    COMMAND_LINE = config_from_args(description=__doc__)

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import safetensors.torch
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
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from .convert import select_component
from .data import (
    BucketBatches,
    CaptionedImages,
    ImageTransform,
    TrainingSet,
    bucket_sizes,
    collate,
    load_captioned_dataset,
    nearest_bucket,
    tokenize,
)
from .formats import WEIGHT_NAME, read_json, read_lora, save_lora_weights
from .inference import missing_base_model
from .inject import find_targets, inject_lora, layer_parameters, lora_layers, lora_parameters
from .objective import denoising_loss
from .textual_inversion import (
    add_placeholder_token,
    read_learned_embedding,
    save_learned_embedding,
    train_only_rows,
)

logger = logging.getLogger(__name__)
LOCK_NAME = ".lora_nb.lock"  # in --output_dir while a run writes there


@dataclass
class TrainResult:
    """What a run made. Which files it saved depends on --finetune: each has its own field, or None."""

    output_dir: Path
    losses: list[float]  # one per optimiser step (mean over its micro-batches and processes)
    lrs: list[float]
    global_step: int
    unet: UNet2DConditionModel  # the trained model, LoRA layers in place
    text_encoder: CLIPTextModel
    lora_path: Path | None = None  # the adapter, pytorch_lora_weights.safetensors (--finetune lora)
    embedding_path: Path | None = None  # the new word's learned_embeds.safetensors (--placeholder_token)
    unet_path: Path | None = None  # the fine-tuned UNet's folder (--finetune full)
    validation_images: list = field(default_factory=list)
    loop_seconds: float = 0.0  # wall time of this run's steps: no loading, caching or saving


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or inf; the last good checkpoint is kept, nothing else is saved."""


# ---------------------------------------------------------------- checks made before any training starts


def check_config(config: TrainConfig, needs_data: bool = True) -> None:
    config.validate()
    if not needs_data:
        config.check_own_data_set("a ready TrainingSet")
    if needs_data and config.dataset_name is None and config.train_data_dir is None:
        raise ValueError(
            "give --dataset_name (a hub id or a local folder) or --train_data_dir (a local folder)"
        )
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
        raise RuntimeError(
            f"--push_to_hub: cannot create or reach hub repo {repo!r} ({type(error).__name__}: "
            f"{error}). Log in with `hf auth login`, check the network, or drop --push_to_hub."
        ) from None


def check_wandb() -> None:
    try:
        import wandb
    except ImportError:
        raise RuntimeError(
            "--report_to wandb: wandb is not installed (pip install wandb), or choose --report_to tensorboard"
        ) from None
    if os.environ.get("WANDB_MODE") not in ("offline", "disabled") and not wandb.api.api_key:
        raise RuntimeError(
            "--report_to wandb: not logged in to wandb; run `wandb login`, "
            "or set WANDB_MODE=offline to log locally"
        )


def auto_mixed_precision() -> str:
    """bf16 where the GPU computes in it (compute capability 8.0+), fp16 on older GPUs, none on a CPU.

    Decided by compute capability: a T4 (7.5) has no bf16 units, although torch.cuda.is_bf16_supported()
    may say True there (it emulates).
    """
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"


def training_precision(config: TrainConfig, cpu: bool) -> str:
    """--mixed_precision as this machine runs it. fp16 on a CPU has neither fast kernels nor a gradient
    scaler (accelerate runs it as plain fp16, which overflows), so a CPU trains in fp32 instead, and says so:
    a notebook set up for a T4 still runs on a laptop."""
    if config.mixed_precision == "auto":
        return auto_mixed_precision()
    gpu = not cpu and (torch.cuda.is_available() or torch.backends.mps.is_available())
    if config.mixed_precision == "fp16" and not gpu:
        logger.warning(
            "--mixed_precision fp16 needs a GPU; this run is on a CPU, so it trains in fp32 instead "
            "(--mixed_precision bf16 trains in reduced precision on a CPU)"
        )
        return "no"
    return config.mixed_precision


def vae_scale_factor(vae_config) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def bucket_multiple(path: str) -> int:
    """What a bucket's sides must divide by: the VAE's scale factor times the UNet's down-sampling (each
    down block but the last halves the latents), so that every skip connection meets its like."""
    vae_config = AutoencoderKL.load_config(path, subfolder="vae")
    unet_config = UNet2DConditionModel.load_config(path, subfolder="unet")
    return vae_scale_factor(vae_config) * 2 ** (len(unet_config["block_out_channels"]) - 1)


def training_resolution(config: TrainConfig) -> int:
    """The image size to train at: --resolution, checked against the model, or the model's native size.

    Reads only the configs, so a wrong value, or a base model that is not there, is reported before any
    weights load.
    """
    try:
        unet_config = UNet2DConditionModel.load_config(config.pretrained_model_name_or_path, subfolder="unet")
        vae_config = AutoencoderKL.load_config(config.pretrained_model_name_or_path, subfolder="vae")
    except OSError as error:
        raise missing_base_model(
            "--pretrained_model_name_or_path", config.pretrained_model_name_or_path, error
        ) from None
    factor = vae_scale_factor(vae_config)
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
    """The frozen pipeline components, in the training dtype; LoRA factors added later stay fp32."""
    components = Components(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype),
        scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
    )
    for model in (components.text_encoder, components.vae, components.unet):
        model.requires_grad_(False).to(device)
    return components


def load_training_set(config: TrainConfig, resolution: int, seed: int) -> CaptionedImages:
    if config.train_data_dir:  # always a local folder, as in diffusers
        dataset = load_captioned_dataset(
            config.train_data_dir, config.image_column, config.caption_column, local=True
        )
    else:
        dataset = load_captioned_dataset(config.dataset_name, config.image_column, config.caption_column)
    if config.max_train_samples:
        dataset = dataset.select(range(min(config.max_train_samples, len(dataset))))
    transform = ImageTransform(resolution, config.center_crop, config.random_flip)
    images, captions = dataset[config.image_column], dataset[config.caption_column]
    sizes = None
    if config.aspect_ratio_buckets:
        buckets = bucket_sizes(resolution, bucket_multiple(config.pretrained_model_name_or_path))
        sizes = [nearest_bucket(*image.size, buckets) for image in images]
    return CaptionedImages(
        images, captions, transform, seed, caption_dropout=config.caption_dropout_rate, sizes=sizes
    )


# ---------------------------------------------------------------- one step


def batch_latents(batch: dict, components: Components, device) -> torch.Tensor:
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        latents = mean + std * torch.randn_like(mean)  # a fresh sample of the cached distribution
    else:
        with torch.no_grad():
            latents = components.vae.encode(
                batch["pixels"].to(device, components.vae.dtype)
            ).latent_dist.sample()
    return latents * components.vae.config.scaling_factor


def batch_text(batch: dict, components: Components, device) -> torch.Tensor:
    if "text_embedding" in batch:
        return batch["text_embedding"].to(device)
    return components.text_encoder(tokenize(components.tokenizer, batch["caption"]).to(device))[0]


def step_seed(seed: int, step: int, micro: int, process: int) -> int:
    return hash((seed, step, micro, process)) % 2**63


# ---------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run: Run) -> Path:
    """Write checkpoint-N atomically (a temporary folder renamed into place), then prune old ones."""
    output_dir, step = Path(run.config.output_dir), run.global_step
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_unwrapped_lora(tmp, run.components, run.accelerator)
    save_training_state(tmp, run.optimizer, run.lr_scheduler, run.accelerator.scaler)
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step, **run.history}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if run.config.checkpoints_total_limit:
        for old in checkpoint_dirs(output_dir)[: -run.config.checkpoints_total_limit]:
            shutil.rmtree(old)
    return final


def save_training_state(folder: Path, optimizer, lr_scheduler, scaler) -> None:
    """The optimiser's tensors in training_state.safetensors; its other values, the schedule's and the loss
    scaler's in training_state.json. Checkpoints are shared like adapters: they hold data, never a pickle."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.contiguous()
            else:
                plain.setdefault(str(index), {})[name] = value
    safetensors.torch.save_file(tensors, folder / "training_state.safetensors")
    (folder / "training_state.json").write_text(
        json.dumps(
            {
                "optimizer": {"param_groups": state["param_groups"], "state": plain},
                "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
            }
        )
    )


def load_training_state(folder: Path, optimizer, lr_scheduler, scaler) -> None:
    """Put save_training_state's files back into the optimiser, schedule and scaler."""
    if not (folder / "training_state.json").is_file():
        raise FileNotFoundError(
            f"checkpoint {folder} has no training_state.json: it comes from an older lora_nb, whose "
            "training_state.pt (a pickle) is not read, as unpickling can run code. Start a fresh run; the "
            f"adapter in it ({WEIGHT_NAME}) is still good to use"
        )
    saved = read_json((folder / "training_state.json").read_text(), str(folder / "training_state.json"))
    state: dict[int, dict] = {}
    for key, tensor in safetensors.torch.load_file(folder / "training_state.safetensors").items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = tensor
    for index, values in saved["optimizer"]["state"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": saved["optimizer"]["param_groups"]})
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])


def save_unwrapped_lora(folder: Path, components: Components, accelerator) -> Path:
    return save_lora_weights(
        folder,
        unet=accelerator.unwrap_model(components.unet),
        text_encoder=accelerator.unwrap_model(components.text_encoder)
        if has_lora(components.text_encoder)
        else None,
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


def restore_lora(checkpoint: Path, models: dict[str, torch.nn.Module]) -> None:
    """Copy a checkpoint's factors into the freshly injected layers of ``models`` ({prefix: model}): the
    same targets, rank and text-encoder choice, or a ValueError saying which differs."""
    tensors = read_lora(checkpoint).tensors
    broken = [key for key, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if broken:
        raise ValueError(
            f"checkpoint {checkpoint} holds NaN or inf weights ({broken[0]}); resume from an earlier one"
        )
    wanted = {
        f"{prefix}.{key}": value
        for prefix, model in models.items()
        for key, value in model.state_dict().items()
        if ".lora_" in key
    }
    if set(tensors) != set(wanted):
        odd = sorted(set(tensors) ^ set(wanted))[:3]
        raise ValueError(
            f"checkpoint {checkpoint} does not match this run's LoRA layers (first differing keys: "
            f"{odd}); resume with its --target_modules, --train_text_encoder and --use_dora"
        )
    for key, value in wanted.items():
        if tensors[key].shape != value.shape:
            rank = tensors[key].shape[0 if ".lora_A." in key else 1]
            raise ValueError(
                f"checkpoint {checkpoint} was trained at rank {rank} ({key} is "
                f"{tuple(tensors[key].shape)} there, {tuple(value.shape)} here); resume with "
                f"--rank {rank}"
            )
    for prefix, model in models.items():
        model.load_state_dict(select_component(tensors, prefix), strict=False)


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        found = checkpoint_dirs(Path(config.output_dir))
        if not found:  # start fresh, as diffusers does, but say so
            logger.warning(
                "--resume_from_checkpoint latest: no checkpoint in %s; starting from step 0",
                config.output_dir,
            )
        return found[-1] if found else None
    path = Path(config.resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(config.output_dir) / path
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {config.resume_from_checkpoint}: no checkpoint at {path}"
        )
    return path


# ---------------------------------------------------------------- the output folder


@contextlib.contextmanager
def claimed_output_dir(output_dir: Path, main_process: bool = True):
    """Hold --output_dir for the run: created and proven writable now (not at the final save, hours later),
    and refused while another live run holds it. A folder the run created and left empty is removed."""
    if not main_process:  # the main process alone writes, and holds the lock
        yield
        return
    created, lock = not output_dir.exists(), None
    try:
        lock = take_lock(output_dir)
        yield
    finally:
        if lock:
            lock.unlink(missing_ok=True)
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()


def take_lock(output_dir: Path) -> Path:
    """Create output_dir/.lora_nb.lock holding "pid@host". O_EXCL makes one of two runs starting together the
    winner; a lock whose process is gone (a killed run's) is taken over."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} is a file, not a folder")
    lock = output_dir / LOCK_NAME
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after taking over a dead run's lock
            try:
                descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                holder = lock_holder(lock)
                if holder:
                    raise RuntimeError(
                        f"--output_dir {output_dir} is in use by another run (process {holder}, see {lock}); "
                        "let it finish or choose another --output_dir. If no run uses it, delete that file."
                    ) from None
                lock.unlink(missing_ok=True)
        else:
            raise RuntimeError(f"--output_dir {output_dir}: another run took it just now ({lock})")
    except OSError as error:
        raise PermissionError(
            f"--output_dir {output_dir}: cannot write there ({error.strerror}); "
            "choose a folder you can write to"
        ) from None
    with os.fdopen(descriptor, "w") as f:
        f.write(f"{os.getpid()}@{socket.gethostname()}")
    return lock


def lock_holder(lock: Path) -> str | None:
    """Who holds a lock file ("pid@host"), if that run may still be alive; None for no lock or a dead run."""
    try:
        text = lock.read_text().strip()
    except FileNotFoundError:
        return None
    pid, _, host = text.partition("@")
    if not pid.isdigit():  # written by a run killed at once
        return None
    if host != socket.gethostname():  # another machine's run: it cannot be checked from here
        return text
    try:
        os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return None
    except PermissionError:  # it exists, under another user
        pass
    return text


# ---------------------------------------------------------------- validation and the model card


@torch.no_grad()
def sample_validation_images(
    config: TrainConfig, components: Components, accelerator, step: int, tag: str = "validation"
) -> list:
    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=accelerator.unwrap_model(components.text_encoder),
        tokenizer=components.tokenizer,
        unet=accelerator.unwrap_model(components.unet),
        scheduler=DPMSolverMultistepScheduler.from_config(components.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(config.seed or 0)
    with accelerator.autocast():
        images = pipe(
            config.validation_prompt,
            num_images_per_prompt=config.num_validation_images,
            num_inference_steps=25,
            generator=generator,
        ).images
    folder = Path(config.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"step-{step:06d}-{i}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images(
                tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC"
            )
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {tag: [wandb.Image(im, caption=config.validation_prompt) for im in images]}, step=step
            )
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
        license="creativeml-openrail-m"
        if "stable-diffusion" in config.pretrained_model_name_or_path
        else "apache-2.0",
        tags=[
            "stable-diffusion",
            "stable-diffusion-diffusers",
            "text-to-image",
            "diffusers",
            "lora",
            "diffusers-training",
            "lora_nb",
        ],
        inference=True,
    )
    settings = {
        k: v
        for k, v in asdict(config).items()
        if k not in ("hub_token", "show_progress") and v not in (None, False)
    }
    images = "\n".join(f"![{config.validation_prompt}](./{name})" for name in names)
    body = f"""
# LoRA text-to-image weights for {config.pretrained_model_name_or_path}

LoRA adaptation weights (rank {config.rank}, alpha {config.lora_alpha or config.rank}) for
`{config.pretrained_model_name_or_path}`, fine-tuned on `{config.train_data_dir or config.dataset_name}`
with [lora_nb](https://github.com/) for {result.global_step} steps. Final training loss:
{result.losses[-1] if result.losses else float("nan"):.4f}.

{"Samples for the prompt “" + config.validation_prompt + "”:" if names else ""}

{images}

## Use it

```python
from lora_nb import load_lora_pipeline
pipe = load_lora_pipeline("{config.hub_model_id or config.output_dir}")  # reads base_model from this card
image = pipe("{config.validation_prompt or "a prompt"}", num_inference_steps=25).images[0]
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

DIVERGED_ADVICE = "Lower --learning_rate, or use bf16 or fp32."


@dataclass
class Run:
    """One run's moving parts, as the loop, its checks and the checkpoints use them."""

    config: TrainConfig
    accelerator: Accelerator
    components: Components
    params: list[torch.nn.Parameter]  # what the optimiser updates
    trained: list[torch.nn.Module]  # the prepared models they live in
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader: torch.utils.data.DataLoader
    restore_other_rows: Callable[[], None] | None  # textual inversion: undo the update of every other word
    steps_per_epoch: int
    max_steps: int
    seed: int
    history: dict = field(default_factory=lambda: {"losses": [], "lrs": []})
    global_step: int = 0
    last_good: Path | None = None  # the newest checkpoint this run wrote, or resumed from
    loop_seconds: float = 0.0


def train(config: TrainConfig, dataset: TrainingSet | None = None) -> TrainResult:
    """Fine-tune on `config`'s data (or on `dataset`, a ready TrainingSet): set up, the loop, finish.

    Every flag is checked and --output_dir claimed before any weights load; nothing is saved unchecked.
    """
    check_config(config, needs_data=dataset is None)
    resume_from = find_resume_checkpoint(config)
    resolution = training_resolution(config) if dataset is None else None
    accelerator = make_accelerator(config)
    with claimed_output_dir(Path(config.output_dir), accelerator.is_main_process):
        seed = config.seed if config.seed is not None else 0
        if dataset is None:
            dataset = load_training_set(config, resolution, seed)
        run = prepare_run(config, dataset, accelerator, resume_from, seed)
        progress = tqdm(
            total=run.max_steps,
            initial=run.global_step,
            desc="steps",
            disable=not (accelerator.is_local_main_process and config.show_progress),
        )
        for model in run.trained:
            model.train()
        first_epoch = run.global_step // run.steps_per_epoch
        loop_start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            for epoch in range(first_epoch, math.ceil(run.max_steps / run.steps_per_epoch)):
                if run.global_step >= run.max_steps:  # resumed at the last step
                    break
                dataset.epoch = epoch
                run.loader.set_epoch(epoch)
                # On resume, the batches this epoch's finished steps used are skipped, not drawn again.
                skip = (run.global_step - epoch * run.steps_per_epoch) * config.gradient_accumulation_steps
                batches = accelerator.skip_first_batches(run.loader, skip) if skip > 0 else run.loader
                step_loss, micro = 0.0, 0
                for batch in batches:
                    torch.manual_seed(step_seed(run.seed, run.global_step, micro, accelerator.process_index))
                    step_loss += micro_step(run, batch) / config.gradient_accumulation_steps
                    micro += 1
                    if not accelerator.sync_gradients:  # still accumulating: the step is not complete
                        continue
                    run.global_step += 1
                    check_weights(run)
                    after_step(run, step_loss, progress)
                    step_loss, micro = 0.0, 0
                    if run.global_step >= run.max_steps:
                        break
                if (
                    validation_due(config, epoch + 1, config.validation_epochs)
                    and accelerator.is_main_process
                    and run.global_step < run.max_steps  # the last step's images are drawn by finish
                ):
                    sample_validation_images(config, run.components, accelerator, run.global_step)
        run.loop_seconds = time.perf_counter() - loop_start
        progress.close()
        return finish(run)


def make_accelerator(config: TrainConfig) -> Accelerator:
    # accelerate keeps one global state per process; a notebook that trains twice (say fp32, then bf16)
    # needs it cleared. The process group (PartialState) stays, so multi-process runs are unaffected.
    AcceleratorState._reset_state(reset_partial_state=False)
    # accelerate reads several CPU processes (torchrun without GPUs) as MULTI_CPU only when told cpu=True.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=training_precision(config, cpu),
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed or 0),
    )
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def trainable_parameters(config: TrainConfig, components: Components, resume_from: Path | None, seed: int):
    """What trains, per --finetune: LoRA factors (a checkpoint's, on resume), the target layers' own weights,
    or the new word's embedding. Returns (parameters, restore_other_rows or None)."""
    if config.placeholder_token:
        start = read_learned_embedding(config.learned_embedding)[1] if config.learned_embedding else None
        token_id = add_placeholder_token(
            components.tokenizer,
            components.text_encoder,
            config.placeholder_token,
            config.initializer_token,
            start,
        )
    restore_other_rows = None
    if config.finetune == "full":
        params = full_finetune_parameters(components.unet, config.target_modules)
    elif config.finetune == "embedding":
        restore_other_rows = train_only_rows(components.text_encoder.get_input_embeddings(), [token_id])
        params = [components.text_encoder.get_input_embeddings().weight]
    else:
        torch.manual_seed(seed)  # the A factors' initialisation
        variant = {"use_rslora": config.use_rslora, "use_dora": config.use_dora}
        options = (config.rank, config.lora_alpha, config.lora_dropout)
        inject_lora(components.unet, config.target_modules, *options, **variant)
        if config.train_text_encoder:
            inject_lora(components.text_encoder, config.text_encoder_target_modules, *options, **variant)
        if resume_from:
            text = {"text_encoder": components.text_encoder} if config.train_text_encoder else {}
            restore_lora(resume_from, {"unet": components.unet, **text})
        params = lora_parameters(components.unet) + lora_parameters(components.text_encoder)
    if config.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            components.text_encoder.gradient_checkpointing_enable()
    return params, restore_other_rows


def make_loader(config: TrainConfig, dataset, seed: int, num_processes: int) -> torch.utils.data.DataLoader:
    """Shuffled batches (accelerate shards them across processes and reseeds the shuffle per epoch); with
    --aspect_ratio_buckets, batches of one bucket each, shuffled per epoch by BucketBatches itself."""
    common = {"collate_fn": collate, "num_workers": config.dataloader_num_workers}
    if config.aspect_ratio_buckets:
        batches = BucketBatches(dataset, dataset.sizes, config.train_batch_size, seed, num_processes)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, **common)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        **common,
    )


def parameter_groups(config: TrainConfig, components: Components, params: list, lr_factor: float = 1):
    """AdamW's parameter groups, one per learning rate (each times ``lr_factor``, --scale_lr's).

    With neither --text_encoder_lr nor --loraplus_lr_ratio: one group, --learning_rate. The text encoder's
    LoRA learns at --text_encoder_lr. LoRA+ (Hayou et al. 2024; peft's create_loraplus_optimizer) puts
    every B factor at ratio x its model's rate, and DoRA's magnitudes with them: peft groups 1-D
    parameters with B, which are a Linear's magnitudes (a Conv2d's, (1, d_out, 1, 1), fall with A there
    by shape alone; here every magnitude goes with B). peft's separate groups for LoRA'd embeddings and
    for biases/LayerNorms without decay do not arise: LoRA here wraps Linear and Conv2d layers only,
    whose factors have no bias. --adam_weight_decay applies to every group, as in kohya (peft's
    loraplus_weight_decay, 0 by default, would replace it). The schedule scales every group alike.
    """
    if config.finetune != "lora" or not (config.loraplus_lr_ratio or config.text_encoder_lr):
        return [{"params": params, "lr": config.learning_rate * lr_factor}]
    text_lr = config.text_encoder_lr or config.learning_rate
    groups = []
    for model, lr in ((components.unet, config.learning_rate), (components.text_encoder, text_lr)):
        layers = [layer_parameters(layer) for layer in lora_layers(model).values()]  # [A, B, magnitude?]
        if config.loraplus_lr_ratio:
            a, b = [ps[0] for ps in layers], [p for ps in layers for p in ps[1:]]
            pairs = [(a, lr), (b, lr * config.loraplus_lr_ratio)]
        else:
            pairs = [([p for ps in layers for p in ps], lr)]
        groups += [{"params": ps, "lr": rate * lr_factor} for ps, rate in pairs if ps]
    return groups


PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(precision: str | None) -> torch.dtype:
    """The dtype the frozen parts are loaded in under accelerate's ``mixed_precision`` (fp32 for "no")."""
    return PRECISION_DTYPES.get(precision or "no", torch.float32)


def prepare_run(
    config: TrainConfig, dataset, accelerator: Accelerator, resume_from: Path | None, seed: int
) -> Run:
    """Load the model, make what trains, cache what stays frozen, and build the loader, optimiser and
    schedule (in a checkpoint's state, on resume)."""
    dtype = precision_dtype(accelerator.mixed_precision)
    components = load_components(config.pretrained_model_name_or_path, dtype, accelerator.device)
    params, restore_other_rows = trainable_parameters(config, components, resume_from, seed)
    text_trains = config.train_text_encoder or config.finetune == "embedding"
    cache = dataset.transform.center_crop if config.cache_latents is None else config.cache_latents
    with accelerator.autocast():
        dataset.cache(components, latents=cache, text=not text_trains, device=accelerator.device)

    loader = make_loader(config, dataset, seed, accelerator.num_processes)
    lr_factor = 1
    if config.scale_lr:
        lr_factor = config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        parameter_groups(config, components, params, lr_factor),
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    # accelerate steps a prepared scheduler once per process, hence the scaling (as diffusers does).
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    trained = [components.unet] + ([components.text_encoder] if text_trains else [])
    *trained, optimizer, loader, lr_scheduler = accelerator.prepare(*trained, optimizer, loader, lr_scheduler)
    components.unet = trained[0]
    if text_trains:
        components.text_encoder = trained[1]
    run = Run(
        config,
        accelerator,
        components,
        params,
        trained,
        optimizer,
        lr_scheduler,
        loader,
        restore_other_rows,
        steps_per_epoch,
        max_steps,
        seed,
    )
    if resume_from:
        resume(run, resume_from)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers(
            "lora_nb", config={k: str(v) for k, v in asdict(config).items() if k != "hub_token"}
        )
    return run


def resume(run: Run, checkpoint: Path) -> None:
    load_training_state(checkpoint, run.optimizer, run.lr_scheduler, run.accelerator.scaler)
    where = checkpoint / "trainer_state.json"
    saved = read_json(where.read_text(), str(where))
    run.global_step = saved.pop("global_step")
    run.history, run.last_good = saved, checkpoint
    if run.global_step > run.max_steps:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} is at step {run.global_step}, past "
            f"--max_train_steps {run.max_steps}; give more steps"
        )


def validation_due(config: TrainConfig, count: int, every: int | None) -> bool:
    """Whether validation images are due after ``count`` steps or epochs, drawn ``every`` so many."""
    return bool(config.validation_prompt and every and count % every == 0)


def micro_step(run: Run, batch: dict) -> float:
    """Forward and backward on one micro-batch; the optimiser steps when accelerate says the accumulation is
    complete. Returns the loss, averaged over the processes."""
    accelerator, components, config = run.accelerator, run.components, run.config
    with accelerator.accumulate(*run.trained):
        latents = batch_latents(batch, components, accelerator.device)
        per_example = denoising_loss(
            components.unet,
            components.scheduler,
            latents,
            batch_text(batch, components, accelerator.device),
            prediction_type=config.prediction_type,
            snr_gamma=config.snr_gamma,
            noise_offset=config.noise_offset,
            reduce=False,
        )
        loss = (per_example * batch["weight"].to(per_example.device)).sum() / batch["items"]
        mean_loss = accelerator.gather(loss.detach()).mean().item()
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(
                f"loss is {mean_loss} at step {run.global_step + 1}; stopped. Last good "
                f"checkpoint: {run.last_good or 'none'}. {DIVERGED_ADVICE}"
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(run.params, config.max_grad_norm)
        run.optimizer.step()
        if run.restore_other_rows:
            run.restore_other_rows()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return mean_loss


def check_weights(run: Run) -> None:
    """Stop before a NaN or inf weight can be saved. The loss is checked before each update; the update
    itself can still poison the weights (a finite loss, a huge step), so they are checked after it too."""
    if not torch.stack([torch.isfinite(p).all() for p in run.params]).all():
        raise TrainingDiverged(
            f"the update of step {run.global_step} made weights NaN or inf; stopped before "
            f"saving them. Last good checkpoint: {run.last_good or 'none'}. {DIVERGED_ADVICE}"
        )


def after_step(run: Run, step_loss: float, progress) -> None:
    """Record a finished step; write a checkpoint and draw validation images when they are due."""
    config, accelerator, step = run.config, run.accelerator, run.global_step
    run.history["losses"].append(step_loss)
    run.history["lrs"].append(run.lr_scheduler.get_last_lr()[0])
    progress.update(1)
    progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{run.history['lrs'][-1]:.2e}")
    accelerator.log({"train_loss": step_loss, "lr": run.history["lrs"][-1]}, step=step)
    if not accelerator.is_main_process or step >= run.max_steps:
        return  # the main process alone writes; the last step's results are saved by finish
    if config.checkpointing_steps and step % config.checkpointing_steps == 0:
        run.last_good = save_checkpoint(run)
    if validation_due(config, step, config.validation_steps):
        sample_validation_images(config, run.components, accelerator, step)


def finish(run: Run) -> TrainResult:
    """Save the adapter (or the full weights, or the new word), the final validation images and the card."""
    config, accelerator, components = run.config, run.accelerator, run.components
    output_dir = Path(config.output_dir)
    accelerator.wait_for_everyone()
    result = TrainResult(
        output_dir,
        run.history["losses"],
        run.history["lrs"],
        run.global_step,
        unet=accelerator.unwrap_model(components.unet),
        text_encoder=accelerator.unwrap_model(components.text_encoder),
        loop_seconds=run.loop_seconds,
    )
    if accelerator.is_main_process:
        if config.finetune == "full":
            result.unet_path = output_dir / "unet"
            result.unet.save_pretrained(result.unet_path)
        if config.placeholder_token:
            result.embedding_path = save_learned_embedding(
                output_dir, components.tokenizer, result.text_encoder, config.placeholder_token
            )
        if config.finetune == "lora":
            result.lora_path = save_unwrapped_lora(output_dir, components, accelerator)
        if config.validation_prompt:
            result.validation_images = sample_validation_images(
                config, components, accelerator, run.global_step, tag="test"
            )
    if accelerator.is_main_process and config.finetune == "lora":
        write_model_card(config, result, result.validation_images)
        if config.push_to_hub:
            from huggingface_hub import upload_folder

            upload_folder(
                repo_id=config.hub_model_id or output_dir.name,
                folder_path=output_dir,
                ignore_patterns=["checkpoint-*", ".checkpoint-*", "logs/*", LOCK_NAME],
                token=config.hub_token,
            )
    accelerator.end_training()
    return result


# ---------------------------------------------------------------- the command line


def main(config: TrainConfig | None = None) -> None:
    """The command line; `config` is what it parsed (parsed here from sys.argv when None)."""
    result = train(config or config_from_args(description=__doc__))
    if result.lora_path and result.lora_path.exists():  # the main process saves it; the others print nothing
        print(
            f"wrote {result.lora_path} ({result.lora_path.stat().st_size / 1e6:.2f} MB) after "
            f"{result.global_step} steps; final loss {result.losses[-1]:.4f}"
        )


if __name__ == "__main__":
    main(COMMAND_LINE)
