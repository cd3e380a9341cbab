"""LoRA weight files: the diffusers/peft format that ``StableDiffusionPipeline.load_lora_weights`` reads.

One safetensors file, keys ``f"{prefix}.{module path}.lora_A.weight"`` (A: (r, d_in)) and ``.lora_B.weight``
(B: (d_out, r)), prefix "unet" or "text_encoder". The tensors give the rank but not alpha, so alpha travels
in the safetensors header the way diffusers' own ``save_lora_weights(..., unet_lora_adapter_metadata=...)``
writes it: key "lora_adapter_metadata", JSON of peft ``LoraConfig`` kwargs with prefixed names
(``{"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": [...], ...}``). diffusers hands those kwargs
to ``LoraConfig`` as they are (diffusers/utils/peft_utils.py ``_create_lora_config``); without them it
assumes alpha = rank, and so does this loader.

``read_lora`` reads the other layouts too (peft adapters, the blog's attention processors, kohya/A1111;
lora_nb/convert.py), says which it found, and hands back this one; ``export_kohya`` writes kohya's.
"""

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .convert import FACTOR_SUFFIXES, cannot_place, component_config, lora_config_for, to_kohya, to_lora_nb
from .convert import pattern_value as _pattern_value  # peft's alpha_pattern rule (extract.py imports it here)
from .inject import freeze_all_but_lora, lora_layers, replace_module
from .layers import LoRALinear

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers looks for in a directory
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFIXES = ("unet", "text_encoder")
PEFT_CONFIG_NAME = "adapter_config.json"
# What a folder may hold, in the order looked for: ours (and diffusers'), a peft adapter's, the blog's pickle
# (diffusers' LORA_WEIGHT_NAME), an older peft adapter's pickle.
WEIGHT_NAMES = (WEIGHT_NAME, "adapter_model.safetensors", "pytorch_lora_weights.bin", "adapter_model.bin")

logger = logging.getLogger(__name__)


@dataclass
class LoraFile:
    """An adapter in lora_nb's layout, whatever layout its file had."""

    tensors: dict[str, torch.Tensor]  # "unet.<module>.lora_A.weight": (r, d_in), ".lora_B.weight": (d_out, r)
    metadata: dict  # peft LoraConfig kwargs with prefixed names; {} means alpha = rank
    format: str = "diffusers"  # the layout read: diffusers (ours), peft, attn_procs or kohya
    path: Path | None = None  # the file read

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], metadata: dict | None = None,
                        config: dict | None = None) -> "LoraFile":
        """An adapter held in memory, in any layout (convert.to_lora_nb says what metadata and config are)."""
        layout, tensors, metadata = to_lora_nb(state, metadata, config)
        return cls(tensors, metadata, layout)


def lora_state_dict(model: nn.Module, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """The model's LoRA factors under diffusers' key names."""
    state = {}
    for path, layer in lora_layers(model).items():
        state[f"{prefix}.{path}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{prefix}.{path}.lora_B.weight"] = layer.lora_B.weight.detach()
    return state


def lora_config(model: nn.Module) -> dict:
    """peft ``LoraConfig`` kwargs describing the model's LoRA layers (what diffusers needs beside tensors)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers")
    return lora_config_for({path: (layer.rank, layer.alpha) for path, layer in layers.items()})


def _weights_path(path: str | os.PathLike) -> Path:
    """A ``*.safetensors`` file name as it is; anything else is a directory to hold pytorch_lora_weights."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / WEIGHT_NAME


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename (atomic on one file system): an interrupted save never leaves a
    # truncated file under the real name, nor clobbers the previous one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt", **metadata})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_lora_file(path: str | os.PathLike, lora: LoraFile) -> Path:
    """Write an adapter in our layout (tensors, and metadata in the header); returns the file's path.

    ``path`` is a directory (the file is then named pytorch_lora_weights.safetensors, as diffusers expects) or
    a ``*.safetensors`` file name.
    """
    if not lora.tensors:
        raise ValueError("nothing to save: the adapter has no tensors")
    return _write(_weights_path(path), lora.tensors, {METADATA_KEY: json.dumps(lora.metadata)})


def save_lora_weights(
    path: str | os.PathLike, unet: nn.Module | None = None, text_encoder: nn.Module | None = None
) -> Path:
    """Write the LoRA layers of ``unet`` and/or ``text_encoder`` to one file; returns its path.

    ``path`` is a directory (the file is then named pytorch_lora_weights.safetensors, as diffusers expects) or
    a ``*.safetensors`` file name.
    """
    tensors, config = {}, {}
    for prefix, model in zip(PREFIXES, (unet, text_encoder)):
        if model is None:
            continue
        config |= {f"{prefix}.{key}": value for key, value in lora_config(model).items()}
        tensors |= lora_state_dict(model, prefix)
    if not tensors:
        raise ValueError("nothing to save: pass unet= and/or text_encoder=")
    return save_lora_file(path, LoraFile(tensors, config))


def find_lora_file(path: str | os.PathLike) -> Path:
    """The weights file ``path`` names: itself, or in a directory the first of WEIGHT_NAMES it holds."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in WEIGHT_NAMES if (path / name).is_file()), None)
        if found is None:
            others = ", ".join(WEIGHT_NAMES[1:])
            raise FileNotFoundError(f"no LoRA weights file at {path / WEIGHT_NAME} (nor {others})")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA weights file at {path}")
    return path


def _load_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A weights file's tensors and the adapter metadata in its header ({} if none)."""
    if path.suffix == ".safetensors":
        with safetensors.safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
        return tensors, json.loads(header.get(METADATA_KEY, "{}"))
    # Anything else is a torch pickle (the blog's pytorch_lora_weights.bin). Unpickling can run any code the
    # file names; weights_only=True lets through tensors and plain containers only, and refuses the rest.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a LoRA state dict (a dict of tensors)")
    return state, {}


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Read an adapter in any layout lora_nb knows (convert.FORMATS) from a file or a directory holding one.

    The result is in our layout, with ``format`` saying what the file was. A peft adapter's
    adapter_config.json (beside the weights) supplies its alpha. Keys that fit no layout raise, listed.
    """
    path = find_lora_file(path)
    state, metadata = _load_state_dict(path)
    config_file = path.parent / PEFT_CONFIG_NAME
    config = json.loads(config_file.read_text()) if config_file.is_file() else None
    lora = replace(LoraFile.from_state_dict(state, metadata, config), path=path)
    logger.info("%s: %s layout, %d LoRA layers", path, lora.format, len(lora.tensors) // 2)
    return lora


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and adapter metadata ({} if none) of a LoRA file, or of a directory holding one; see
    ``read_lora``, which also says which layout the file had."""
    lora = read_lora(path)
    return lora.tensors, lora.metadata


def export_kohya(source: str | os.PathLike | LoraFile, path: str | os.PathLike) -> Path:
    """Write an adapter (a file in any layout, or a LoraFile) as kohya/A1111 keys; returns the file's path.

    ``path`` as for save_lora_file. Each module's alpha is a tensor in the file, so no header is needed;
    ``read_lora`` of the result gives back the same tensors and alphas.
    """
    lora = source if isinstance(source, LoraFile) else read_lora(source)
    return _write(_weights_path(path), to_kohya(lora.tensors, lora.metadata), {})


def _find_linear(modules: dict[str, nn.Module], path: str) -> tuple[str | None, str]:
    """(name, "") of the nn.Linear a file calls ``path``, or (None, why not)."""
    # transformers 5 dropped CLIPTextModel's `text_model.` level; files from older setups still carry it.
    names = (path, path.removeprefix("text_model."), "text_model." + path)
    for name in names:
        if isinstance(modules.get(name), nn.Linear):
            return name, ""
    if any(isinstance(modules.get(name), LoRALinear) for name in names):
        return None, f"module {path!r} already has LoRA; call remove_lora() first"
    return None, f"module {path!r} is not an nn.Linear in {type(modules['']).__name__}"


def _plan(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str | None, config: dict
          ) -> tuple[dict, list[str]]:
    """Check a state dict against the model without touching it: ({module name: (A, B, alpha)}, problems),
    a problem being "key: why it cannot be placed"."""
    if config.get("use_dora") or config.get("use_rslora") or config.get("lora_bias"):
        raise ValueError("DoRA, rsLoRA and LoRA biases are not supported")
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # path -> {"A"/"B": (key, tensor)}
    problems = []
    for key, tensor in state_dict.items():
        short = key.removeprefix(f"{prefix}.") if prefix else key
        suffix = next((s for s in FACTOR_SUFFIXES if short.endswith(s)), None)
        if suffix is None:
            problems.append(
                f"{key}: not a LoRA factor (expected a key ending in one of {list(FACTOR_SUFFIXES)})"
            )
        else:
            factors.setdefault(short.removesuffix(suffix), {})[FACTOR_SUFFIXES[suffix]] = (key, tensor)
    modules = dict(model.named_modules())
    plan = {}
    for path, ab in factors.items():
        if len(ab) < 2:
            (key, _), missing = next(iter(ab.values())), ({"A", "B"} - set(ab)).pop()
            problems.append(f"{key}: the file has no lora_{missing} for {path}")
            continue
        (key_a, a), (key_b, b) = ab["A"], ab["B"]
        name, problem = _find_linear(modules, path)
        if name is None:
            problems.append(f"{key_a}: {problem}")
            continue
        base, rank = modules[name], a.shape[0]
        shapes = ((key_a, a, (rank, base.in_features)), (key_b, b, (base.out_features, rank)))
        wrong = [f"{key}: {name} needs shape {expected} (from the model), the file has {tuple(tensor.shape)}"
                 for key, tensor, expected in shapes if tuple(tensor.shape) != expected]
        problems += wrong
        if not wrong:
            alpha = _pattern_value(config.get("alpha_pattern", {}), path, config.get("lora_alpha", rank))
            plan[name] = (a, b, alpha)
    return plan, problems


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
    model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str | None = None,
    config: dict | None = None,
) -> list[str]:
    """Add LoRA layers holding ``state_dict``'s factors to ``model``; returns the names wrapped.

    Only keys under ``prefix + "."`` are read (all keys if ``prefix`` is None). ``config`` holds LoraConfig
    kwargs without the prefix (``lora_alpha``, ``alpha_pattern``); without it alpha = rank. Everything is
    checked first: on any error (listing every key that cannot be placed) the model is left untouched.
    """
    if prefix:
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    if not state_dict:
        raise ValueError(f"no LoRA weights for prefix {prefix!r}")
    plan, problems = _plan(model, state_dict, prefix, config or {})
    if problems:
        raise cannot_place(problems)
    return _apply(model, plan)


def load_lora_weights(
    path: str | os.PathLike | LoraFile, unet: nn.Module | None = None, text_encoder: nn.Module | None = None
) -> dict[str, list[str]]:
    """Load an adapter (a file in any layout ``read_lora`` knows, a directory holding one, or a LoraFile) into
    the given models.

    Returns the wrapped names per component. Both models are checked before either is changed; an error lists
    every key that cannot be placed.
    """
    lora = path if isinstance(path, LoraFile) else read_lora(path)
    plans, problems = {}, []
    for prefix, model in zip(PREFIXES, (unet, text_encoder)):
        if model is None:
            continue
        state = {k: v for k, v in lora.tensors.items() if k.startswith(f"{prefix}.")}
        if not state:
            raise ValueError(f"{lora.path or 'the adapter'} holds no {prefix} LoRA weights "
                             f"(no keys starting with {prefix + '.'!r})")
        plan, wrong = _plan(model, state, prefix, component_config(lora.metadata, prefix))
        plans[prefix] = (model, plan)
        problems += wrong
    if not plans:
        raise ValueError("nothing to load into: pass unet= and/or text_encoder=")
    if problems:
        raise cannot_place(problems)
    return {prefix: _apply(model, plan) for prefix, (model, plan) in plans.items()}
