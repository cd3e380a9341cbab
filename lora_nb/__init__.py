"""lora_nb: LoRA fine-tuning of Stable Diffusion, small enough to read. The names a notebook uses."""

import logging

from transformers.utils import logging as _transformers_logging


class _NoTorchvisionNotice(logging.Filter):
    """transformers notes on every import that torchvision is missing; lora_nb needs none, so drop that one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


for _handler in _transformers_logging.get_logger().handlers:
    _handler.addFilter(_NoTorchvisionNotice())

from .formats import export_kohya, load_lora_weights, lora_state_dict, read_lora, save_lora_weights
from .inference import load_lora_pipeline
from .inject import (
    TEXT_ENCODER_ATTENTION,
    UNET_ATTENTION,
    UNET_CROSS_ATTENTION,
    count_parameters,
    fuse_lora,
    inject_lora,
    lora_layers,
    lora_parameters,
    merge_lora,
    remove_lora,
    set_lora_scale,
    unfuse_lora,
    unmerge_lora,
)
from .layers import LoRALinear
from .mix import mix_loras
from .tiny import TINY_SD_PATH, load_tiny_pipeline
from .train import TrainConfig, train

__all__ = [
    "TEXT_ENCODER_ATTENTION", "TINY_SD_PATH", "UNET_ATTENTION", "UNET_CROSS_ATTENTION", "LoRALinear",
    "TrainConfig", "count_parameters", "export_kohya", "fuse_lora", "inject_lora", "load_lora_pipeline",
    "load_lora_weights", "load_tiny_pipeline", "lora_layers", "lora_parameters", "lora_state_dict", "merge_lora", "mix_loras",
    "read_lora", "remove_lora", "save_lora_weights", "set_lora_scale", "train", "unfuse_lora", "unmerge_lora",
]
