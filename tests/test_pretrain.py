"""The pretraining script, run tiny: every stage, checkpoints, the export, and continuing from the export."""

import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from conftest import load_script
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_tiny_sd.py"
TINY = ["--vae-batch-size", "2", "--batch-size", "2", "--pool-size", "4", "--warmup", "1", "--threads", "1"]


def pretrain(*args, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), *map(str, args), *TINY]
    return subprocess.run(command, check=check, capture_output=True, text=True)


def steps_of(export: Path) -> dict:
    return dict(ModelCard.load(export / "README.md").data.pretrain_steps)


def test_pretraining_exports_a_pipeline_and_continues_from_its_export(tmp_path):
    stages = ["--vae-steps", 2, "--decoder-steps", 2, "--checkpoint-every", 1, "--device", "cpu"]
    pretrain("--work", tmp_path / "work", "--out", tmp_path / "export", *stages, "--steps", 2)
    assert {p.name for p in (tmp_path / "work").iterdir()} >= {
        "vae.pt",
        "decoder.pt",
        "denoiser.pt",
        "pool.pt",
    }
    assert steps_of(tmp_path / "export") == {"vae": 2, "decoder": 2, "unet": 2}
    saved = json.loads((tmp_path / "export" / "tokenizer" / "tokenizer.json").read_text())
    assert saved["padding"] is None and saved["truncation"] is None  # as the shipped tokenizer has them
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "export")
    logvar = pipe.vae.quant_conv.bias[pipe.vae.config.latent_channels :]
    assert torch.equal(logvar, torch.full_like(logvar, -12.0))  # the posterior as it ships: deterministic
    # The card says where each stage ran.
    card = ModelCard.load(tmp_path / "export" / "README.md")
    cpu_only = {"vae": ["CPU"], "decoder": ["CPU"], "unet": ["CPU"]}
    assert card.data.pretrain_machines == cpu_only
    assert (
        "Where each stage ran: the VAE on CPU; its decoder on CPU; the UNet and the text encoder on CPU."
        in (card.text)
    )
    # On a machine without the checkpoints, the export is enough to go on with the UNet stage; had the UNet's
    # first steps run on a GPU, the continuation's card names both machines.
    card.data.pretrain_machines = {**cpu_only, "unet": ["NVIDIA H100 80GB HBM3"]}
    card.save(tmp_path / "export" / "README.md")
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
    continued = ModelCard.load(tmp_path / "more" / "README.md")
    assert continued.data.pretrain_machines == {**cpu_only, "unet": ["CPU", "NVIDIA H100 80GB HBM3"]}
    assert "the UNet and the text encoder on CPU, NVIDIA H100 80GB HBM3." in continued.text


def test_a_longer_vae_stage_refits_the_decoder_and_re_encodes_the_pool_for_the_unet(tmp_path):
    work, export = tmp_path / "work", tmp_path / "export"
    tiny = ["--work", work, "--out", export, "--decoder-steps", 1, "--checkpoint-every", 1, "--device", "cpu"]
    pretrain(*tiny, "--vae-steps", 1, "--steps", 1)
    first_pool = torch.load(work / "pool.pt")["latents"]
    # The VAE stage goes on, so its encoder and the latents change: a UNet that has not learned them yet
    # must not ship with it.
    refused = pretrain(*tiny, "--vae-steps", 2, "--steps", 1, check=False)
    assert refused.returncode != 0 and "--steps above 1" in refused.stderr
    pretrain(*tiny, "--vae-steps", 2, "--steps", 2)
    encoder = torch.load(work / "vae.pt")["vae"]
    shipped = StableDiffusionPipeline.from_pretrained(export).vae.state_dict()
    assert all(torch.equal(shipped[k], v) for k, v in encoder.items() if k.startswith("encoder."))
    assert not torch.equal(torch.load(work / "pool.pt")["latents"], first_pool)  # encoded again
    card = ModelCard.load(export / "README.md").data
    assert card.pretrain_steps["vae"] == 2 and card.pretrain_steps["unet"] == 2
    assert [(entry["from_step"], entry["vae_step"]) for entry in card.pretrain_objectives] == [(0, 1), (1, 2)]


def test_a_resumed_unet_stage_trains_as_an_unbroken_one(tmp_path):
    stages = ["--vae-steps", 1, "--decoder-steps", 0, "--checkpoint-every", 1, "--device", "cpu"]
    pretrain("--work", tmp_path / "straight", "--out", tmp_path / "a", *stages, "--steps", 2)
    pretrain("--work", tmp_path / "resumed", "--out", tmp_path / "b", *stages, "--steps", 1)
    pretrain("--work", tmp_path / "resumed", "--out", tmp_path / "b", *stages, "--steps", 2)
    straight, resumed = (torch.load(tmp_path / w / "denoiser.pt") for w in ("straight", "resumed"))
    assert straight["step"] == resumed["step"] == 2
    for key in ("unet", "text_encoder", "ema_unet"):
        assert all(torch.equal(straight[key][k], resumed[key][k]) for k in straight[key]), key


def test_the_unet_learning_rate_holds_then_cools_down_to_a_tenth():
    script = load_script("pretrain_tiny_sd")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])

    def lr_at(step, cooldown_from):
        args = SimpleNamespace(lr=1e-3, warmup=10, steps=100, cooldown_from=cooldown_from)
        script.set_denoiser_lr(optimizer, args, step)
        return optimizer.param_groups[0]["lr"]

    assert lr_at(0, None) == 1e-4  # warm-up
    assert [lr_at(s, None) for s in (10, 60, 99)] == [1e-3] * 3  # no cool-down: held
    assert lr_at(59, 60) == lr_at(60, 60) == 1e-3
    cooling = [lr_at(s, 60) for s in range(60, 101)]
    assert all(a > b for a, b in itertools.pairwise(cooling))
    assert abs(cooling[-1] - 1e-4) < 1e-12


def test_the_recorded_objectives_say_each_stretch_s_learning_rate_and_an_unchanged_one_adds_nothing():
    script = load_script("pretrain_tiny_sd")
    shipped = [  # as the shipped card records them: before the learning rate was recorded
        script.FIRST_OBJECTIVE,
        {"from_step": 100, "prediction_type": "v_prediction", "snr_gamma": None, "multires_discount": 0.8},
    ]
    same = {
        "prediction_type": "v_prediction",
        "snr_gamma": None,
        "multires_discount": 0.8,
        **script.EARLIER_DEFAULTS,
    }
    assert script.adopt_objective(shipped, same, 200, []) == shipped
    cooler = {**same, "lr": 3e-4, "cooldown_from": 200}  # a continuation at its own rate
    history = script.adopt_objective(shipped, cooler, 200, [])
    assert history[-1] == {"from_step": 200, **cooler}
    described = script.describe_objectives(history, 300).split("; ")
    assert described[0] == "steps 0-100: epsilon target, Min-SNR 5, Gaussian noise, lr 0.001"
    assert described[2] == (
        "steps 200-300: v-prediction target, unweighted loss, multires noise 0.8, lr 0.0003 (from step 200 a "
        "cosine down to a tenth)"
    )
