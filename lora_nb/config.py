"""The trainer's settings: one dataclass field per command-line flag, with its help text and its limits.

Nothing here imports torch or diffusers, so `python -m lora_nb.train` reads and checks its flags at once:
a mistyped flag or an impossible value is reported before seconds of imports, and long before a model loads.
The target modules live here for the same reason (lora_nb.inject, where they are used, re-exports them,
and names the sets of them in TARGET_SETS).
"""

from __future__ import annotations

import argparse
import math
import numbers
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields

# diffusers' default in examples/text_to_image/train_text_to_image_lora.py: self- and cross-attention.
UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# Cross-attention only (attn2): the layers that read the text embedding.
UNET_CROSS_ATTENTION = r".*attn2\.(to_q|to_k|to_v|to_out\.0)"
UNET_FEED_FORWARD = ["ff.net.0.proj", "ff.net.2"]
# kohya's LoCon: the transformer blocks' 1x1 proj_in / proj_out and every resnet's 3x3 conv1 / conv2.
UNET_CONV = ["proj_in", "proj_out", "conv1", "conv2"]
TEXT_ENCODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
MIXED_PRECISION = ("no", "fp16", "bf16", "auto")
# Flags for the data set the trainer loads itself (--train_data_dir, --dataset_name), not for a ready
# TrainingSet a caller passes (DreamBooth's pairs, a sweep's shared cache).
LOADED_DATA_ONLY = ("caption_dropout_rate", "aspect_ratio_buckets")
# Flags that shape the LoRA layers or their optimiser: a full fine-tune or textual inversion has neither.
LORA_ONLY = ("use_rslora", "use_dora", "loraplus_lr_ratio", "text_encoder_lr")


def flag(default, help: str, **limits):
    """A field with its --help text, and the limits validate() holds it to: at_least, above, below (numbers),
    choices."""
    return field(default=default, metadata={"help": help, **limits})


def required_flag(help: str):
    """A field with no default: the API and the command line both need it (as diffusers' script does)."""
    return field(metadata={"help": help})


@dataclass
class TrainConfig:
    """The trainer's settings; field names are diffusers' flag names. The base model has no default: as with
    diffusers' script, a run names the model it adapts."""

    pretrained_model_name_or_path: str = required_flag("base model: a hub id or a local diffusers folder")
    dataset_name: str | None = flag(None, "hub data set id, or a local imagefolder")
    train_data_dir: str | None = flag(None, "local imagefolder: images plus metadata.jsonl")
    image_column: str = flag("image", "the data set's image column")
    caption_column: str = flag("text", "the data set's caption column")
    resolution: int | None = flag(None, "image size to train at; unset: the model's native size", above=0)
    center_crop: bool = flag(False, "crop the centre (else a random crop)")
    random_flip: bool = flag(False, "flip images left-right at random")
    aspect_ratio_buckets: bool = flag(
        False,
        "kohya's enable_bucket: train each image near its own aspect ratio, in buckets of about "
        "--resolution squared pixels (1:2 to 2:1), each batch from one bucket. Not for DreamBooth",
    )
    train_batch_size: int = flag(1, "images per process per micro-batch", at_least=1)
    dataloader_num_workers: int = flag(0, "data loading processes (0: in the main process)", at_least=0)
    gradient_accumulation_steps: int = flag(1, "micro-batches per optimiser step", at_least=1)
    max_train_steps: int | None = flag(None, "optimiser steps; unset: --num_train_epochs epochs", at_least=1)
    num_train_epochs: int = flag(1, "epochs, when --max_train_steps is not given", at_least=1)
    learning_rate: float = flag(1e-4, "AdamW learning rate", above=0)
    scale_lr: bool = flag(False, "multiply the learning rate by accumulation x batch size x processes")
    lr_scheduler: str = flag(
        "constant",
        "diffusers schedule: linear, cosine, cosine_with_restarts, polynomial, "
        "constant, constant_with_warmup or piecewise_constant",
    )
    lr_warmup_steps: int = flag(0, "steps of linear warm-up", at_least=0)
    adam_beta1: float = flag(0.9, "AdamW beta1", at_least=0, below=1)
    adam_beta2: float = flag(0.999, "AdamW beta2", at_least=0, below=1)
    adam_weight_decay: float = flag(1e-2, "AdamW weight decay", at_least=0)
    adam_epsilon: float = flag(1e-8, "AdamW epsilon", at_least=0)
    max_grad_norm: float = flag(1.0, "clip the gradients' total norm to this", above=0)
    finetune: str = flag(
        "lora",
        "lora; full: the target layers' own weights (a reference); embedding: "
        "textual inversion of --placeholder_token",
        choices=("lora", "full", "embedding"),
    )
    rank: int = flag(4, "LoRA rank r", at_least=1)
    lora_alpha: float | None = flag(
        None, "LoRA alpha (the update is scaled by alpha / r); unset: the rank", above=0
    )
    lora_dropout: float = flag(0.0, "dropout on the LoRA input", at_least=0, below=1)
    use_rslora: bool = flag(False, "rank-stabilised LoRA: scale the update by alpha / sqrt(r), not alpha / r")
    use_dora: bool = flag(
        False, "DoRA: also train a magnitude per output channel (weight-decomposed LoRA, peft's use_dora)"
    )
    loraplus_lr_ratio: float | None = flag(
        None,
        "LoRA+: the B factors (and DoRA's magnitudes) learn at this many times --learning_rate "
        "(16 is the paper's usual; peft's create_loraplus_optimizer); unset: one rate",
        above=0,
    )
    text_encoder_lr: float | None = flag(
        None,
        "learning rate of the text encoder's LoRA (with --train_text_encoder); unset: --learning_rate",
        above=0,
    )
    # "modules": target modules, names or one regex; on the command line one value with a regex character.
    target_modules: list[str] = field(
        default_factory=lambda: list(UNET_ATTENTION),
        metadata={"help": "UNet layers to adapt: module names, or one regex", "modules": True},
    )
    train_text_encoder: bool = flag(False, "also put LoRA on the text encoder")
    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: list(TEXT_ENCODER_ATTENTION),
        metadata={"help": "text encoder layers to adapt: module names, or one regex", "modules": True},
    )
    placeholder_token: str | None = flag(None, "a new word, e.g. <sks>, added to the tokenizer")
    initializer_token: str | None = flag(None, "the word whose embedding the new one starts from")
    learned_embedding: str | None = flag(
        None, "a learned_embeds.safetensors to start the new word from (pivotal tuning's second phase)"
    )
    caption_dropout_rate: float = flag(
        0.0,
        "replace each caption by the empty one with this probability (kohya's; teaches the unconditional "
        "prediction classifier-free guidance uses). Cached text embeddings stay on. Not for DreamBooth",
        at_least=0,
        below=1,
    )
    snr_gamma: float | None = flag(None, "Min-SNR loss weighting gamma (5 is usual); unset: none", above=0)
    noise_offset: float = flag(0.0, "noise offset (0.1 is usual)", at_least=0)
    prediction_type: str | None = flag(
        None, "epsilon or v_prediction; unset: the scheduler's", choices=(None, "epsilon", "v_prediction")
    )
    mixed_precision: str | None = flag(
        None,
        "no, fp16, bf16, or auto (bf16 on GPUs that have it, fp16 on older GPUs, fp32 on a CPU). fp16 "
        "needs a GPU: on a CPU it runs in fp32 instead, and says so",
        choices=(None, *MIXED_PRECISION),
    )
    gradient_checkpointing: bool = flag(False, "recompute activations in the backward pass (less memory)")
    allow_tf32: bool = flag(False, "TF32 matmuls on Ampere and newer GPUs")
    cache_latents: bool | None = flag(
        None,
        "encode the images once before training; unset: whenever the "
        "augmentations allow (needs --center_crop)",
    )
    output_dir: str = flag("sd-model-finetuned-lora", "where the adapter, checkpoints and logs go")
    logging_dir: str = flag("logs", "tracker logs, inside --output_dir")
    report_to: str = flag("none", "none, tensorboard, wandb, or all")
    checkpointing_steps: int = flag(
        500, "save a resumable checkpoint every this many steps (0: never)", at_least=0
    )
    checkpoints_total_limit: int | None = flag(None, "keep only the newest this many checkpoints", at_least=1)
    resume_from_checkpoint: str | None = flag(None, "a checkpoint folder, or latest")
    validation_prompt: str | None = flag(None, "prompt to draw validation images with")
    num_validation_images: int = flag(4, "validation images per prompt", at_least=1)
    validation_steps: int | None = flag(
        None, "draw validation images every this many steps; unset: at the end only", at_least=1
    )
    validation_epochs: int | None = flag(None, "draw validation images every this many epochs", at_least=1)
    seed: int | None = flag(None, "seed for every random draw; unset: 0")
    push_to_hub: bool = flag(False, "upload the result to the hub")
    hub_model_id: str | None = flag(None, "hub repo to upload to; unset: the --output_dir name")
    hub_token: str | None = flag(None, "hub token; unset: the logged-in one")
    max_train_samples: int | None = flag(None, "train on the first this many examples only", at_least=1)
    show_progress: bool = flag(True, "show a progress bar")

    def validate(self) -> None:
        """Refuse any value no run can mean, naming its flag. The trainer calls this before it loads or writes
        anything; so does the command line, right after reading the flags."""
        for f in fields(self):
            check_value(f, getattr(self, f.name))
        from diffusers.optimization import SchedulerType  # here: the flags are read before diffusers loads

        names = [s.value for s in SchedulerType]
        if self.lr_scheduler not in names:
            raise ValueError(
                f"unknown --lr_scheduler {self.lr_scheduler!r}; choose one of: {', '.join(names)}"
            )
        if self.finetune == "embedding" and not self.placeholder_token:
            raise ValueError("--finetune embedding (textual inversion) needs a --placeholder_token to learn")
        if self.finetune == "full" and self.resume_from_checkpoint:
            raise ValueError(
                "--resume_from_checkpoint is for LoRA runs; a full fine-tune is the short reference"
            )
        lora_only = [name for name in LORA_ONLY if getattr(self, name) not in (None, False)]
        if lora_only and self.finetune != "lora":
            raise ValueError(f"--{lora_only[0]} is for LoRA; this run is --finetune {self.finetune}")
        if self.text_encoder_lr is not None and not self.train_text_encoder:
            raise ValueError("--text_encoder_lr needs --train_text_encoder: the text encoder is frozen")
        if self.cache_latents and not self.center_crop:
            raise ValueError("--cache_latents needs --center_crop: a random crop differs at every step")

    def check_own_data_set(self, who: str) -> None:
        """Refuse LOADED_DATA_ONLY flags where ``who`` (a trainer with its own data set) brings the data."""
        given = [name for name in LOADED_DATA_ONLY if getattr(self, name)]
        if given:
            raise ValueError(
                f"--{given[0]} applies to the data set lora_nb.train loads (--train_data_dir, "
                f"--dataset_name); {who} builds its own"
            )


def check_value(f, value) -> None:
    """One field's value against its type and limits; a ValueError names the flag."""
    name, kind, limits = f"--{f.name}", str(f.type), f.metadata
    if value is None and "None" in kind:
        return
    if "choices" in limits and value not in limits["choices"]:
        shown = ", ".join(str(c) for c in limits["choices"] if c is not None)
        raise ValueError(f"unknown {name} {value!r}: use {shown}")
    if kind.startswith("bool") and not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    if kind.startswith("str") and not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    if kind.startswith("list"):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"{name} {value!r} is not a valid regex ({error})") from None
        elif not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be module names (at least one), or one regex; got {value!r}")
    if kind.startswith(("int", "float")):
        check_number(name, value, kind.startswith("int"), **{k: v for k, v in limits.items() if k != "help"})


def check_number(name: str, value, integer: bool, at_least=None, above=None, below=None) -> None:
    whole = "a whole number" if integer else "a number"
    bounds = [f"at least {at_least}"] * (at_least is not None) + [f"above {above}"] * (above is not None)
    bounds += [f"below {below}"] * (below is not None)
    wanted = f"{whole}{' ' + ' and '.join(bounds) if bounds else ''}"
    number = isinstance(value, numbers.Integral if integer else numbers.Real) and math.isfinite(value)
    if (
        isinstance(value, bool)
        or not number
        or (at_least is not None and value < at_least)
        or (above is not None and value <= above)
        or (below is not None and value >= below)
    ):
        raise ValueError(f"{name} {value!r}: must be {wanted}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help."""


def build_parser(config_class: type = TrainConfig, description: str | None = None) -> argparse.ArgumentParser:
    """One flag per config field, named as in diffusers (`--max_train_steps`, `--center_crop`, ...), with the
    field's help text and default, read as the field's declared type says."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    hints = typing.get_type_hints(config_class)
    for f in fields(config_class):
        if not f.metadata.get("help"):
            raise TypeError(f"{config_class.__name__}.{f.name} has no help text: declare it with flag()")
        options = argument_options(f, hints[f.name], config_class.__name__)
        shown = f.metadata["help"] + (" (required)" if options.get("required") else "")
        parser.add_argument(f"--{f.name}", help=shown, **options)
    return parser


def argument_options(f, hint, owner: str) -> dict:
    """How argparse reads one field: bool as --x/--no-x, list[T] as one or more T, int/float/str as one
    value (``T | None`` as T). Any other type raises, rather than be read as a string."""
    if f.default is not MISSING:
        options = {"default": f.default}
    elif f.default_factory is not MISSING:
        options = {"default": f.default_factory()}
    else:
        options = {"required": True, "default": argparse.SUPPRESS}
    if isinstance(hint, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    choices = [c for c in f.metadata.get("choices", ()) if c is not None] or None
    if hint is bool:
        return {**options, "action": argparse.BooleanOptionalAction}
    if typing.get_origin(hint) is list and typing.get_args(hint)[0] in (int, float, str):
        return {**options, "nargs": "+", "type": typing.get_args(hint)[0]}
    if hint in (int, float, str):
        return {**options, "type": hint, "choices": choices}
    raise TypeError(
        f"{owner}.{f.name}: the command line cannot read a {hint}; use bool, int, float, str or a list"
    )


def config_from_args(
    argv: list[str] | None = None, config_class: type = TrainConfig, description: str | None = None
) -> TrainConfig:
    """The config the command line `argv` (default: sys.argv) asks for, checked: a bad flag exits with
    its usage."""
    parser = build_parser(config_class, description)
    values = vars(parser.parse_args(argv))
    for f in fields(config_class):
        modules = values[f.name] if f.metadata.get("modules") else []
        if len(modules) == 1 and set(modules[0]) & set("*+?[](){}|^$\\"):
            values[f.name] = modules[0]  # one regex, matched in full as peft does
    config = config_class(**values)
    try:
        config.validate()
    except ValueError as error:
        parser.error(str(error))
    return config
