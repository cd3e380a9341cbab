"""The trainer: the blog's command runs as-is, resumes exactly, clips, stops on NaN, checks input early."""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora_nb.course.tiny import TINY_SD_PATH
from lora_nb.data import CaptionedImages, DataError
from lora_nb.formats import WEIGHT_NAME, read_lora
from lora_nb.inject import UNET_ATTENTION, UNET_CONV
from lora_nb.train import TrainConfig, TrainingDiverged, config_from_args, train

train_module = importlib.import_module("lora_nb.train")  # the module; lora_nb.train is the function

CREATURES = TINY_SD_PATH.parent / "creatures"
REPO = Path(__file__).resolve().parent.parent


def small(tmp_path, **overrides) -> TrainConfig:
    settings = {
        "pretrained_model_name_or_path": str(TINY_SD_PATH),
        "train_data_dir": str(CREATURES),
        "max_train_samples": 8,
        "center_crop": True,
        "train_batch_size": 2,
        "max_train_steps": 4,
        "learning_rate": 1e-3,
        "output_dir": str(tmp_path / "out"),
        "seed": 0,
        "show_progress": False,
        "checkpointing_steps": 0,
    }
    settings.update(overrides)
    return TrainConfig(**settings)


def run_cli(args, cwd, extra_env=None, launcher=(sys.executable, "-m")):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    done = subprocess.run(
        [*launcher, "lora_nb.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


BLOG_COMMAND = """--pretrained_model_name_or_path={model} --dataset_name={data} --dataloader_num_workers=8
--resolution=32 --center_crop --random_flip --train_batch_size=1 --gradient_accumulation_steps=4
--max_train_steps=3 --learning_rate=1e-04 --max_grad_norm=1 --lr_scheduler=cosine --lr_warmup_steps=0
--output_dir={out} --report_to=tensorboard --checkpointing_steps=500 --validation_prompt=Totoro --seed=1337
--num_validation_images=1"""


def test_blog_command_runs_and_both_loaders_load_the_adapter(tmp_path):
    """The blog's flags with the embedded paths (3 steps, no hub); then diffusers and lora_nb load it
    alike."""
    from diffusers import StableDiffusionPipeline

    from lora_nb import load_lora_pipeline

    out = tmp_path / "sd-creatures-lora"
    args = BLOG_COMMAND.format(model=TINY_SD_PATH, data=CREATURES, out=out).split()
    done = run_cli(args, cwd=tmp_path)
    assert "wrote" in done.stdout
    assert (out / WEIGHT_NAME).is_file() and list((out / "logs").rglob("events.out.tfevents*"))
    assert len(list((out / "validation").glob("*.png"))) == 1

    card = (out / "README.md").read_text()
    assert (
        f"base_model: {os.path.relpath(TINY_SD_PATH.resolve(), out.resolve())}" in card
    )  # relative to the adapter
    for tag in ("lora", "diffusers", "text-to-image"):
        assert f"- {tag}\n" in card
    assert "![Totoro](./image_0.png)" in card and (out / "image_0.png").is_file()
    assert '"learning_rate": 0.0001' in card

    ours = load_lora_pipeline(out)  # base model read from the card
    theirs = StableDiffusionPipeline.from_pretrained(TINY_SD_PATH)
    theirs.scheduler = type(ours.scheduler).from_config(theirs.scheduler.config)
    theirs.load_lora_weights(out)
    images = [
        p(
            "a drawing of a green creature",
            num_inference_steps=5,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        for p in (ours, theirs)
    ]
    assert abs(images[0] - images[1]).max() < 1e-5


@pytest.mark.parametrize("targets", [UNET_ATTENTION, UNET_ATTENTION + UNET_CONV], ids=["attention", "conv"])
def test_resume_gives_the_uninterrupted_adapter(tmp_path, targets):
    """Stopped at a checkpoint and resumed, the run ends on the same adapter, bit for bit, in the same
    file; with convolutions too, whose 4-D factors and AdamW moments go through the checkpoint."""
    settings = {
        "target_modules": targets,
        "max_train_steps": 6,
        "checkpointing_steps": 3,
        "random_flip": True,
        "lora_dropout": 0.1,
        "gradient_accumulation_steps": 2,
    }
    full = train(small(tmp_path / "a", **settings))
    resumed = train(
        small(tmp_path / "b", resume_from_checkpoint=str(full.output_dir / "checkpoint-3"), **settings)
    )
    a = read_lora(full.lora_path).tensors
    b = read_lora(resumed.lora_path).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == full.losses and len(full.losses) == 6
    assert resumed.lora_path.read_bytes() == full.lora_path.read_bytes()


def test_latest_checkpoint_and_total_limit(tmp_path):
    config = small(tmp_path, max_train_steps=6, checkpointing_steps=1, checkpoints_total_limit=2)
    train(config)
    out = Path(config.output_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert not list(out.glob(".checkpoint-*"))  # no temporary folder left behind
    state = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["global_step"] == 5 and len(state["losses"]) == 5
    again = train(small(tmp_path, max_train_steps=7, resume_from_checkpoint="latest"))
    assert again.global_step == 7 and len(again.losses) == 7


def test_gradient_clipping_really_clips(tmp_path, monkeypatch):
    norms = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        )
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train(small(tmp_path, max_grad_norm=1e-4, max_train_steps=3))
    assert len(norms) == 3 and all(0 < n <= 1e-4 * 1.001 for n in norms)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_loss = train_module.denoising_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_module, "denoising_loss", poisoned)
    config = small(tmp_path, max_train_steps=5, checkpointing_steps=2)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 3.*checkpoint-2"):
        train(config)
    out = Path(config.output_dir)
    assert (out / "checkpoint-2" / WEIGHT_NAME).is_file() and not (out / WEIGHT_NAME).exists()


def test_bf16_with_validation_keeps_lora_fp32(tmp_path):
    result = train(
        small(
            tmp_path,
            mixed_precision="bf16",
            max_train_steps=2,
            validation_prompt="a drawing",
            num_validation_images=1,
        )
    )
    assert result.unet.dtype == torch.bfloat16
    trainable = [p for p in result.unet.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert len(result.validation_images) == 1 and all(math.isfinite(x) for x in result.losses)


def test_latents_are_cached_when_the_crop_allows(tmp_path, monkeypatch):
    seen = {}
    real_train_loop_cache = CaptionedImages.cache

    def spy(self, components, latents, text, device, batch_size=32):
        seen.update(latents=latents, text=text)
        return real_train_loop_cache(self, components, latents, text, device, batch_size)

    monkeypatch.setattr(CaptionedImages, "cache", spy)
    train(small(tmp_path, max_train_steps=1, random_flip=True))
    assert seen == {"latents": True, "text": True}
    train(small(tmp_path / "b", max_train_steps=1, center_crop=False))
    assert seen == {"latents": False, "text": True}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train_data_dir": "no/such/folder"}, "data folder not found: no/such/folder"),
        ({"lr_scheduler": "cosine_annealing"}, "unknown --lr_scheduler 'cosine_annealing'"),
        ({"resolution": 33}, "--resolution 33"),
        ({"caption_column": "prompt"}, "no 'prompt' key"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, overrides, message):
    config = small(tmp_path, **overrides)
    with pytest.raises((ValueError, DataError), match=message):
        train(config)
    assert not (Path(config.output_dir) / WEIGHT_NAME).exists()


def test_unreadable_image_is_named_before_training(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"\x89PNG broken")
    (folder / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "a cat"}\n')
    with pytest.raises(DataError, match="unreadable image .*x.png"):
        train(small(tmp_path, train_data_dir=str(folder)))


def test_push_to_hub_offline_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = small(tmp_path, push_to_hub=True, hub_model_id="someone/tiny-lora")
    with pytest.raises(
        RuntimeError, match="--push_to_hub: cannot create or reach hub repo 'someone/tiny-lora'"
    ):
        train(config)
    assert not Path(config.output_dir).exists()


def test_wandb_missing_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    config = small(tmp_path, report_to="wandb")
    with pytest.raises(RuntimeError, match="--report_to wandb: wandb is not installed"):
        train(config)
    assert not Path(config.output_dir).exists()


def test_cli_flags_map_to_the_config():
    config = config_from_args(
        [
            "--pretrained_model_name_or_path",
            "m",
            "--train_data_dir",
            "d",
            "--rank",
            "8",
            "--center_crop",
            "--target_modules",
            "to_k",
            "to_v",
            "--snr_gamma",
            "5",
            "--mixed_precision",
            "bf16",
        ]
    )
    assert (config.rank, config.lora_alpha, config.center_crop, config.snr_gamma) == (8, None, True, 5.0)
    assert config.target_modules == ["to_k", "to_v"] and config.mixed_precision == "bf16"
    regex = config_from_args(
        ["--pretrained_model_name_or_path", "m", "--target_modules", r".*attn2\.(to_k|to_v)"]
    )
    assert regex.target_modules == r".*attn2\.(to_k|to_v)"


TWO_PROCESS_SCRIPT = """
import sys, safetensors.torch
from lora_nb.formats import lora_state_dict
from lora_nb.course.tiny import TINY_SD_PATH
from lora_nb.train import TrainConfig, train
from accelerate import PartialState
result = train(TrainConfig(str(TINY_SD_PATH), train_data_dir=sys.argv[1], output_dir=sys.argv[2],
                           max_train_samples=8, center_crop=True, train_batch_size=1, max_train_steps=3,
                           learning_rate=1e-3, seed=0, show_progress=False, checkpointing_steps=0))
state = PartialState()
tensors = {k: v.contiguous() for k, v in lora_state_dict(result.unet).items()}
safetensors.torch.save_file(
    tensors, f"{sys.argv[2]}/rank{state.process_index}-of-{state.num_processes}.safetensors"
)
"""


def test_two_cpu_processes_train_one_synchronised_adapter(tmp_path):
    """torchrun with 2 processes (gloo): data sharded, gradients averaged, one adapter from the main
    process."""
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(script),
            str(CREATURES),
            str(out),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [safetensors.torch.load_file(out / f"rank{r}-of-2.safetensors") for r in (0, 1)]
    written = read_lora(out / WEIGHT_NAME).tensors
    # Each process saw different examples; only averaged gradients keep their weights identical.
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert all(torch.equal(written[k], ranks[0][k]) for k in written)
    assert any(ranks[0][k].abs().sum() > 0 for k in ranks[0] if "lora_B" in k)  # it did train
