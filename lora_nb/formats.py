"""Adapter I/O: the adapter in memory (``LoraAdapter``), its one reader and one writer, and putting it into a
model. Reading and writing files happens here; every key and tensor layout transform is in convert.py.

The file is the diffusers/peft format that ``StableDiffusionPipeline.load_lora_weights`` reads.

One safetensors file, keys ``f"{prefix}.{module path}.lora_A.weight"`` (A: (r, d_in)) and ``.lora_B.weight``
(B: (d_out, r)), prefix "unet" or "text_encoder". The tensors give the rank but not alpha, so alpha travels
in the safetensors header the way diffusers' own ``save_lora_weights(..., unet_lora_adapter_metadata=...)``
writes it: key "lora_adapter_metadata", JSON of peft ``LoraConfig`` kwargs with prefixed names
(``{"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": [...], ...}``). diffusers hands those kwargs
to ``LoraConfig`` as they are (diffusers/utils/peft_utils.py ``_create_lora_config``); without them it
assumes alpha = rank, and so does this loader.

``read_lora`` reads the other layouts too (peft adapters, the blog's attention processors, kohya/A1111;
lora_nb/convert.py), says which it found, and hands back this one; ``save_lora_weights`` writes it, and
``export_kohya`` writes kohya's.
"""

import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .convert import (
    FACTOR_SUFFIXES,
    MAGNITUDE,
    cannot_place,
    layer_alpha,
    lora_config_for,
    metadata_for,
    pair_factors,
    select_component,
    to_kohya,
    to_lora_nb,
)
from .inject import freeze_all_but_lora, lora_layers, replace_module
from .layers import LoRALayer, lora_class

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers looks for in a directory
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFIXES = ("unet", "text_encoder")
PEFT_CONFIG_NAME = "adapter_config.json"
# What a folder may hold, in the order looked for: ours (and diffusers'), a peft adapter's, the blog's pickle
# (diffusers' LORA_WEIGHT_NAME), an older peft adapter's pickle.
WEIGHT_NAMES = (WEIGHT_NAME, "adapter_model.safetensors", "pytorch_lora_weights.bin", "adapter_model.bin")

logger = logging.getLogger(__name__)


@dataclass
class LoraAdapter:
    """An adapter in memory, in lora_nb's layout, whatever layout its file (if any) had."""

    tensors: dict[str, torch.Tensor]  # "unet.<module>.lora_A.weight": (r, d_in), ".lora_B.weight": (d_out, r)
    metadata: dict  # peft LoraConfig kwargs with prefixed names; {} means alpha = rank
    format: str = "diffusers"  # the layout read: diffusers (ours), peft, attn_procs or kohya
    path: Path | None = None  # the file read

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], metadata: dict | None = None, config: dict | None = None
    ) -> "LoraAdapter":
        """An adapter from a state dict in any layout (see convert.to_lora_nb for metadata and config)."""
        layout, tensors, metadata = to_lora_nb(state, metadata, config)
        return cls(tensors, metadata, layout)

    @classmethod
    def from_models(
        cls, unet: nn.Module | None = None, text_encoder: nn.Module | None = None
    ) -> "LoraAdapter":
        """The LoRA layers of ``unet`` and/or ``text_encoder``: their factors and their ranks and alphas."""
        tensors, layers, variants = {}, {}, {}
        for prefix, model in zip(PREFIXES, (unet, text_encoder)):
            if model is None:
                continue
            if not lora_layers(model):
                raise ValueError(f"{type(model).__name__} has no LoRA layers")
            tensors |= lora_state_dict(model, prefix)
            layers |= {f"{prefix}.{path}": (m.rank, m.alpha) for path, m in lora_layers(model).items()}
            variants[prefix] = lora_variants(model)
        if not tensors:
            raise ValueError("nothing to save: pass unet= and/or text_encoder=")
        return cls(tensors, metadata_for(layers, variants))


def lora_state_dict(model: nn.Module, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """The model's LoRA factors (and DoRA magnitudes) under diffusers' key names, packed in memory: after
    ``model.to(memory_format=torch.channels_last)`` a convolution's factors are not, and safetensors saves
    only packed tensors."""
    state = {}
    for path, layer in lora_layers(model).items():
        state[f"{prefix}.{path}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        state[f"{prefix}.{path}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
        if layer.use_dora:
            state[f"{prefix}.{path}{MAGNITUDE}"] = layer.lora_magnitude_vector.detach().contiguous()
    return state


def lora_variants(model: nn.Module) -> dict[str, bool]:
    """{"use_dora": ..., "use_rslora": ...} of the model's LoRA layers; peft's LoraConfig holds one of each
    per model, so layers that differ raise, naming the first that does."""
    layers = lora_layers(model)
    found = {name: {"use_dora": m.use_dora, "use_rslora": m.use_rslora} for name, m in layers.items()}
    first, variants = next(iter(found.items()))
    other = next((name for name, v in found.items() if v != variants), None)
    if other is not None:
        raise ValueError(
            f"{other} is {found[other]} but {first} is {variants}: a file holds one DoRA and one "
            "rsLoRA setting per model (peft's LoraConfig)"
        )
    return variants


def lora_config(model: nn.Module) -> dict:
    """peft ``LoraConfig`` kwargs describing the model's LoRA layers (what diffusers needs beside tensors)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers")
    layer_config = {path: (layer.rank, layer.alpha) for path, layer in layers.items()}
    return lora_config_for(layer_config, lora_variants(model))


def _weights_path(path: str | os.PathLike) -> Path:
    """A ``*.safetensors`` file name as it is; anything else is a directory to hold pytorch_lora_weights."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / WEIGHT_NAME


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file with its header's metadata in sorted order. safetensors itself keeps the metadata
    in a hash map, whose order changes from one save to the next; the same adapter should be the same file."""
    raw = safetensors.torch.save(tensors)
    size = int.from_bytes(raw[:8], "little")
    header = {"__metadata__": dict(sorted(metadata.items())), **json.loads(raw[8 : 8 + size])}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the tensor data starts 8-byte aligned, as safetensors pads it
    return len(text).to_bytes(8, "little") + text + raw[8 + size :]


def file_header(metadata: dict | None) -> dict[str, str]:
    """The safetensors header a file of ours carries: torch's "format" and, unless None, the adapter's
    metadata as JSON under METADATA_KEY. sizes.adapter_size counts these very bytes."""
    ours = {} if metadata is None else {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
    return {"format": "pt", **ours}


def _write(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target, then rename (atomic on one file system): an interrupted save never leaves a
    # truncated file under the real name, nor clobbers the previous one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(_safetensors_bytes(tensors, header))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_lora_weights(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    *,
    adapter: LoraAdapter | None = None,
) -> Path:
    """Write an adapter in our layout (tensors, and metadata in the header); returns the file's path.

    The adapter is ``adapter`` (read, mixed or extracted), or the LoRA layers of ``unet`` and/or
    ``text_encoder``. ``path`` is a directory (the file is then named pytorch_lora_weights.safetensors, as
    diffusers expects) or a ``*.safetensors`` file name.
    """
    if adapter is None:
        adapter = LoraAdapter.from_models(unet, text_encoder)
    elif unet is not None or text_encoder is not None:
        raise TypeError("pass an adapter, or unet= and/or text_encoder=, not both")
    if not adapter.tensors:
        raise ValueError("nothing to save: the adapter has no tensors")
    return _write(_weights_path(path), adapter.tensors, file_header(adapter.metadata))


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


def read_json(text: str, where: str, kind: type = dict):
    """JSON that must hold a ``kind``; a ValueError names ``where`` (a file, or a file and key) otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(value, kind):
        raise ValueError(  # noqa: TRY004 (bad input, reported as the malformed JSON above is)
            f"{where}: expected a JSON {kind.__name__}, got {value!r:.80}"
        )
    return value


def load_pickle(path: Path):
    """A torch pickle's tensors and plain values (dicts, lists, numbers, strings). A pickle naming anything
    else is refused unopened: unpickling it would run whatever code the file chooses."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL (\S+)", str(error))
        raise ValueError(
            f"{path}: refused. This pickle holds more than tensors and plain values"
            f"{f' (it names {named[1]})' if named else ''}, and loading it would run code the file "
            "chooses. Ask its author for a .safetensors file; or, only if you trust where it came from, "
            "convert it once: "
            f"python -c \"import torch, safetensors.torch as st; st.save_file(torch.load('{path}', "
            f"weights_only=False), '{path.with_suffix('.safetensors')}')\""
        ) from None


def _load_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A weights file's tensors and the adapter metadata in its header ({} if none)."""
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(path, framework="pt") as f:
                header = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
        except safetensors.SafetensorError as error:
            raise ValueError(
                f"{path}: not a readable safetensors file ({error}); it may be truncated or "
                "still being written: copy or download it again"
            ) from None
        return tensors, read_json(header.get(METADATA_KEY, "{}"), f"{path}, header key {METADATA_KEY!r}")
    # Anything else is a torch pickle (the blog's pytorch_lora_weights.bin).
    state = load_pickle(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a LoRA state dict (a dict of tensors)")
    return state, {}


def read_lora(path: str | os.PathLike) -> LoraAdapter:
    """Read an adapter in any layout lora_nb knows (convert.FORMATS) from a file or a directory holding one.

    The result is in our layout, with ``format`` saying what the file was. A peft adapter's
    adapter_config.json (beside the weights) supplies its alpha. Keys that fit no layout raise, listed.
    """
    path = find_lora_file(path)
    state, metadata = _load_state_dict(path)
    config_file = path.parent / PEFT_CONFIG_NAME
    config = read_json(config_file.read_text(), str(config_file)) if config_file.is_file() else None
    lora = replace(LoraAdapter.from_state_dict(state, metadata, config), path=path)
    layers = sum(key.endswith(".lora_A.weight") for key in lora.tensors)
    logger.info("%s: %s layout, %d LoRA layers", path, lora.format, layers)
    return lora


def export_kohya(source: str | os.PathLike | LoraAdapter, path: str | os.PathLike) -> Path:
    """Write an adapter (a file in any layout, or a LoraAdapter) as kohya/A1111 keys; returns the file's path.

    ``path`` as for save_lora_weights. Each module's alpha is a tensor in the file, so no header is needed;
    ``read_lora`` of the result gives back the same tensors and alphas.
    """
    lora = source if isinstance(source, LoraAdapter) else read_lora(source)
    return _write(_weights_path(path), to_kohya(lora.tensors, lora.metadata), file_header(None))


def _find_target(modules: dict[str, nn.Module], path: str) -> tuple[str | None, str]:
    """(name, "") of the nn.Linear or nn.Conv2d a file calls ``path``, or (None, why not)."""
    # transformers 5 dropped CLIPTextModel's `text_model.` level; files from older setups still carry it.
    names = (path, path.removeprefix("text_model."), "text_model." + path)
    for name in names:
        if name in modules and lora_class(modules[name]) is not None:
            return name, ""
    if any(isinstance(modules.get(name), LoRALayer) for name in names):
        return None, f"module {path!r} already has LoRA; call remove_lora() first"
    return None, f"module {path!r} is not an nn.Linear or nn.Conv2d in {type(modules['']).__name__}"


def _plan(
    model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str | None, config: dict
) -> tuple[dict, list[str]]:
    """Check one component's factors (keys without ``prefix``) against the model without touching it:
    ({module name: (A, B, alpha, magnitude or None, use_rslora)}, problems), a problem being "key: why it
    cannot be placed"."""
    if config.get("lora_bias"):
        raise ValueError("LoRA biases (peft's lora_bias) are not supported")
    full = f"{prefix}.{{}}" if prefix else "{}"  # keys are named in full in the problems
    pairs, problems = pair_factors(state_dict, FACTOR_SUFFIXES)
    problems = [full.format(problem) for problem in problems]
    modules = dict(model.named_modules())
    plan = {}
    for path, keys in pairs.items():
        named = {factor: (full.format(key), state_dict[key]) for factor, key in keys.items()}
        name, problem = _find_target(modules, path)
        if name is None:
            problems.append(f"{named['A'][0]}: {problem}")
            continue
        wrong = _wrong_factors(modules[name], name, named, bool(config.get("use_dora")))
        (key_a, a), (_, b) = named["A"], named["B"]
        try:
            alpha = layer_alpha(config, path, a.shape[0] if a.dim() else 0, prefix or "")
        except (TypeError, ValueError) as error:
            wrong.append(f"{key_a}: {error} in the adapter metadata")
        problems += wrong
        if not wrong:
            plan[name] = (a, b, alpha, named.get("m", (None, None))[1], bool(config.get("use_rslora")))
    return plan, problems


def _wrong_factors(base: nn.Module, name: str, named: dict, use_dora: bool) -> list:
    """What is wrong with one layer's A, B (and DoRA magnitude): shapes that do not fit ``base``, a
    magnitude the metadata promises but the file lacks, NaN or inf values. ``named``: {"A": (key, A), ...}."""
    (key_a, a), (key_b, b) = named["A"], named["B"]
    shape_a, _ = lora_class(base).factor_shapes(base, 1)
    rank = a.shape[0] if a.dim() == len(shape_a) else 0
    if rank < 1:
        needs = ", ".join(["r", *map(str, shape_a[1:])])
        return [f"{key_a}: {name} needs shape ({needs}) with r >= 1, the file has {tuple(a.shape)}"]
    expected_a, expected_b = lora_class(base).factor_shapes(base, rank)
    d_out = expected_b[0]
    if use_dora and "m" not in named:
        return [f"{key_a}: the metadata says use_dora, but the file has no lora_magnitude_vector for {name}"]
    checks = [(key_a, a, expected_a), (key_b, b, expected_b)]
    checks += [(*named["m"], None)] if "m" in named else []  # a magnitude's shape varies; its size does not
    wrong = []
    for key, tensor, expected in checks:
        if expected is None and tensor.numel() != d_out:
            why = (
                f"needs {d_out} magnitudes (one per output channel), the file has shape {tuple(tensor.shape)}"
            )
            wrong.append(f"{key}: {name} {why}")
        elif expected is not None and tuple(tensor.shape) != expected:
            wrong.append(
                f"{key}: {name} needs shape {expected} (from the model), the file has {tuple(tensor.shape)}"
            )
        elif not torch.isfinite(tensor).all():
            wrong.append(
                f"{key}: holds NaN or inf values, so every image would be NaN; this adapter is broken"
            )
    return wrong


@torch.no_grad()
def _build(model: nn.Module, plan: dict) -> dict[str, LoRALayer]:
    """The LoRA layers of a checked plan, built (and filled) without changing the model."""
    layers = {}
    for name, (a, b, alpha, m, use_rslora) in plan.items():
        base = model.get_submodule(name)
        layer = lora_class(base)(base, a.shape[0], alpha, use_rslora=use_rslora, use_dora=m is not None)
        layer.lora_A.weight.copy_(a)  # to the factors' fp32, on the base's device
        layer.lora_B.weight.copy_(b)
        if m is not None:  # kohya's dora_scale may come (d_out, 1); the layer keeps peft's shape
            layer.lora_magnitude_vector.copy_(m.reshape(layer.lora_magnitude_vector.shape))
        layers[name] = layer
    return layers


def _swap_in(model: nn.Module, layers: dict[str, LoRALayer]) -> list[str]:
    for name, layer in layers.items():
        replace_module(model, name, layer)
    freeze_all_but_lora(model)  # as inject_lora leaves it: ready to train on, or to run
    return list(layers)


def load_lora_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    prefix: str | None = None,
    config: dict | None = None,
) -> list[str]:
    """Add LoRA layers holding ``state_dict``'s factors to ``model``; returns the names wrapped.

    Only keys under ``prefix + "."`` are read (all keys if ``prefix`` is None). ``config`` holds LoraConfig
    kwargs without the prefix (``lora_alpha``, ``alpha_pattern``); without it alpha = rank. Everything is
    checked first: on any error (listing every key that cannot be placed) the model is left untouched.
    """
    if prefix:
        state_dict = select_component(state_dict, prefix)
    if not state_dict:
        raise ValueError(f"no LoRA weights for prefix {prefix!r}")
    plan, problems = _plan(model, state_dict, prefix, config or {})
    if problems:
        raise cannot_place(problems)
    return _swap_in(model, _build(model, plan))


def load_lora_weights(
    path: str | os.PathLike | LoraAdapter,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
) -> dict[str, list[str]]:
    """Load an adapter (a file in any layout ``read_lora`` knows, a directory holding one, or a LoraAdapter)
    into the given models.

    Returns the wrapped names per component. Both models are checked before either is changed; an error lists
    every key that cannot be placed.
    """
    lora = path if isinstance(path, LoraAdapter) else read_lora(path)
    plans, problems = {}, []
    for prefix, model in zip(PREFIXES, (unet, text_encoder)):
        if model is None:
            continue
        state = select_component(lora.tensors, prefix)
        if not state:
            raise ValueError(
                f"{lora.path or 'the adapter'} holds no {prefix} LoRA weights "
                f"(no keys starting with {prefix + '.'!r})"
            )
        plan, wrong = _plan(model, state, prefix, select_component(lora.metadata, prefix))
        plans[prefix] = (model, plan)
        problems += wrong
    if not plans:
        raise ValueError("nothing to load into: pass unet= and/or text_encoder=")
    if problems:
        raise cannot_place(problems)
    # Every layer of both models is built before either model changes.
    built = {prefix: (model, _build(model, plan)) for prefix, (model, plan) in plans.items()}
    return {prefix: _swap_in(model, layers) for prefix, (model, layers) in built.items()}
