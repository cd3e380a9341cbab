"""The denoising objective Stable Diffusion is trained with, as diffusers' training scripts compute it.

Noise the clean latents to a random timestep, ask the UNet for the noise (epsilon) or the velocity (v),
and take the mean squared error, optionally weighted by Min-SNR (Hang et al., 2023, arXiv 2303.09556).

Stable Diffusion's schedule never reaches pure noise: at t = 999 a trace of the image (sqrt(alpha_bar) =
0.07) is left, largest in its low frequencies, so a model learns to read the layout from the noisy input
rather than from the prompt, and at sampling time takes it from the random starting noise. Two remedies
the community trains with hide that trace: offset noise (a per-channel constant, for overall brightness)
and multi-resolution ("pyramid") noise (every coarser scale, for where things are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import compute_snr


def denoising_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,  # (batch, 4, h, w), already multiplied by the VAE's scaling factor
    text_embeddings: torch.Tensor,  # (batch, tokens, width): the text encoder's last hidden state
    *,
    prediction_type: str | None = None,  # None: the scheduler's own
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    multires_discount: float = 0.0,
    generator: torch.Generator | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """The loss of one batch: a scalar, or one value per example with `reduce=False`."""
    batch = latents.shape[0]
    if multires_discount:
        noise = multires_noise(latents, multires_discount, generator)
    else:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # A per-channel constant shift teaches the model to change an image's overall brightness.
        noise += noise_offset * torch.randn(
            (batch, latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=latents.device
    )
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)

    prediction_type = prediction_type or scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}: use 'epsilon' or 'v_prediction'")

    prediction = unet(noisy_latents, timesteps, text_embeddings).sample
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=snr_gamma)
        # Min-SNR for epsilon divides by SNR; for v-prediction by SNR + 1 (the v target's own weighting).
        per_example = per_example * weight / (snr + 1 if prediction_type == "v_prediction" else snr)
    return per_example.mean() if reduce else per_example


def multires_noise(
    latents: torch.Tensor, discount: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gaussian noise of `latents`' shape (batch, channels, h, w) plus noise drawn at h/2, h/4, ... 1 and
    upsampled, scale k weighted discount**k, rescaled to unit variance per example."""
    batch, channels, height, width = latents.shape
    like = {"generator": generator, "device": latents.device, "dtype": latents.dtype}
    noise = torch.randn(latents.shape, **like)
    level = 1
    while min(height, width) >> level >= 1:
        coarse = torch.randn((batch, channels, height >> level, width >> level), **like)
        noise += discount**level * F.interpolate(coarse, size=(height, width), mode="bilinear")
        level += 1
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)
