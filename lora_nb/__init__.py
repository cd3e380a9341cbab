"""lora_nb: LoRA fine-tuning of Stable Diffusion, small enough to read. The names a notebook uses.

Reading order, following a batch from files to images: `layers` (a LoRA layer: B(A x)) -> `inject` (put
layers on a model's targets) -> `data` (images and captions to batches) -> `objective` (the denoising loss)
-> `config` and `train` (the trainer: setup, the loop, finish), with `checkpoints` (saving, resuming, the
output folder's lock) and `card` (validation images, the model card) -> `formats` and `convert` (adapter
files, their layouts) -> `inference` (an adapter on an unmodified base pipeline); beside them `dreambooth`,
`textual_inversion`, `mix`, `extract`, `sizes`. The course (the embedded tiny model, data sets, figures,
the notebook runner) is `lora_nb.course`; the library never imports it.

They load on first use (PEP 562). `python -m lora_nb.train` imports this package before it runs train.py as
__main__: importing lora_nb.train here as well would load it twice (runpy's RuntimeWarning), and the torch
and diffusers imports would come before the command line's flags are even read.
"""

import importlib
import sys
import types

__all__ = [
    "TEXT_ENCODER_ATTENTION",
    "UNET_ATTENTION",
    "UNET_CROSS_ATTENTION",
    "LoRAConv2d",
    "LoRALayer",
    "LoRALinear",
    "TrainConfig",
    "count_parameters",
    "export_kohya",
    "fuse_lora",
    "inject_lora",
    "load_lora_pipeline",
    "load_lora_weights",
    "lora_layers",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "mix_loras",
    "read_lora",
    "remove_lora",
    "save_lora_weights",
    "set_lora_scale",
    "train",
    "unfuse_lora",
    "unmerge_lora",
]
_SOURCES = {  # each name's submodule
    **dict.fromkeys(
        ["TEXT_ENCODER_ATTENTION", "UNET_ATTENTION", "UNET_CROSS_ATTENTION", "TrainConfig"], "config"
    ),
    **dict.fromkeys(
        ["export_kohya", "load_lora_weights", "lora_state_dict", "read_lora", "save_lora_weights"], "formats"
    ),
    **dict.fromkeys(
        [
            "count_parameters",
            "fuse_lora",
            "inject_lora",
            "lora_layers",
            "lora_parameters",
            "merge_lora",
            "remove_lora",
            "set_lora_scale",
            "unfuse_lora",
            "unmerge_lora",
        ],
        "inject",
    ),
    "load_lora_pipeline": "inference",
    **dict.fromkeys(["LoRAConv2d", "LoRALayer", "LoRALinear"], "layers"),
    "mix_loras": "mix",
    "train": "train",
}


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule lora_nb.train sets this package's `train` to it. Here `train` is the
        # function (`from lora_nb import train`); the module stays sys.modules["lora_nb.train"].
        if not (name == "train" and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
