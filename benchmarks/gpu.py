"""GPU only: a LoRA training step of an SD-1.5-shaped UNet at 512 px, batch 1, fp16 autocast.

The UNet is built from SD 1.5's config (``lora_nb/configs/sd15_unet.json``) with random weights (nothing is
downloaded), frozen in fp16; ``inject_lora`` adds rank-4 fp32 factors on to_q, to_k, to_v, to_out.0 (the
blog's setting); a 64x64x4 latent (512 px) and a 77x768 text embedding stand in for a batch. One step =
``denoising_loss`` under ``torch.autocast(float16)``, GradScaler backward, unscale, clip, AdamW step: what
``lora_nb.train`` does per step with ``--mixed_precision fp16``. Measured with and without gradient
checkpointing: steps/s over timed windows after warm-up, and the peak of ``torch.cuda.max_memory_allocated``
(weights included). Without CUDA the section is skipped and says so.
"""

from __future__ import annotations

import gc
import time

import torch

from .common import Section, Settings, Stat

RANK = 4


def build_unet(device: str, config: dict | None = None):
    from diffusers import UNet2DConditionModel

    from lora_nb.inject import UNET_ATTENTION, inject_lora
    from lora_nb.sizes import load_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config or load_config("sd15", "unet"))
    unet.to(device, torch.float16).requires_grad_(False)
    inject_lora(unet, UNET_ATTENTION, rank=RANK)  # fp32 factors on the fp16 base
    return unet


def lora_training_step(unet, device: str, latent_size: int, text_width: int, batch: int = 1):
    """A closure running one fp16-autocast LoRA training step, as lora_nb.train does with fp16."""
    from diffusers import DDPMScheduler

    from lora_nb.course.tiny import SCHEDULER_CONFIG
    from lora_nb.inject import lora_parameters
    from lora_nb.objective import denoising_loss

    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)  # SD 1.5's noise schedule
    params = lora_parameters(unet)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device)
    generator = torch.Generator(device).manual_seed(0)
    latents = torch.randn(
        batch, 4, latent_size, latent_size, generator=generator, device=device, dtype=torch.float16
    )
    text = torch.randn(batch, 77, text_width, generator=generator, device=device, dtype=torch.float16)
    unet.train()

    def step() -> float:
        with torch.autocast(device, dtype=torch.float16):
            loss = denoising_loss(unet, scheduler, latents, text)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def first_step_checked() -> None:
        """One step, checking every LoRA factor got a gradient (checkpointing must not lose them)."""
        with torch.autocast(device, dtype=torch.float16):
            loss = denoising_loss(unet, scheduler, latents, text)
        scaler.scale(loss).backward()
        missing = sum(p.grad is None for p in params)
        if missing:
            raise AssertionError(f"{missing} of {len(params)} LoRA factors got no gradient")
        optimizer.zero_grad(set_to_none=True)

    return step, first_step_checked


def measure(
    checkpointing: bool,
    settings: Settings,
    device: str = "cuda",
    config: dict | None = None,
    latent_size: int = 64,
    text_width: int = 768,
) -> tuple[Stat, float, float]:
    """(seconds per step over timed windows, peak bytes allocated, bytes of weights before the first step)."""
    unet = build_unet(device, config)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() if cuda else 0.0
    step, first_step_checked = lora_training_step(unet, device, latent_size, text_width)
    first_step_checked()
    warmup, steps = (3, 5) if settings.quick else (5, 20)
    for _ in range(warmup):
        step()
    windows = []
    for _ in range(settings.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        windows.append((time.perf_counter() - start) / steps)
    peak = torch.cuda.max_memory_allocated() if cuda else 0.0
    del unet, step, first_step_checked
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return Stat(windows), peak, weights


def benchmark(settings: Settings) -> Section:
    title = "GPU: SD-1.5-shaped UNet, LoRA training step at 512 px, batch 1, fp16 autocast"
    if not torch.cuda.is_available():
        return Section(
            title,
            skipped="CUDA is not available on this machine; run `python -m benchmarks.run` "
            "on a GPU machine to fill this section.",
        )
    rows = []
    for checkpointing in (False, True):
        per_step, peak, weights = measure(checkpointing, settings)
        rows.append(
            [
                "on" if checkpointing else "off",
                Stat([1 / s for s in per_step.samples]).fmt(1, "steps/s"),
                per_step.ms(),
                f"{peak / 2**30:.2f} GiB",
                f"{weights / 2**30:.2f} GiB",
            ]
        )
    notes = [
        (
            f"Device: {torch.cuda.get_device_name(0)}. Rank {RANK} on to_q, to_k, to_v, to_out.0; fp16 "
            "frozen weights, fp32 LoRA factors, GradScaler, AdamW, clipping; random weights from SD 1.5's "
            "UNet config."
        ),
        (
            "steps/s is over timed windows after warm-up (median, min–max over windows); peak memory is "
            "`torch.cuda.max_memory_allocated` over warm-up and timed steps, weights included."
        ),
    ]
    return Section(
        title, ["gradient checkpointing", "steps/s", "per step", "peak allocated", "weights"], rows, [], notes
    )
