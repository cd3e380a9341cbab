"""The pretraining script, run tiny: every stage, checkpoints, the export, and continuing from the export."""

import subprocess
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_tiny_sd.py"
TINY = ["--vae-batch-size", "2", "--batch-size", "2", "--pool-size", "4", "--warmup", "1", "--threads", "1"]


def pretrain(*args) -> None:
    subprocess.run([sys.executable, str(SCRIPT), *map(str, args), *TINY], check=True, capture_output=True)


def steps_of(export: Path) -> dict:
    return dict(ModelCard.load(export / "README.md").data.pretrain_steps)


def test_pretraining_exports_a_pipeline_and_continues_from_its_export(tmp_path):
    stages = ["--vae-steps", 2, "--decoder-steps", 2, "--checkpoint-every", 1]
    pretrain("--work", tmp_path / "work", "--out", tmp_path / "export", *stages, "--steps", 2)
    assert {p.name for p in (tmp_path / "work").iterdir()} >= {
        "vae.pt",
        "decoder.pt",
        "denoiser.pt",
        "pool.pt",
    }
    assert steps_of(tmp_path / "export") == {"vae": 2, "decoder": 2, "unet": 2}
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "export")
    logvar = pipe.vae.quant_conv.bias[pipe.vae.config.latent_channels :]
    assert torch.equal(logvar, torch.full_like(logvar, -12.0))  # the posterior as it ships: deterministic
    # On a machine without the checkpoints, the export is enough to go on with the UNet stage.
    pretrain(
        "--work",
        tmp_path / "fresh",
        "--out",
        tmp_path / "more",
        *stages,
        "--steps",
        3,
        "--init-from",
        tmp_path / "export",
    )
    assert steps_of(tmp_path / "more") == {"vae": 2, "decoder": 2, "unet": 3}
