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
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ..config import TrainConfig
from ..data import CaptionedImages, ImageTransform, load_captioned_dataset
from ..formats import load_lora_weights
from ..inference import load_base_pipeline, sample_images
from ..inject import TARGET_SETS, TEXT_ENCODER_ATTENTION, Targets, count_parameters, find_targets, remove_lora
from ..sizes import adapter_size
from ..train import TrainResult, train, training_resolution
from .evaluate import HeldOut

BASE = "base model"
PLAIN = "LoRA"
# Variants of LoRA, as trainer settings ("target_set" replaces the run's): what notebook 8 compares.
VARIANTS = {
    PLAIN: {},
    "rsLoRA": {"use_rslora": True},
    "DoRA": {"use_dora": True},
    "LoRA+": {"loraplus_lr_ratio": 16.0},
    "LoCon": {"target_set": "attention+conv"},
}


def full_label(target_set: str) -> str:
    return f"{target_set} (full fine-tune)"


def run_label(row: Mapping) -> str:
    """A short name for a row: "attention r4", "attention r4 DoRA", "attention (full)", "base model"."""
    if row["method"] == "lora":
        variant = "" if row["variant"] == PLAIN else f" {row['variant']}"
        return f"{row['targets']} r{row['rank']}{variant}"
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
    variants: Mapping[str, Mapping] | None = None,
    max_train_steps: int = 40,
    train_batch_size: int = 8,
    learning_rate: float = 1e-3,
    full_learning_rate: float = 3e-4,
    heldout: int = 30,
    max_train_samples: int | None = None,
    heldout_repeats: int = 2,
    eval_batch_size: int = 32,
    prompt: str = "a drawing of a green creature with red eyes and pointy ears",
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
    trains as the reference (None: no reference run). ``variants`` ({name: trainer settings}, e.g.
    ``{"LoRA": {}, "DoRA": {"use_dora": True}}``; VARIANTS has more) trains each (target set, rank) once
    per variant with those settings on top, a "target_set" among them replacing the run's; by default
    plain LoRA once. ``train_settings`` go to TrainConfig as they are
    (resolution, mixed_precision, gradient_accumulation_steps, gradient_checkpointing, lr_scheduler, ...);
    crops are centred and flips random unless they say otherwise. ``dtype``/``device`` are those of the
    pipeline that measures (default: fp32 on the CPU).

    Returns one dict per run, the base model first: targets, method ("base", "lora" or "full"), rank,
    variant, layers, params (trainable), fp32_bytes and fp16_bytes (the adapter file; a full fine-tune's
    changed weights, dense), file_bytes (the file on disk, LoRA only), heldout_loss, train_loss (mean of
    the last quarter of the steps), losses, seconds (the whole run), step_seconds (the loop's wall time
    per step: no loading, caching or saving), image (PIL), path.
    """
    variants = dict(variants or {PLAIN: {}})
    _check_targets(ranks, full_finetune, variants)
    settings = {  # what every run trains with; a run adds its targets, rank and folder
        "pretrained_model_name_or_path": str(base_model),
        "train_batch_size": train_batch_size,
        "max_train_steps": max_train_steps,
        "learning_rate": learning_rate,
        "seed": seed,
        "checkpointing_steps": 0,
        "show_progress": False,
        "center_crop": True,
        "random_flip": True,
        **train_settings,
    }
    sweep = _prepare(
        dataset,
        settings,
        heldout=heldout,
        max_train_samples=max_train_samples,
        heldout_repeats=heldout_repeats,
        eval_batch_size=eval_batch_size,
        prompt=prompt,
        num_inference_steps=num_inference_steps,
        output_dir=Path(output_dir),
        device=device,
        dtype=dtype,
        verbose=verbose,
    )
    rows = [sweep.report(_base_row(sweep))]
    for name, target_ranks in ranks.items():
        for rank in target_ranks:
            for variant, extra in variants.items():
                extra = dict(extra)
                target_set = extra.pop("target_set", name)
                rows.append(sweep.report(_lora_run(sweep, target_set, rank, variant, extra)))
    if full_finetune:
        rows.append(sweep.report(_full_reference(sweep, full_finetune, full_learning_rate)))
    return rows


def _check_targets(
    ranks: Mapping[str, Sequence[int]], full_finetune: str | None, variants: Mapping[str, Mapping]
) -> None:
    named = (
        set(ranks)
        | {full_finetune} - {None}
        | {v["target_set"] for v in variants.values() if "target_set" in v}
    )
    unknown = sorted(named - set(TARGET_SETS))
    if unknown:
        raise ValueError(f"unknown target set(s) {unknown}; choose from {list(TARGET_SETS)}")
    if any(rank < 1 for values in ranks.values() for rank in values):
        raise ValueError(f"ranks must be positive integers, got {dict(ranks)}")


def _split(data, heldout: int, max_train_samples: int | None) -> tuple:
    """(the examples to train on, the held-out ones): the last ``heldout`` are held out."""
    if not 0 < heldout < len(data):
        raise ValueError(
            f"heldout={heldout}: keep at least one example out, and one to train on ({len(data)})"
        )
    train_size = len(data) - heldout
    if max_train_samples:
        train_size = min(train_size, max_train_samples)
    return data.select(range(train_size)), data.select(range(len(data) - heldout, len(data)))


def _prepare(
    dataset,
    settings: dict,
    *,
    heldout: int,
    max_train_samples: int | None,
    heldout_repeats: int,
    eval_batch_size: int,
    prompt: str,
    num_inference_steps: int,
    output_dir: Path,
    device,
    dtype,
    verbose: bool,
) -> _Sweep:
    """Everything the runs share: the examples (their latents and text cached once, for every run), the
    held-out set with its fixed noise, and the base pipeline that measures each run."""
    settings = dict(settings)
    image_column = settings.pop("image_column", "image")
    caption_column = settings.pop("caption_column", "text")
    data = load_captioned_dataset(dataset, image_column, caption_column)
    trained_part, held = _split(data, heldout, max_train_samples)
    config = TrainConfig(**settings)
    seed = config.seed
    transform = ImageTransform(training_resolution(config), config.center_crop, config.random_flip)
    examples = SharedCache(trained_part[image_column], trained_part[caption_column], transform, seed)
    pipe = load_base_pipeline(config.pretrained_model_name_or_path, dtype=dtype, device=device)
    held_out = HeldOut(pipe, held[image_column], held[caption_column], seed, heldout_repeats, eval_batch_size)
    return _Sweep(
        pipe, held_out, examples, settings, output_dir, prompt, num_inference_steps, seed, device, verbose
    )


@dataclass
class _Sweep:
    """What every run of a sweep shares: the pipeline that measures, the held-out set, the training
    examples, and the settings every run trains with (a run overrides some)."""

    pipe: StableDiffusionPipeline
    held_out: HeldOut
    examples: SharedCache
    settings: dict
    output_dir: Path
    prompt: str
    num_inference_steps: int
    seed: int
    device: str | torch.device | None
    verbose: bool

    def train(self, folder: str, **overrides) -> tuple[TrainResult, float]:
        """One run with the shared settings and ``overrides``, into ``output_dir/folder``: (result, seconds).

        The overrides are checked whole (TrainConfig's own checks) before anything trains."""
        config = TrainConfig(**{**self.settings, **overrides, "output_dir": str(self.output_dir / folder)})
        start = time.time()
        result = train(config, dataset=self.examples)
        return result, time.time() - start

    def measure(self) -> tuple[float, object]:
        """The pipeline's held-out loss, and its image of the prompt from the sweep's seed."""
        loss = self.held_out.loss(self.pipe)
        image = sample_images(
            self.pipe, self.prompt, seed=self.seed, num_inference_steps=self.num_inference_steps
        )
        return loss, image[0]

    def report(self, row: dict) -> dict:
        if self.verbose:
            size = f"{row['fp16_bytes'] / 1e3:10,.1f} kB fp16" if row["params"] else " " * 18
            print(
                f"{run_label(row):>34}: {row['params']:>11,} params {size}   held-out loss "
                f"{row['heldout_loss']:.4f}   ({row['seconds']:.1f} s)",
                flush=True,
            )
        return row


def _row(
    targets: str,
    method: str,
    loss: float,
    image,
    *,
    rank: int | None = None,
    layers: int = 0,
    params: int = 0,
    fp32_bytes: int = 0,
    fp16_bytes: int = 0,
    file_bytes: int | None = None,
    losses: Sequence[float] = (),
    seconds: float = 0.0,
    step_seconds: float | None = None,
    variant: str | None = None,
    path: Path | None = None,
) -> dict:
    """One row of the sweep; the defaults are those of a run that trained nothing (the base model)."""
    return {
        "targets": targets,
        "method": method,
        "variant": variant,
        "rank": rank,
        "layers": layers,
        "params": params,
        "fp32_bytes": fp32_bytes,
        "fp16_bytes": fp16_bytes,
        "file_bytes": file_bytes,
        "heldout_loss": loss,
        "train_loss": _tail_mean(losses),
        "losses": list(losses),
        "seconds": seconds,
        "step_seconds": step_seconds,
        "image": image,
        "path": path,
    }


def _base_row(sweep: _Sweep) -> dict:
    return _row(BASE, "base", *sweep.measure())


def _lora_run(sweep: _Sweep, target_set: str, rank: int, variant: str, settings: Mapping) -> dict:
    """Train a rank-``rank`` LoRA (of ``variant``: trainer ``settings`` on top of the sweep's) on
    ``target_set``; measure its saved file on the base pipeline, then take it off again."""
    pipe = sweep.pipe
    targets, text = TARGET_SETS[target_set]
    parts = {"unet": (pipe.unet, targets)}
    if text:
        parts["text_encoder"] = (pipe.text_encoder, TEXT_ENCODER_ATTENTION)
    # Sizes first: the arithmetic needs the base model without LoRA layers in it.
    shape = {key: settings.get(key, False) for key in ("use_dora", "use_rslora")}
    fp32, fp16 = (adapter_size(parts, rank, dtype=d, **shape) for d in ("fp32", "fp16"))
    folder = f"{_slug(target_set)}-r{rank}" + ("" if variant == PLAIN else f"-{_slug(variant)}")
    result, seconds = sweep.train(
        folder, target_modules=targets, train_text_encoder=text, rank=rank, **settings
    )
    step_seconds = result.loop_seconds / max(1, result.global_step)
    params = count_parameters(result.unet)[0] + count_parameters(result.text_encoder)[0]
    path, losses = result.lora_path, result.losses
    del result
    _free(sweep.device)
    # Measured as it would be used: the saved file put on the unchanged base pipeline.
    load_lora_weights(path, unet=pipe.unet, text_encoder=pipe.text_encoder if text else None)
    try:
        loss, image = sweep.measure()
    finally:
        remove_lora(pipe.unet)
        remove_lora(pipe.text_encoder)
    return _row(
        target_set,
        "lora",
        loss,
        image,
        rank=rank,
        layers=fp32.layers,
        params=params,
        fp32_bytes=fp32.file_bytes,
        fp16_bytes=fp16.file_bytes,
        file_bytes=path.stat().st_size,
        losses=losses,
        seconds=seconds,
        step_seconds=step_seconds,
        variant=variant,
        path=path,
    )


def _full_reference(sweep: _Sweep, target_set: str, lr: float) -> dict:
    """Train the target layers' own weights; measure them copied into the base pipeline, then put it back."""
    unet = sweep.pipe.unet
    targets, _ = TARGET_SETS[target_set]
    layers = len(find_targets(unet, targets))
    result, seconds = sweep.train(
        f"{_slug(target_set)}-full", finetune="full", target_modules=targets, learning_rate=lr
    )
    changed = {name: p.detach() for name, p in result.unet.named_parameters() if p.requires_grad}
    params = sum(p.numel() for p in changed.values())
    originals = {name: unet.get_parameter(name).detach().clone() for name in changed}
    with torch.no_grad():
        for name, p in changed.items():
            unet.get_parameter(name).copy_(p)
    losses, path = result.losses, result.unet_path
    step_seconds = result.loop_seconds / max(1, result.global_step)
    del result, changed
    _free(sweep.device)
    try:
        loss, image = sweep.measure()
    finally:
        with torch.no_grad():
            for name, p in originals.items():
                unet.get_parameter(name).copy_(p)
    return _row(
        full_label(target_set),
        "full",
        loss,
        image,
        layers=layers,
        params=params,
        fp32_bytes=4 * params,
        fp16_bytes=2 * params,
        losses=losses,
        seconds=seconds,
        step_seconds=step_seconds,
        path=path,
    )


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
    """The sweep as a Markdown table, one line per run, with the held-out loss's change from the base
    model."""
    base = next((r["heldout_loss"] for r in rows if r["method"] == "base"), None)
    lines = [
        (
            "| run | rank | layers | trainable params | fp32 file | fp16 file | held-out loss | vs base "
            "| time / step |"
        ),
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        change = f"{r['heldout_loss'] / base - 1:+.1%}" if base and r["method"] != "base" else ""
        sizes = (
            f"{format_bytes(r['fp32_bytes'])} | {format_bytes(r['fp16_bytes'])}" if r["params"] else "– | –"
        )
        name = r["targets"] if r.get("variant") in (None, PLAIN) else f"{r['targets']} ({r['variant']})"
        step = f"{1e3 * r['step_seconds']:.0f} ms" if r.get("step_seconds") else "–"
        lines.append(
            f"| {name} | {r['rank'] or '–'} | {r['layers']} | {r['params']:,} | {sizes} "
            f"| {r['heldout_loss']:.4f} | {change} | {step} |"
        )
    return "\n".join(lines)
