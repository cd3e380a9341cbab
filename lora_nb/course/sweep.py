"""A rank sweep: one LoRA per (target set, rank), trained alike and measured alike.

Every run starts from the same base model and sees the same examples in the same order, with the same noise
and timesteps at every step (the trainer draws them from the seed and the step number), so two runs differ
only in which layers carry an adapter and how large it is. Each run is then measured the same way:

- trainable parameters, counted on the trained model;
- its file: the fp32 safetensors on disk, and the fp16 size by exact arithmetic (``lora_nb.sizes``);
- the held-out denoising loss on examples no run trained on (the same noise for every model);
- one image for the same prompt from the same seed.

A full fine-tune of the same layers is the reference: it trains their own weights, so its "file" is every
number it changed, stored dense.

    rows = run_sweep("data/tiny-sd", "data/creatures", {"attention": [1, 4, 16], "cross-attention": [4]})
    print(sweep_table(rows))
"""

from __future__ import annotations

import gc
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data import CaptionedImages, ImageTransform, load_captioned_dataset
from ..formats import load_lora_weights
from ..inference import load_base_pipeline
from ..inject import TARGET_SETS, TEXT_ENCODER_ATTENTION, Targets, count_parameters, find_targets, remove_lora
from ..sizes import adapter_size
from ..train import train, training_resolution
from .evaluate import HeldOut

BASE = "base model"


def full_label(target_set: str) -> str:
    return f"{target_set} (full fine-tune)"


def run_label(row: Mapping) -> str:
    """A short name for a row: "attention r4", "attention (full)", "base model"."""
    if row["method"] == "lora":
        return f"{row['targets']} r{row['rank']}"
    return row["targets"].replace("full fine-tune", "full")


def meta_parts(base_model: str | Path, target_set: str) -> dict[str, tuple[torch.nn.Module, Targets]]:
    """``base_model``'s UNet (and text encoder, if the target set trains it) on the meta device, with its
    targets: what ``sizes.adapter_size`` measures, from the configs alone (no weights are read)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    targets, text = TARGET_SETS[target_set]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(base_model, subfolder="unet")
        )
        parts = {"unet": (unet, targets)}
        if text:
            config = CLIPTextConfig.from_pretrained(base_model, subfolder="text_encoder")
            parts["text_encoder"] = (CLIPTextModel(config), TEXT_ENCODER_ATTENTION)
    return parts


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _free(device) -> None:
    if str(device).startswith("cuda"):  # the next run needs the memory the last one held
        gc.collect()
        torch.cuda.empty_cache()


class SharedCache(CaptionedImages):
    """The training set every run of a sweep uses. The VAE and (unless a run trains it) the text encoder are
    frozen and the same in every run, so their outputs are computed by the first run that asks and reused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kept_latents = self._kept_text = None

    def cache(self, components, latents: bool, text: bool, device, batch_size: int = 32) -> None:
        need_latents, need_text = latents and self._kept_latents is None, text and self._kept_text is None
        super().cache(components, latents=need_latents, text=need_text, device=device, batch_size=batch_size)
        if need_latents:
            self._kept_latents = self.latents
        if need_text:
            self._kept_text = self.text_embeddings
        self.latents = self._kept_latents if latents else None
        self.text_embeddings = self._kept_text if text else None


def run_sweep(
    base_model: str | Path,
    dataset: str | Path,
    ranks: Mapping[str, Sequence[int]],
    *,
    full_finetune: str | None = "attention",
    max_train_steps: int = 40,
    train_batch_size: int = 8,
    learning_rate: float = 1e-3,
    full_learning_rate: float = 3e-4,
    heldout: int = 30,
    max_train_samples: int | None = None,
    heldout_repeats: int = 2,
    eval_batch_size: int = 32,
    prompt: str = "a drawing of a green creature with red eyes",
    num_inference_steps: int = 25,
    seed: int = 0,
    output_dir: str | Path = "sweep",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    verbose: bool = True,
    **train_settings,
) -> list[dict]:
    """Train and measure one adapter per (target set, rank) in ``ranks``, plus the references.

    ``ranks`` maps names in TARGET_SETS to the ranks to train them at, e.g. {"attention": [1, 4, 16]}.
    The data set's last ``heldout`` examples are never trained on; the first ``max_train_samples`` of the
    rest are (all of them with None). ``full_finetune`` names the target set whose layers a full fine-tune
    trains as the reference (None: no reference run). ``train_settings`` go to TrainConfig as they are
    (resolution, mixed_precision, gradient_accumulation_steps, gradient_checkpointing, lr_scheduler, ...);
    crops are centred and flips random unless they say otherwise. ``dtype``/``device`` are those of the
    pipeline that measures (default: fp32 on the CPU).

    Returns one dict per run, the base model first: targets, method ("base", "lora" or "full"), rank,
    layers, params (trainable), fp32_bytes and fp16_bytes (the adapter file; a full fine-tune's changed
    weights, dense), file_bytes (the file on disk, LoRA only), heldout_loss, train_loss (mean of the last
    quarter of the steps), losses, seconds, image (PIL), path.
    """
    unknown = sorted(set(ranks) - set(TARGET_SETS) | ({full_finetune} - set(TARGET_SETS) - {None}))
    if unknown:
        raise ValueError(f"unknown target set(s) {unknown}; choose from {list(TARGET_SETS)}")
    if any(rank < 1 for values in ranks.values() for rank in values):
        raise ValueError(f"ranks must be positive integers, got {dict(ranks)}")
    output_dir = Path(output_dir)
    image_column = train_settings.pop("image_column", "image")
    caption_column = train_settings.pop("caption_column", "text")
    train_settings = {"center_crop": True, "random_flip": True, **train_settings}

    data = load_captioned_dataset(dataset, image_column, caption_column)
    if not 0 < heldout < len(data):
        raise ValueError(
            f"heldout={heldout}: keep at least one example out, and one to train on ({len(data)})"
        )
    train_size = len(data) - heldout
    if max_train_samples:
        train_size = min(train_size, max_train_samples)
    trained_part = data.select(range(train_size))
    held = data.select(range(len(data) - heldout, len(data)))
    held_images, held_captions = held[image_column], held[caption_column]

    def config(**overrides) -> TrainConfig:
        return TrainConfig(
            **{
                "pretrained_model_name_or_path": str(base_model),
                "train_batch_size": train_batch_size,
                "max_train_steps": max_train_steps,
                "learning_rate": learning_rate,
                "seed": seed,
                "checkpointing_steps": 0,
                "show_progress": False,
                **train_settings,
                **overrides,
            }
        )

    settings = config()
    transform = ImageTransform(training_resolution(settings), settings.center_crop, settings.random_flip)
    examples = SharedCache(trained_part[image_column], trained_part[caption_column], transform, seed)

    pipe = load_base_pipeline(base_model, dtype=dtype, device=device)
    held_out = HeldOut(pipe, held_images, held_captions, seed, heldout_repeats, eval_batch_size)

    def measure() -> tuple[float, object]:
        loss = held_out.loss(pipe)
        image = pipe(
            prompt, num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed)
        ).images[0]
        return loss, image

    def report(row: dict) -> dict:
        if verbose:
            size = f"{row['fp16_bytes'] / 1e3:10,.1f} kB fp16" if row["params"] else " " * 18
            print(
                f"{run_label(row):>34}: {row['params']:>11,} params {size}   held-out loss "
                f"{row['heldout_loss']:.4f}   ({row['seconds']:.1f} s)",
                flush=True,
            )
        return row

    loss, image = measure()
    rows = [
        report(
            {
                "targets": BASE,
                "method": "base",
                "rank": None,
                "layers": 0,
                "params": 0,
                "fp32_bytes": 0,
                "fp16_bytes": 0,
                "file_bytes": None,
                "heldout_loss": loss,
                "train_loss": None,
                "losses": [],
                "seconds": 0.0,
                "image": image,
                "path": None,
            }
        )
    ]

    for name, target_ranks in ranks.items():
        targets, text = TARGET_SETS[name]
        parts = {"unet": (pipe.unet, targets)}
        if text:
            parts["text_encoder"] = (pipe.text_encoder, TEXT_ENCODER_ATTENTION)
        for rank in target_ranks:
            # Sizes first: the arithmetic needs the base model without LoRA layers in it.
            fp32, fp16 = (adapter_size(parts, rank, dtype=d) for d in ("fp32", "fp16"))
            start = time.time()
            result = train(
                config(
                    target_modules=targets,
                    train_text_encoder=text,
                    rank=rank,
                    output_dir=str(output_dir / f"{_slug(name)}-r{rank}"),
                ),
                dataset=examples,
            )
            seconds = time.time() - start
            params = count_parameters(result.unet)[0] + count_parameters(result.text_encoder)[0]
            path, losses = result.lora_path, result.losses
            del result
            _free(device)
            # Measured as it would be used: the saved file put on the unchanged base pipeline.
            load_lora_weights(path, unet=pipe.unet, text_encoder=pipe.text_encoder if text else None)
            try:
                loss, image = measure()
            finally:
                remove_lora(pipe.unet)
                remove_lora(pipe.text_encoder)
            rows.append(
                report(
                    {
                        "targets": name,
                        "method": "lora",
                        "rank": rank,
                        "layers": fp32.layers,
                        "params": params,
                        "fp32_bytes": fp32.file_bytes,
                        "fp16_bytes": fp16.file_bytes,
                        "file_bytes": path.stat().st_size,
                        "heldout_loss": loss,
                        "train_loss": _tail_mean(losses),
                        "losses": losses,
                        "seconds": seconds,
                        "image": image,
                        "path": path,
                    }
                )
            )

    if full_finetune:
        rows.append(
            report(
                _full_reference(
                    pipe, config, full_finetune, full_learning_rate, output_dir, measure, examples, device
                )
            )
        )
    return rows


def _full_reference(
    pipe, config, target_set: str, lr: float, output_dir: Path, measure, examples, device
) -> dict:
    """Train the target layers' own weights; measure them copied into the base pipeline, then put it back."""
    targets, _ = TARGET_SETS[target_set]
    layers = len(find_targets(pipe.unet, targets))
    start = time.time()
    result = train(
        config(
            finetune="full",
            target_modules=targets,
            learning_rate=lr,
            output_dir=str(output_dir / f"{_slug(target_set)}-full"),
        ),
        dataset=examples,
    )
    seconds = time.time() - start
    changed = {name: p.detach() for name, p in result.unet.named_parameters() if p.requires_grad}
    params = sum(p.numel() for p in changed.values())
    originals = {name: pipe.unet.get_parameter(name).detach().clone() for name in changed}
    with torch.no_grad():
        for name, p in changed.items():
            pipe.unet.get_parameter(name).copy_(p)
    losses, path = result.losses, result.unet_path
    del result, changed
    _free(device)
    try:
        loss, image = measure()
    finally:
        with torch.no_grad():
            for name, p in originals.items():
                pipe.unet.get_parameter(name).copy_(p)
    return {
        "targets": full_label(target_set),
        "method": "full",
        "rank": None,
        "layers": layers,
        "params": params,
        "fp32_bytes": 4 * params,
        "fp16_bytes": 2 * params,
        "file_bytes": None,
        "heldout_loss": loss,
        "train_loss": _tail_mean(losses),
        "losses": losses,
        "seconds": seconds,
        "image": image,
        "path": path,
    }


def _tail_mean(losses: Sequence[float]) -> float | None:
    """Mean training loss over the last quarter of the steps (a single step's loss is too noisy)."""
    tail = list(losses)[-max(1, len(losses) // 4) :]
    return sum(tail) / len(tail) if tail else None


def format_bytes(n: float) -> str:
    """1234 -> "1.23 kB"; powers of 1000, as the hub counts."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def sweep_table(rows: Sequence[Mapping]) -> str:
    """The sweep as a Markdown table, one line per run, with the held-out loss's change from the base model."""
    base = next((r["heldout_loss"] for r in rows if r["method"] == "base"), None)
    lines = [
        "| run | rank | layers | trainable params | fp32 file | fp16 file | held-out loss | vs base |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        change = f"{r['heldout_loss'] / base - 1:+.1%}" if base and r["method"] != "base" else ""
        sizes = (
            f"{format_bytes(r['fp32_bytes'])} | {format_bytes(r['fp16_bytes'])}" if r["params"] else "– | –"
        )
        lines.append(
            f"| {r['targets']} | {r['rank'] or '–'} "
            f"| {r['layers']} | {r['params']:,} | {sizes} | {r['heldout_loss']:.4f} | {change} |"
        )
    return "\n".join(lines)
