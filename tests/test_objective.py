"""The denoising objective: its noise (Gaussian, or multi-resolution for pretraining) and its weights."""

from types import SimpleNamespace

import torch
from diffusers import DDPMScheduler

from lora_nb.objective import denoising_loss, multires_noise


def block_means(noise: torch.Tensor, block: int) -> torch.Tensor:
    """The mean of each block x block patch: what is left of the noise at that coarse scale."""
    return torch.nn.functional.avg_pool2d(noise, block)


def test_multires_noise_has_unit_variance_and_far_more_coarse_energy_than_gaussian_noise():
    latents = torch.zeros(256, 4, 16, 16)
    noise = multires_noise(latents, 0.8, torch.Generator().manual_seed(0))
    gaussian = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))

    assert noise.shape == latents.shape
    assert torch.allclose(noise.std(dim=(1, 2, 3)), torch.ones(256), atol=1e-4)
    # Gaussian noise averages away over a 4x4 patch (std 1/4); the coarse scales keep what hides a layout.
    assert block_means(gaussian, 4).std() < 0.3
    assert block_means(noise, 4).std() > 2 * block_means(gaussian, 4).std()
    assert block_means(noise, 16).std() > 4 * block_means(gaussian, 16).std()  # and an image's mean colour


def test_multires_noise_is_a_function_of_the_generator_and_works_on_non_square_latents():
    latents = torch.zeros(2, 4, 8, 12)
    first = multires_noise(latents, 0.5, torch.Generator().manual_seed(3))
    again = multires_noise(latents, 0.5, torch.Generator().manual_seed(3))
    other = multires_noise(latents, 0.5, torch.Generator().manual_seed(4))
    assert first.shape == (2, 4, 8, 12)
    assert torch.equal(first, again) and not torch.equal(first, other)


class ZeroUNet(torch.nn.Module):
    """Predicts zeros: the loss is then the target's mean square, which the tests can reason about."""

    def forward(self, sample, timestep, encoder_hidden_states):
        return SimpleNamespace(sample=torch.zeros_like(sample))


def loss_of(latents, weights=None):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    return denoising_loss(
        ZeroUNet(),
        scheduler,
        latents,
        torch.zeros(len(latents), 3, 8),
        generator=torch.Generator().manual_seed(0),
        weights=weights,
        reduce=False,
    )


def test_uniform_weights_leave_the_loss_as_it_is_whatever_their_scale():
    latents = torch.randn(4, 4, 8, 8)
    plain = loss_of(latents)
    assert torch.allclose(loss_of(latents, torch.ones(4, 1, 8, 8)), plain)
    assert torch.allclose(loss_of(latents, torch.full((4, 1, 8, 8), 7.0)), plain)


def test_weights_set_each_pixels_share_of_its_examples_loss():
    latents = torch.zeros(2, 4, 8, 8)
    weights = torch.zeros(2, 1, 8, 8)
    weights[:, :, :, :4] = 1.0  # only the left half counts
    # The zero UNet's error is the noise itself (epsilon target): the weighted loss is the mean square of
    # the noise over the left half alone, which the same generator draws again here.
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    expected = noise[..., :4].square().mean(dim=(1, 2, 3))
    assert torch.allclose(loss_of(latents, weights), expected)
    assert not torch.allclose(loss_of(latents), expected)
