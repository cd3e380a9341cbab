"""Checkpoints and the output folder: what a run writes while it trains, and how a resumed run finds it.

A checkpoint is a folder, --output_dir/checkpoint-N (N the optimiser steps done), written whole or not at all
(a temporary folder renamed into place). It holds data only, never a pickle, so resuming runs no code from it:
- pytorch_lora_weights.safetensors: the adapter so far (diffusers' layout; usable as it is);
- training_state.safetensors: the optimiser's tensors (AdamW's moments), keyed "<parameter index>.<name>";
- training_state.json: the optimiser's other values and parameter groups, the schedule's state, the loss
  scaler's (null without one);
- trainer_state.json: {"global_step": N, "losses": [...], "lrs": [...]}, the history so far.
--checkpoints_total_limit keeps only the newest so many.

Resume (--resume_from_checkpoint, find_resume_checkpoint): "latest" takes the highest N in --output_dir
(none there: a fresh start, with a warning); any other value is a checkpoint folder, as given or else inside
--output_dir, that must hold trainer_state.json. The trainer then injects fresh LoRA layers and copies the
checkpoint's factors into them (restore_lora: the same targets and rank, or an error saying which differs),
puts the optimiser, schedule and scaler back (load_training_state), and skips the batches the finished
steps used.

One run at a time writes to an --output_dir: claimed_output_dir holds a lock file there, .lora_nb.lock with
"pid@host", for the whole run; a lock whose process is gone (a killed run's) is taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch

from .convert import select_component
from .formats import WEIGHT_NAME, read_json, read_lora, save_lora_weights
from .inject import lora_parameters

if TYPE_CHECKING:  # the trainer's types; train.py imports this module
    from .config import TrainConfig
    from .train import Components, Run

logger = logging.getLogger(__name__)
LOCK_NAME = ".lora_nb.lock"  # in --output_dir while a run writes there


# ---------------------------------------------------------------- checkpoints


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run: Run) -> Path:
    """Write checkpoint-N atomically (a temporary folder renamed into place), then prune old ones."""
    output_dir, step = Path(run.config.output_dir), run.global_step
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_unwrapped_lora(tmp, run.components, run.accelerator)
    save_training_state(tmp, run.optimizer, run.lr_scheduler, run.accelerator.scaler)
    (tmp / "trainer_state.json").write_text(json.dumps({"global_step": step, **run.history}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if run.config.checkpoints_total_limit:
        for old in checkpoint_dirs(output_dir)[: -run.config.checkpoints_total_limit]:
            shutil.rmtree(old)
    return final


def save_training_state(folder: Path, optimizer, lr_scheduler, scaler) -> None:
    """The optimiser's tensors in training_state.safetensors; its other values, the schedule's and the loss
    scaler's in training_state.json. Checkpoints are shared like adapters: they hold data, never a pickle."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.contiguous()
            else:
                plain.setdefault(str(index), {})[name] = value
    safetensors.torch.save_file(tensors, folder / "training_state.safetensors")
    (folder / "training_state.json").write_text(
        json.dumps(
            {
                "optimizer": {"param_groups": state["param_groups"], "state": plain},
                "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": None if scaler is None else scaler.state_dict(),
            }
        )
    )


def load_training_state(folder: Path, optimizer, lr_scheduler, scaler) -> None:
    """Put save_training_state's files back into the optimiser, schedule and scaler."""
    if not (folder / "training_state.json").is_file():
        raise FileNotFoundError(
            f"checkpoint {folder} has no training_state.json: it comes from an older lora_nb, whose "
            "training_state.pt (a pickle) is not read, as unpickling can run code. Start a fresh run; the "
            f"adapter in it ({WEIGHT_NAME}) is still good to use"
        )
    saved = read_json((folder / "training_state.json").read_text(), str(folder / "training_state.json"))
    state: dict[int, dict] = {}
    for key, tensor in safetensors.torch.load_file(folder / "training_state.safetensors").items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = tensor
    for index, values in saved["optimizer"]["state"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": saved["optimizer"]["param_groups"]})
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])


def save_unwrapped_lora(folder: Path, components: Components, accelerator) -> Path:
    return save_lora_weights(
        folder,
        unet=accelerator.unwrap_model(components.unet),
        text_encoder=accelerator.unwrap_model(components.text_encoder)
        if has_lora(components.text_encoder)
        else None,
    )


def has_lora(model) -> bool:
    return bool(lora_parameters(model))


def restore_lora(checkpoint: Path, models: dict[str, torch.nn.Module]) -> None:
    """Copy a checkpoint's factors into the freshly injected layers of ``models`` ({prefix: model}): the
    same targets, rank and text-encoder choice, or a ValueError saying which differs."""
    tensors = read_lora(checkpoint).tensors
    broken = [key for key, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if broken:
        raise ValueError(
            f"checkpoint {checkpoint} holds NaN or inf weights ({broken[0]}); resume from an earlier one"
        )
    wanted = {
        f"{prefix}.{key}": value
        for prefix, model in models.items()
        for key, value in model.state_dict().items()
        if ".lora_" in key
    }
    if set(tensors) != set(wanted):
        odd = sorted(set(tensors) ^ set(wanted))[:3]
        raise ValueError(
            f"checkpoint {checkpoint} does not match this run's LoRA layers (first differing keys: "
            f"{odd}); resume with its --target_modules, --train_text_encoder and --use_dora"
        )
    for key, value in wanted.items():
        if tensors[key].shape != value.shape:
            rank = tensors[key].shape[0 if ".lora_A." in key else 1]
            raise ValueError(
                f"checkpoint {checkpoint} was trained at rank {rank} ({key} is "
                f"{tuple(tensors[key].shape)} there, {tuple(value.shape)} here); resume with "
                f"--rank {rank}"
            )
    for prefix, model in models.items():
        model.load_state_dict(select_component(tensors, prefix), strict=False)


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        found = checkpoint_dirs(Path(config.output_dir))
        if not found:  # start fresh, as diffusers does, but say so
            logger.warning(
                "--resume_from_checkpoint latest: no checkpoint in %s; starting from step 0",
                config.output_dir,
            )
        return found[-1] if found else None
    path = Path(config.resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(config.output_dir) / path
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {config.resume_from_checkpoint}: no checkpoint at {path}"
        )
    return path


# ---------------------------------------------------------------- the output folder


@contextlib.contextmanager
def claimed_output_dir(output_dir: Path, main_process: bool = True):
    """Hold --output_dir for the run: created and proven writable now (not at the final save, hours later),
    and refused while another live run holds it. A folder the run created and left empty is removed."""
    if not main_process:  # the main process alone writes, and holds the lock
        yield
        return
    created, lock = not output_dir.exists(), None
    try:
        lock = take_lock(output_dir)
        yield
    finally:
        if lock:
            lock.unlink(missing_ok=True)
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()


def take_lock(output_dir: Path) -> Path:
    """Create output_dir/.lora_nb.lock holding "pid@host". O_EXCL makes one of two runs starting together the
    winner; a lock whose process is gone (a killed run's) is taken over."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir} is a file, not a folder")
    lock = output_dir / LOCK_NAME
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after taking over a dead run's lock
            try:
                descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                holder = lock_holder(lock)
                if holder:
                    raise RuntimeError(
                        f"--output_dir {output_dir} is in use by another run (process {holder}, see {lock}); "
                        "let it finish or choose another --output_dir. If no run uses it, delete that file."
                    ) from None
                lock.unlink(missing_ok=True)
        else:
            raise RuntimeError(f"--output_dir {output_dir}: another run took it just now ({lock})")
    except OSError as error:
        raise PermissionError(
            f"--output_dir {output_dir}: cannot write there ({error.strerror}); "
            "choose a folder you can write to"
        ) from None
    with os.fdopen(descriptor, "w") as f:
        f.write(f"{os.getpid()}@{socket.gethostname()}")
    return lock


def lock_holder(lock: Path) -> str | None:
    """Who holds a lock file ("pid@host"), if that run may still be alive; None for no lock or a dead run."""
    try:
        text = lock.read_text().strip()
    except FileNotFoundError:
        return None
    pid, _, host = text.partition("@")
    if not pid.isdigit():  # written by a run killed at once
        return None
    if host != socket.gethostname():  # another machine's run: it cannot be checked from here
        return text
    try:
        os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return None
    except PermissionError:  # it exists, under another user
        pass
    return text
