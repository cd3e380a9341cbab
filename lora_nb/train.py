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

Checkpoints, resuming and the output folder's lock are in checkpoints.py; validation images and the
model card in card.py.
"""

from __future__ import annotations

from .config import TrainConfig, config_from_args

if __name__ == "__main__":  # now: a mistyped flag is reported at once, not after seconds of imports
    COMMAND_LINE = config_from_args(description=__doc__)

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from .card import sample_validation_images, write_model_card
from .checkpoints import (
    LOCK_NAME,
    claimed_output_dir,
    find_resume_checkpoint,
    load_training_state,
    restore_lora,
    save_checkpoint,
    save_unwrapped_lora,
)
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
from .formats import read_json
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


DIVERGED_ADVICE = "Lower --learning_rate, or use bf16 or fp32."
# Where AdamW runs fused: one kernel over every tensor, not a loop over the hundreds of small LoRA factors
# (on two CPU cores about 15 % of a LoRA step on the tiny UNet).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler


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


# ---------------------------------------------------------------- the run: setup, the loop, finish


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
        fused=accelerator.device.type in FUSED_ADAMW_DEVICES,
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


def validation_due(config: TrainConfig, count: int, every: int | None) -> bool:
    """Whether validation images are due after ``count`` steps or epochs, drawn ``every`` so many."""
    return bool(config.validation_prompt and every and count % every == 0)


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


# ---------------------------------------------------------------- what trains: parameters, loader, optimiser


PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def precision_dtype(precision: str | None) -> torch.dtype:
    """The dtype the frozen parts are loaded in under accelerate's ``mixed_precision`` (fp32 for "no")."""
    return PRECISION_DTYPES.get(precision or "no", torch.float32)


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


def full_finetune_parameters(unet: UNet2DConditionModel, target_modules) -> list[torch.nn.Parameter]:
    """The target layers' own weights and biases, made trainable and fp32 (the full fine-tune reference)."""
    params = []
    for name in find_targets(unet, target_modules):
        layer = unet.get_submodule(name).float()
        params += [p.requires_grad_(True) for p in layer.parameters()]
    return params


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
