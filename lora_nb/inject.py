"""Putting LoRA layers into a model and taking them out again.

Targets are chosen exactly as peft's ``LoraConfig(target_modules=...)`` chooses them, so a config written
for diffusers/peft selects the same layers here: a list entry matches a qualified module name equal to it
or ending in "." + entry; a single string is a regex that must match the whole name.
"""

import re

from torch import nn

# The target modules, re-exported: they are defined beside the trainer's flags, which load without torch.
from .config import (  # noqa: F401
    TEXT_ENCODER_ATTENTION,
    UNET_ATTENTION,
    UNET_CONV,
    UNET_CROSS_ATTENTION,
    UNET_FEED_FORWARD,
)
from .layers import LoRALayer, finite_number, lora_class

Targets = str | list[str]
# The named target sets, for sizes and sweeps: {name: (UNet target modules, whether every text encoder's
# attention gets LoRA too)}.
TARGET_SETS: dict[str, tuple[Targets, bool]] = {
    "cross-attention": (UNET_CROSS_ATTENTION, False),  # attn2 only: the layers that read the prompt
    "attention": (UNET_ATTENTION, False),  # attn1 + attn2: diffusers' default, the blog's
    "attention+ff": (UNET_ATTENTION + UNET_FEED_FORWARD, False),  # + each transformer block's MLP
    "attention+text encoder": (UNET_ATTENTION, True),  # + q/k/v/out of every CLIP layer
    "attention+conv": (UNET_ATTENTION + UNET_CONV, False),  # + the convolutions: kohya's LoCon
}


def matches(name: str, targets: Targets) -> bool:
    """Whether the qualified module ``name`` is selected by ``targets`` (peft's rule)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The model's LoRA layers (LoRALinear, LoRAConv2d) by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def _short_name(name: str) -> str:
    """The shortest list entry selecting ``name``'s kind of layer: "to_q", or "to_out.0" (not just "0")."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def find_targets(model: nn.Module, target_modules: Targets) -> list[str]:
    """Names of the layers LoRA can wrap (nn.Linear, nn.Conv2d) that ``target_modules`` selects; raises if any
    entry selects none."""
    wrapped = lora_layers(model)
    # The layers inside a LoRA layer (base, lora_A, lora_B) are never targets themselves.
    linears = [
        name
        for name, m in model.named_modules()
        if lora_class(m) is not None and not any(name.startswith(w + ".") for w in wrapped)
    ]
    already = [name for name in wrapped if matches(name, target_modules)]
    if already:
        raise ValueError(f"{already[0]} already has LoRA; call remove_lora() first or choose other targets")
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not entries:
        raise ValueError("target_modules is empty")
    for entry in entries:
        spec = entry if isinstance(target_modules, str) else [entry]
        if not any(matches(name, spec) for name in linears):
            raise ValueError(
                f"target {entry!r} matches no nn.Linear or nn.Conv2d in {type(model).__name__}; "
                "its Linear and Conv2d layers end in: "
                + ", ".join(sorted({_short_name(name) for name in linears}))
            )
    return [name for name in linears if matches(name, target_modules)]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Set the submodule at qualified ``name`` (e.g. "mid_block.attentions.0.to_out.0") to ``module``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def inject_lora(
    model: nn.Module,
    target_modules: Targets,
    rank: int = 4,
    alpha: float | None = None,
    dropout: float = 0.0,
    init: str = "kaiming",
    use_rslora: bool = False,
    use_dora: bool = False,
) -> list[str]:
    """Wrap each targeted nn.Linear in a LoRALinear, each nn.Conv2d in a LoRAConv2d, and freeze everything
    but the LoRA factors (and DoRA's magnitudes). ``use_rslora``/``use_dora`` as peft's LoraConfig's.

    Returns the wrapped names. Everything is checked and built before the first layer is swapped, so an error
    leaves the model as it was.
    """
    names = find_targets(model, target_modules)
    new = {}
    for name in names:
        base = model.get_submodule(name)
        new[name] = lora_class(base)(base, rank, alpha, dropout, init, use_rslora, use_dora)
    for name, layer in new.items():
        replace_module(model, name, layer)
    freeze_all_but_lora(model)
    return names


def freeze_all_but_lora(model: nn.Module) -> None:
    """Make the LoRA factors (of every LoRA layer, old and new) the only parameters that train."""
    model.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)


def remove_lora(model: nn.Module) -> list[str]:
    """Put the original layers back (unmerging first); returns their names. All stay frozen."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        if layer.merged:
            layer.unmerge()
        replace_module(model, name, layer.base)
    return list(layers)


def _require_lora(model: nn.Module) -> dict[str, LoRALayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers; call inject_lora() first")
    return layers


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Set the runtime ``scale`` of every LoRA layer (0.0 switches LoRA off exactly)."""
    layers = _require_lora(model)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("LoRA is merged, so a new scale would have no effect; unmerge_lora() first")
    scale = finite_number(scale, "scale")  # a NaN scale would make every image NaN
    for layer in layers.values():
        layer.scale = scale


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (for fast inference)."""
    layers = _require_lora(model)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("LoRA is already merged")
    for layer in layers.values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Restore every base weight exactly as it was before merge_lora()."""
    layers = _require_lora(model)
    if not all(layer.merged for layer in layers.values()):
        raise RuntimeError("LoRA is not merged")
    for layer in layers.values():
        layer.unmerge()


def fuse_lora(model: nn.Module) -> dict[str, LoRALayer]:
    """Merge every LoRA update, then put the plain base layers in the wrappers' places.

    A merged wrapper still costs a Python call per layer; a fused model is the base module tree with the
    merged weights, so inference costs what the base costs. Returns the wrappers, for unfuse_lora().
    """
    merge_lora(model)
    layers = lora_layers(model)
    for name, layer in layers.items():
        replace_module(model, name, layer.base)
    return layers


def unfuse_lora(model: nn.Module, layers: dict[str, LoRALayer]) -> None:
    """Put back the wrappers fuse_lora() returned and restore the base weights bit-exactly."""
    for name, layer in layers.items():
        replace_module(model, name, layer)
    unmerge_lora(model)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA factors (A, B, and DoRA's magnitude), as a list: a generator would be used up by the
    optimizer, leaving clipping nothing."""
    return [p for layer in lora_layers(model).values() for p in layer_parameters(layer)]


def layer_parameters(layer: LoRALayer) -> list[nn.Parameter]:
    """One LoRA layer's trainable tensors: A, B, and with DoRA the magnitude vector."""
    magnitude = [layer.lora_magnitude_vector] if layer.use_dora else []
    return [layer.lora_A.weight, layer.lora_B.weight, *magnitude]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
