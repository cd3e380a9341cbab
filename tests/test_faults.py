"""Faults and bad input (issue 13): no NaN adapter, no code run from a checkpoint, nothing half-applied.

Each case ends either in a correct result or in an error naming the file, key, line or flag at fault, with
no partial output and no changed model.
"""

import importlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import make_unet
from test_formats import assert_untouched, snapshot, trained_pair
from test_train import CREATURES, REPO, small

from lora_nb.checkpoints import LOCK_NAME
from lora_nb.config import TrainConfig, build_parser, config_from_args
from lora_nb.course.tiny import TINY_SD_PATH
from lora_nb.data import DataError, check_imagefolder
from lora_nb.formats import (
    METADATA_KEY,
    WEIGHT_NAME,
    LoraAdapter,
    export_kohya,
    load_lora_weights,
    lora_state_dict,
    read_lora,
    save_lora_weights,
)
from lora_nb.inject import UNET_ATTENTION, inject_lora, lora_layers, set_lora_scale
from lora_nb.train import TrainingDiverged, train

train_module = importlib.import_module("lora_nb.train")  # the module; lora_nb.train is the function


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in safetensors.torch.load_file(path).values())


def run_python(*args, cwd=REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )


# ---------------------------------------------------------------- 1. the NaN guard


def test_an_update_that_makes_the_weights_nan_is_never_saved(tmp_path):
    """lr 1e3: step 2's loss is finite, its update makes every weight NaN. Nothing NaN reaches the disk,
    and the checkpoint named as last good is finite."""
    config = small(tmp_path, learning_rate=1e3, max_train_steps=3, checkpointing_steps=1)
    with pytest.raises(TrainingDiverged, match=r"update of step 2 made weights NaN.*checkpoint-1\b"):
        train(config)
    out = Path(config.output_dir)
    assert not (out / WEIGHT_NAME).exists() and not (out / "README.md").exists()
    saved = sorted(out.rglob("*.safetensors"))
    assert saved and all(all_finite(path) for path in saved)
    assert all_finite(out / "checkpoint-1" / WEIGHT_NAME)


def test_the_last_update_is_checked_too(tmp_path, monkeypatch):
    """The final step's update, which no later loss would reveal, is checked before the adapter is written."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def poisoning_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            self.param_groups[0]["params"][-1].data.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    config = small(tmp_path, max_train_steps=2)
    with pytest.raises(
        TrainingDiverged, match="update of step 2 made weights NaN or inf.*Last good checkpoint: none"
    ):
        train(config)
    assert not (Path(config.output_dir) / WEIGHT_NAME).exists()


# ---------------------------------------------------------------- 2. no code from a checkpoint


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_is_data_and_resuming_runs_no_code_from_it(tmp_path):
    first = train(small(tmp_path, max_train_steps=2, checkpointing_steps=1))
    checkpoint = first.output_dir / "checkpoint-1"
    assert {p.name for p in checkpoint.iterdir()} == {
        WEIGHT_NAME,
        "training_state.safetensors",
        "training_state.json",
        "trainer_state.json",
    }
    marker = tmp_path / "code-ran"
    torch.save(
        {"optimizer": RunsCode(marker)}, checkpoint / "training_state.pt"
    )  # what an older version read
    resumed = train(small(tmp_path, max_train_steps=2, resume_from_checkpoint=str(checkpoint)))
    assert not marker.exists()
    assert resumed.losses == first.losses

    for name in ("training_state.json", "training_state.safetensors"):  # an older lora_nb's checkpoint
        (checkpoint / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"checkpoint-1 has no training_state\.json: .*older lora_nb"):
        train(small(tmp_path, max_train_steps=2, resume_from_checkpoint=str(checkpoint)))
    assert not marker.exists()


# ---------------------------------------------------------------- 3 and 4. loading is all or nothing


def adapter_file(tmp_path, **metadata) -> tuple[Path, str]:
    """A trained-looking UNet adapter with extra metadata; returns its path and its last layer's name."""
    unet, _ = trained_pair()
    lora = LoraAdapter(lora_state_dict(unet), {"unet.lora_alpha": 8.0, **metadata})
    return save_lora_weights(tmp_path / "adapter.safetensors", adapter=lora), list(lora_layers(unet))[-1]


def test_a_bad_alpha_on_the_last_layer_changes_nothing(tmp_path):
    unet, _ = trained_pair()
    last = list(lora_layers(unet))[-1]
    path, _ = adapter_file(tmp_path, **{"unet.alpha_pattern": {f"^{last}": "eight"}})
    fresh = make_unet()
    before = snapshot(fresh)
    with pytest.raises(
        ValueError, match=rf"unet\.alpha_pattern\['\^{last}'\] must be a finite number, got 'eight'"
    ):
        load_lora_weights(path, unet=fresh)
    assert_untouched(fresh, before)  # no layer of 8 swapped in


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"unet.lora_alpha": float("nan")}, r"unet\.lora_alpha must be a finite number, got nan"),
        (
            {
                "unet.alpha_pattern": {
                    "^down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": float("inf")
                }
            },
            r"unet\.alpha_pattern\[.*attn1\.to_q'\] must be a finite number, got inf",
        ),
    ],
)
def test_non_finite_alphas_are_refused_naming_the_key(tmp_path, metadata, message):
    path, _ = adapter_file(tmp_path, **metadata)
    fresh = make_unet()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        load_lora_weights(path, unet=fresh)
    assert_untouched(fresh, before)


@pytest.mark.parametrize("factor, value", [("lora_A", float("nan")), ("lora_B", float("inf"))])
def test_non_finite_factors_are_refused_naming_the_key(tmp_path, factor, value):
    unet, _ = trained_pair()
    tensors = lora_state_dict(unet)
    key = next(k for k in tensors if factor in k)
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = value
    fresh = make_unet()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=rf"{key}: holds NaN or inf values"):
        load_lora_weights(LoraAdapter(tensors, {}), unet=fresh)
    assert_untouched(fresh, before)


def test_a_non_finite_kohya_alpha_is_refused_naming_the_key(tmp_path):
    unet, _ = trained_pair()
    path = export_kohya(LoraAdapter(lora_state_dict(unet), {}), tmp_path / "kohya.safetensors")
    tensors = safetensors.torch.load_file(path)
    key = next(k for k in tensors if k.endswith(".alpha"))
    tensors[key] = torch.tensor(float("nan"))
    safetensors.torch.save_file(tensors, path)
    fresh = make_unet()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=rf"{key}: must be one finite number"):
        load_lora_weights(path, unet=fresh)
    assert_untouched(fresh, before)


def test_a_nan_scale_is_refused(tmp_path):
    unet = make_unet()
    inject_lora(unet, UNET_ATTENTION)
    with pytest.raises(ValueError, match="scale must be a finite number, got nan"):
        set_lora_scale(unet, float("nan"))
    assert all(layer.scale == 1.0 for layer in lora_layers(unet).values())
    from lora_nb.inference import load_lora_pipeline

    with pytest.raises(ValueError, match="scale must be a finite number, got nan"):
        load_lora_pipeline(tmp_path / "never-read", base_model=str(TINY_SD_PATH), scale=float("nan"))


# ---------------------------------------------------------------- 5. flags no run can mean


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_train_steps": 0}, "--max_train_steps 0: must be a whole number at least 1"),
        ({"max_train_steps": -5}, "--max_train_steps -5: must be a whole number at least 1"),
        ({"max_train_samples": 0}, "--max_train_samples 0: must be a whole number at least 1"),
        ({"lora_alpha": 0}, "--lora_alpha 0: must be a number above 0"),
        ({"gradient_accumulation_steps": 0}, "--gradient_accumulation_steps 0"),
        ({"learning_rate": float("nan")}, "--learning_rate nan: must be a number above 0"),
        ({"learning_rate": float("inf")}, "--learning_rate inf"),
        ({"train_batch_size": 0}, "--train_batch_size 0"),
        ({"rank": 0}, "--rank 0"),
        ({"lora_dropout": 1.0}, "--lora_dropout 1.0: must be a number at least 0 and below 1"),
        ({"num_train_epochs": 0}, "--num_train_epochs 0"),
        ({"checkpointing_steps": -1}, "--checkpointing_steps -1"),
        ({"mixed_precision": "fp8"}, "unknown --mixed_precision 'fp8'"),
        ({"target_modules": "to_(q"}, "--target_modules 'to_\\(q' is not a valid regex"),
        ({"target_modules": []}, "--target_modules must be module names"),
        ({"rank": 4.5}, "--rank 4.5: must be a whole number"),
        ({"use_dora": True, "finetune": "full"}, "--use_dora is for LoRA; this run is --finetune full"),
        ({"loraplus_lr_ratio": 0}, "--loraplus_lr_ratio 0: must be a number above 0"),
        ({"text_encoder_lr": 1e-4}, "--text_encoder_lr needs --train_text_encoder"),
        ({"text_encoder_lr": -1.0, "train_text_encoder": True}, "--text_encoder_lr -1.0: must be a number"),
        (
            {"caption_dropout_rate": 1.0},
            "--caption_dropout_rate 1.0: must be a number at least 0 and below 1",
        ),
        ({"aspect_ratio_buckets": "yes"}, "--aspect_ratio_buckets must be True or False"),
    ],
)
def test_impossible_flags_are_refused_before_anything_loads(tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(train_module, "load_components", lambda *a, **k: pytest.fail("the model loaded"))
    config = small(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        train(config)
    assert not Path(config.output_dir).exists()


def test_the_command_line_names_a_bad_value_and_exits(capsys):
    with pytest.raises(SystemExit) as exit_:
        config_from_args(
            ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--max_train_steps", "0"]
        )
    assert exit_.value.code == 2
    assert "--max_train_steps 0: must be a whole number at least 1" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU does with fp16")
def test_fp16_on_a_cpu_trains_in_fp32_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lora_nb.train"):
        result = train(small(tmp_path, mixed_precision="fp16", max_train_steps=1))
    assert "--mixed_precision fp16 needs a GPU" in caplog.text and "fp32 instead" in caplog.text
    assert result.unet.dtype == torch.float32 and all(math.isfinite(x) for x in result.losses)


# ---------------------------------------------------------------- 6. the output folder


def test_an_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def read_only_folder(path, flags, *args, **kwargs):  # as for a read-only mount (root ignores chmod)
        if Path(path).parent == out and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_folder)
    monkeypatch.setattr(train_module, "load_components", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(
        PermissionError, match=r"--output_dir .*out: cannot write there \(Permission denied\)"
    ):
        train(small(tmp_path))


def test_an_output_folder_a_live_run_holds_is_refused_and_a_dead_runs_is_taken_over(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    with subprocess.Popen(["sleep", "60"]) as live:
        lock.write_text(f"{live.pid}@{socket.gethostname()}")
        monkeypatch.setattr(train_module, "load_components", lambda *a, **k: pytest.fail("the model loaded"))
        with pytest.raises(
            RuntimeError, match=rf"--output_dir .*out is in use by another run \(process {live.pid}"
        ):
            train(small(tmp_path))
        live.kill()
    assert lock.read_text().startswith(f"{live.pid}@")  # the other run's lock is left alone
    monkeypatch.undo()
    result = train(small(tmp_path, max_train_steps=1))  # its process is gone now: a stale lock
    assert (result.output_dir / WEIGHT_NAME).is_file() and not lock.exists()


def test_a_failed_run_leaves_no_empty_output_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "a cat"}\n')
    config = small(tmp_path, train_data_dir=str(folder))
    with pytest.raises(DataError):
        train(config)
    assert not Path(config.output_dir).exists()


# ---------------------------------------------------------------- 7. errors that name the culprit


def test_truncated_empty_or_badly_labelled_files_are_named(tmp_path):
    path, _ = adapter_file(tmp_path)
    whole = path.read_bytes()
    for broken in (whole[: len(whole) // 2], b""):
        path.write_bytes(broken)
        with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file"):
            read_lora(path)
    for text, why in (("{not json", "not valid JSON"), ("42", "expected a JSON dict, got 42")):
        safetensors.torch.save_file({"unet.x.lora_A.weight": torch.zeros(1, 1)}, path, {METADATA_KEY: text})
        with pytest.raises(ValueError, match=rf"{path}, header key 'lora_adapter_metadata': {why}"):
            read_lora(path)
    (tmp_path / "adapter_config.json").write_text("{'r': 4}")
    safetensors.torch.save_file(
        {"base_model.model.x.lora_A.weight": torch.zeros(1, 1)}, tmp_path / "adapter_model.safetensors"
    )
    with pytest.raises(ValueError, match=r"adapter_config\.json: not valid JSON"):
        read_lora(tmp_path / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "line, message",
    [
        ("42", r"line 2: expected a JSON object such as .*got '42'"),
        ("null", r"line 2: expected a JSON object .*got 'null'"),
        ('{"file_name": 42, "text": "a cat"}', r"line 2: 'file_name' must be a string, got 42"),
        ('{"file_name": "a.png", "text": 42}', r"line 2: 'text' must be a string, got 42"),
        ('{"file_name": "a.png", "text": null}', r"line 2: 'text' must be a string, got None"),
    ],
)
def test_odd_metadata_lines_are_named(tmp_path, line, message):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a cat"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"metadata\.jsonl, {message}"):
        check_imagefolder(tmp_path)


def test_resuming_at_another_rank_says_so_in_one_line(tmp_path):
    train(small(tmp_path, max_train_steps=2, checkpointing_steps=1))
    with pytest.raises(
        ValueError, match=r"checkpoint-1 was trained at rank 4 .*; resume with --rank 4$"
    ) as error:
        train(small(tmp_path, max_train_steps=2, rank=8, resume_from_checkpoint="latest"))
    assert "\n" not in str(error.value) and len(str(error.value)) < 400


@pytest.mark.parametrize(
    "model, message",
    [
        ("no/such/model", "no such folder, nor a hub model that could be read"),
        (str(CREATURES), "that folder holds no diffusers Stable Diffusion model"),
    ],
)
def test_a_missing_base_model_is_named_by_its_flag(tmp_path, model, message):
    config = small(tmp_path, pretrained_model_name_or_path=model)
    with pytest.raises(FileNotFoundError, match=rf"--pretrained_model_name_or_path {model}: {message}"):
        train(config)
    assert not Path(config.output_dir).exists()


def test_resume_latest_without_a_checkpoint_says_it_starts_fresh(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lora_nb.checkpoints"):
        result = train(small(tmp_path, max_train_steps=1, resume_from_checkpoint="latest"))
    assert (
        "--resume_from_checkpoint latest: no checkpoint in" in caplog.text
        and "starting from step 0" in caplog.text
    )
    assert result.global_step == 1


# ---------------------------------------------------------------- 8. the command line


def test_help_shows_every_flags_help_and_default_without_a_runpy_warning():
    done = run_python("-m", "lora_nb.train", "--help")
    assert done.returncode == 0 and "RuntimeWarning" not in done.stderr, done.stderr
    names = [f"--{name}" for name in TrainConfig.__dataclass_fields__]
    assert all(name in done.stdout for name in names)
    assert done.stdout.count("(default:") == len(names) - 1 and done.stdout.count("(required)") == 1
    defaults = TrainConfig(pretrained_model_name_or_path="m")
    for action in build_parser()._actions[1:]:
        assert action.help
        if action.dest == "pretrained_model_name_or_path":  # no default: a run names its base model
            assert action.required
        else:
            assert action.default == getattr(defaults, action.dest)


def test_a_mistyped_flag_is_reported_before_torch_or_diffusers_load(tmp_path):
    done = run_python(
        "-X",
        "importtime",
        "-m",
        "lora_nb.train",
        "--pretrained_model_name_or_path",
        "m",
        "--learnig_rate=1",
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "unrecognized arguments: --learnig_rate=1" in done.stderr
    imported = {
        line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time")
    }
    assert imported and not imported & {"torch", "diffusers", "accelerate"}


def test_the_package_names_stay_the_functions():
    import lora_nb
    import lora_nb.dreambooth  # imports the submodule lora_nb.train
    from lora_nb import TrainConfig as Config
    from lora_nb import train as train_function

    assert train_function is train and lora_nb.train is train and Config is TrainConfig
    assert set(lora_nb.__all__) == set(lora_nb._SOURCES)
    assert [getattr(lora_nb, name) for name in lora_nb.__all__]  # each one loads


def test_sizes_refuses_ranks_below_one(capsys):
    from lora_nb.sizes import main

    with pytest.raises(SystemExit):
        main(["--models", "sd15", "--ranks", "0", "-3"])
    assert "--ranks 0 -3: a LoRA rank is a positive integer" in capsys.readouterr().err


# ---------------------------------------------------------------- the same adapter, the same file


def test_saving_one_adapter_twice_gives_the_same_bytes(tmp_path):
    unet, text_encoder = trained_pair(mixed=True)
    files = {
        save_lora_weights(tmp_path / f"{i}.safetensors", unet, text_encoder).read_bytes() for i in range(10)
    }
    assert len(files) == 1
    data = files.pop()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    assert list(header) == sorted(header)
    inner = json.loads(header[METADATA_KEY])
    assert list(inner) == sorted(inner)
