"""Small real models, built in code (no downloads): a diffusers UNet, a CLIP text encoder, an SD pipeline."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lora_nb.inject import lora_parameters

# These models are tiny: a second thread costs more in synchronisation than it saves (100x, on a busy CPU).
# The tests run two at a time (pytest-xdist), so subprocesses and notebook kernels get one thread too.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items):
    """The notebooks first: the longest tests started early, and work-stealing, keep both workers busy to
    the end."""
    items.sort(key=lambda item: item.module.__name__ != "test_notebooks")


TEXT_DIM = 32  # CLIP hidden size == UNet cross_attention_dim
MAX_TOKENS = 16


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """The module of scripts/<name>.py, imported without running its main()."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,
        norm_num_groups=32,
    ).eval()


def make_text_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def randomize_lora(model, seed: int = 0) -> None:
    """Non-zero B (and new A), as after some training."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(std=0.1)


@pytest.fixture
def unet() -> UNet2DConditionModel:
    return make_unet()


@pytest.fixture
def text_encoder() -> CLIPTextModel:
    return make_text_encoder()


@pytest.fixture
def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, timestep, text embeddings) for one forward pass of the small UNet."""
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 500]),
        torch.randn(2, 5, TEXT_DIM, generator=g),
    )


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(2, 64, (2, MAX_TOKENS), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def tokenizer(tmp_path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters, written to disk the way a hub repo would hold it."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)


def make_pipeline(tokenizer: CLIPTokenizer) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=8,
    )
    scheduler = DDPMScheduler(steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=make_text_encoder(),
        tokenizer=tokenizer,
        unet=make_unet(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture
def pipeline_factory(tokenizer):
    """Builds identical fresh pipelines (same seeds), so one can be compared with another."""
    return lambda: make_pipeline(tokenizer)
