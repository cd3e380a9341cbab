"""LoRA weight files: the diffusers/peft format that ``StableDiffusionPipeline.load_lora_weights`` reads.

One safetensors file, keys ``f"{prefix}.{module path}.lora_A.weight"`` (A: (r, d_in)) and ``.lora_B.weight``
(B: (d_out, r)), prefix "unet" or "text_encoder". The tensors give the rank but not alpha, so alpha travels
in the safetensors header the way diffusers' own ``save_lora_weights(..., unet_lora_adapter_metadata=...)``
writes it: key "lora_adapter_metadata", JSON of peft ``LoraConfig`` kwargs with prefixed names
(``{"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": [...], ...}``). diffusers hands those kwargs
to ``LoraConfig`` as they are (diffusers/utils/peft_utils.py ``_create_lora_config``); without them it
assumes alpha = rank, and so does this loader. Other layouts (kohya, attention processors) get their own
readers that produce this one.
"""

import json
import os
import re
from collections import Counter
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .inject import freeze_all_but_lora, lora_layers, replace_module
from .layers import LoRALinear

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers looks for in a directory
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFIXES = ("unet", "text_encoder")

# Key ending -> factor. Older diffusers files spell A "down" and B "up".
_FACTOR_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A",
    ".lora_linear_layer.up.weight": "B",
}


def lora_state_dict(model: nn.Module, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """The model's LoRA factors under diffusers' key names."""
    state = {}
    for path, layer in lora_layers(model).items():
        state[f"{prefix}.{path}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{prefix}.{path}.lora_B.weight"] = layer.lora_B.weight.detach()
    return state


def lora_config(model: nn.Module) -> dict:
    """peft ``LoraConfig`` kwargs describing the model's LoRA layers (what diffusers needs besides tensors)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers")
    r = Counter(layer.rank for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    # Layers off the common value go in patterns keyed "^path", as diffusers writes them: the "^" pins peft's
    # suffix match to the full name.
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(layers),
        "rank_pattern": {f"^{p}": layer.rank for p, layer in layers.items() if layer.rank != r},
        "alpha_pattern": {f"^{p}": layer.alpha for p, layer in layers.items() if layer.alpha != alpha},
    }


def save_lora_weights(
    path: str | os.PathLike, unet: nn.Module | None = None, text_encoder: nn.Module | None = None
) -> Path:
    """Write the LoRA layers of ``unet`` and/or ``text_encoder`` to one file; returns its path.

    ``path`` is a directory (the file is then named pytorch_lora_weights.safetensors, as diffusers expects) or
    a ``*.safetensors`` file name.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / WEIGHT_NAME
    tensors, config = {}, {}
    for prefix, model in zip(PREFIXES, (unet, text_encoder)):
        if model is None:
            continue
        config |= {f"{prefix}.{key}": value for key, value in lora_config(model).items()}
        tensors |= lora_state_dict(model, prefix)
    if not tensors:
        raise ValueError("nothing to save: pass unet= and/or text_encoder=")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename (atomic on one file system): an interrupted save never leaves a
    # truncated file under the real name, nor clobbers the previous one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt", METADATA_KEY: json.dumps(config)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and adapter metadata ({} if none) of a LoRA file, or of a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights file at {path}")
    with safetensors.safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    return tensors, json.loads(header.get(METADATA_KEY, "{}"))


def _pattern_value(patterns: dict, path: str, default):
    """peft's ``rank_pattern``/``alpha_pattern`` lookup (peft.utils.other.get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _find_linear(modules: dict[str, nn.Module], path: str, key: str) -> str:
    """The name of the nn.Linear a file calls ``path``; raises naming ``key``."""
    # transformers 5 dropped CLIPTextModel's `text_model.` level; files from older setups still carry it.
    names = (path, path.removeprefix("text_model."), "text_model." + path)
    for name in names:
        if isinstance(modules.get(name), nn.Linear):
            return name
    if any(isinstance(modules.get(name), LoRALinear) for name in names):
        problem = "already has LoRA; call remove_lora() first"
    else:
        problem = f"is not an nn.Linear in {type(modules['']).__name__}"
    raise ValueError(f"{key}: module {path!r} {problem}")


def _plan(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str | None, config: dict) -> dict:
    """Check a state dict against the model without touching it: {module name: (A, B, alpha)}."""
    if config.get("use_dora") or config.get("use_rslora") or config.get("lora_bias"):
        raise ValueError("DoRA, rsLoRA and LoRA biases are not supported")
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # path -> {"A"/"B": (key, tensor)}
    for key, tensor in state_dict.items():
        short = key.removeprefix(f"{prefix}.") if prefix else key
        suffix = next((s for s in _FACTOR_SUFFIXES if short.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"{key}: not a LoRA factor (expected a key ending in one of {list(_FACTOR_SUFFIXES)})")
        factors.setdefault(short.removesuffix(suffix), {})[_FACTOR_SUFFIXES[suffix]] = (key, tensor)
    modules = dict(model.named_modules())
    plan = {}
    for path, ab in factors.items():
        if len(ab) < 2:
            (key, _), missing = next(iter(ab.values())), ({"A", "B"} - set(ab)).pop()
            raise ValueError(f"{key}: the file has no lora_{missing} for {path}")
        (key_a, a), (key_b, b) = ab["A"], ab["B"]
        name = _find_linear(modules, path, key_a)
        base = modules[name]
        rank = a.shape[0]
        for key, tensor, expected in ((key_a, a, (rank, base.in_features)), (key_b, b, (base.out_features, rank))):
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{key}: {name} needs shape {expected} (from the model), the file has {tuple(tensor.shape)}"
                )
        plan[name] = (a, b, _pattern_value(config.get("alpha_pattern", {}), path, config.get("lora_alpha", rank)))
    return plan


@torch.no_grad()
def _apply(model: nn.Module, plan: dict) -> list[str]:
    for name, (a, b, alpha) in plan.items():
        layer = LoRALinear(model.get_submodule(name), rank=a.shape[0], alpha=alpha)
        layer.lora_A.weight.copy_(a)  # to the factors' fp32, on the base's device
        layer.lora_B.weight.copy_(b)
        replace_module(model, name, layer)
    freeze_all_but_lora(model)  # as inject_lora leaves it: ready to train on, or to run
    return list(plan)


def load_lora_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str | None = None, config: dict | None = None
) -> list[str]:
    """Add LoRA layers holding ``state_dict``'s factors to ``model``; returns the names wrapped.

    Only keys under ``prefix + "."`` are read (all keys if ``prefix`` is None). ``config`` holds LoraConfig
    kwargs without the prefix (``lora_alpha``, ``alpha_pattern``); without it alpha = rank. Everything is
    checked first: on any error the model is left untouched.
    """
    if prefix:
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    if not state_dict:
        raise ValueError(f"no LoRA weights for prefix {prefix!r}")
    return _apply(model, _plan(model, state_dict, prefix, config or {}))


def load_lora_weights(
    path: str | os.PathLike, unet: nn.Module | None = None, text_encoder: nn.Module | None = None
) -> dict[str, list[str]]:
    """Load a LoRA file (or a directory holding pytorch_lora_weights.safetensors) into the given models.

    Returns the wrapped names per component. Both models are checked before either is changed.
    """
    tensors, metadata = read_lora_file(path)
    plans = {}
    for prefix, model in zip(PREFIXES, (unet, text_encoder)):
        if model is None:
            continue
        state = {k: v for k, v in tensors.items() if k.startswith(f"{prefix}.")}
        if not state:
            raise ValueError(f"{path} holds no {prefix} LoRA weights (no keys starting with {prefix + '.'!r})")
        config = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
        plans[prefix] = (model, _plan(model, state, prefix, config))
    if not plans:
        raise ValueError("nothing to load into: pass unet= and/or text_encoder=")
    return {prefix: _apply(model, plan) for prefix, (model, plan) in plans.items()}
