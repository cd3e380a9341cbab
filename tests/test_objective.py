"""The denoising objective's noise: plain Gaussian, or multi-resolution for pretraining."""

import torch

from lora_nb.objective import multires_noise


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
