"""Adapter layouts, pure: other layouts to lora_nb's and back (peft, the blog's attention processors,
kohya/A1111), and the per-layer split every module shares. No file is read or written here (formats.py does
that): every function takes and returns tensors, keys and metadata.

lora_nb's layout is diffusers' (see formats.py): tensors ``f"{component}.{module path}.lora_A.weight"``,
A: (r, d_in), and ``.lora_B.weight``, B: (d_out, r), component "unet" or "text_encoder"; alpha in metadata,
peft ``LoraConfig`` kwargs with prefixed names. Every reader here returns that (tensors, metadata) pair.
On a Conv2d (kohya's proj_in/proj_out, LoCon) A: (r, c_in, k, k), B: (c_out, r, 1, 1), as peft has them.
A DoRA layer adds ``.lora_magnitude_vector``, (d_out,) or for a Conv2d (1, c_out, 1, 1) (peft's shapes,
kohya/LyCORIS's ``dora_scale``), and its component's metadata says ``use_dora``; rsLoRA (scaling
alpha / sqrt(r)) is ``use_rslora`` in the metadata.

    layout      one key, and where alpha comes from
    diffusers   unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
                (ours; also text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight): the metadata
    peft        base_model.model.down_blocks.0.(...).attn1.to_q.lora_A.default.weight
                (or without "base_model.model." or the adapter name): adapter_config.json
    attn_procs  down_blocks.0.(...).attn1.processor.to_q_lora.down.weight (the blog's
                pytorch_lora_weights.bin; UNet only): nowhere, alpha = r
    kohya       lora_unet_down_blocks_0_(...)_attn1_to_q.lora_down.weight / .lora_up.weight / .alpha,
                lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight: the .alpha tensors

The key renames are diffusers' own where diffusers has them (named below), so a file means here what it
means to ``pipe.load_lora_weights``. Alpha is not: diffusers 0.42 files a kohya attention layer's alpha under
a name no module has, and peft then drops it (tests/test_convert.py shows it), so kohya alphas are read here.
"""

import math
import re
from collections import Counter
from collections.abc import Iterable

import torch
from diffusers.loaders.lora_conversion_utils import _convert_text_encoder_lora_key, _convert_unet_lora_key
from diffusers.utils.state_dict_utils import (
    StateDictType,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)

from .layers import finite_number

StateDict = dict[str, torch.Tensor]
Layers = dict[str, tuple[int, float]]  # module path (or "unet.<path>") -> (rank, alpha)

FORMATS = ("diffusers", "peft", "attn_procs", "kohya")
COMPONENTS = ("unet", "text_encoder")
# Key ending -> factor: ours, then the other spellings diffusers reads (older files spell A "down", B "up").
MAGNITUDE = ".lora_magnitude_vector"  # DoRA's m: peft's name, and diffusers'
OUR_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", MAGNITUDE: "m"}
FACTOR_SUFFIXES = {
    **OUR_SUFFIXES,
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A",
    ".lora_linear_layer.up.weight": "B",
}
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# peft keeps A and B under the adapter's name ("lora_A.default.weight") in a model, without it in a file.
_PEFT_FACTOR = re.compile(r"\.lora_([AB])(\.[^.]+)?\.weight$")
_PEFT_MAGNITUDE = re.compile(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$")  # ".default.weight" in a model
_ATTN_PROCS_FACTOR = re.compile(r"[._]lora\.(down|up)\.weight$")  # processor.to_q_lora.down, to_q.lora.down
# A peft file says nothing of which model it adapts; CLIP's modules live under these, a UNet's never do.
_TEXT_ENCODER_ROOTS = ("text_model.", "encoder.", "embeddings.", "final_layer_norm")
# What a peft adapter_config.json says about the tensors; the rest (task_type, revision ...) is bookkeeping.
_PEFT_CONFIG_KEYS = (
    "r",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "use_dora",
    "use_rslora",
    "lora_bias",
)


def cannot_place(problems: list[str], shown: int = 5) -> ValueError:
    """One error for all the keys that cannot be placed ("key: why" each): the first ``shown``, the count."""
    more = [f"... and {len(problems) - shown} more"] if len(problems) > shown else []
    count = f"{len(problems)} LoRA key{'s' * (len(problems) > 1)} cannot be placed; nothing was applied"
    return ValueError("\n".join([*problems[:shown], *more, count]))


def pattern_key(patterns: dict, path: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` key that applies to ``path``, as peft finds it
    (peft.utils.other.get_pattern_key), or None."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", path)), None)


def layer_alpha(config: dict, path: str, rank: int, component: str = "") -> float:
    """The alpha peft gives the layer at ``path``: its ``alpha_pattern`` entry, else ``lora_alpha``, else its
    rank. A value that is no finite number raises, naming the metadata key (``unet.alpha_pattern[...]``)."""
    prefix = f"{component}." if component else ""
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise TypeError(f"{prefix}alpha_pattern must map module patterns to numbers, got {patterns!r}")
    key = pattern_key(patterns, path)
    if key is not None:
        return finite_number(patterns[key], f"{prefix}alpha_pattern[{key!r}]")
    if "lora_alpha" in config:
        return finite_number(config["lora_alpha"], f"{prefix}lora_alpha")
    return float(rank)


def lora_config_for(layers: Layers, variants: dict | None = None) -> dict:
    """peft ``LoraConfig`` kwargs for {module path: (rank, alpha)}: common values, patterns for the rest.
    ``variants`` ({"use_dora": True, "use_rslora": True}) are written when true: plain LoRA's stay as
    before, and peft and diffusers default them to false."""
    r = Counter(rank for rank, _ in layers.values()).most_common(1)[0][0]
    alpha = Counter(alpha for _, alpha in layers.values()).most_common(1)[0][0]
    # Layers off the common value go in patterns keyed "^path", as diffusers writes them: the "^" pins peft's
    # suffix match to the full name.
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(layers),
        "rank_pattern": {f"^{p}": rank for p, (rank, _) in layers.items() if rank != r},
        "alpha_pattern": {f"^{p}": a for p, (_, a) in layers.items() if a != alpha},
        **{key: True for key, on in (variants or {}).items() if on},
    }


def metadata_for(layers: Layers, variants: dict[str, dict] | None = None) -> dict:
    """Our file metadata for layers {"unet.<path>": (rank, alpha)}: each component's config, prefixed.
    ``variants``: {component: {"use_dora": bool, "use_rslora": bool}}, as for lora_config_for."""
    metadata = {}
    for component in dict.fromkeys(stem.partition(".")[0] for stem in layers):
        config = lora_config_for(select_component(layers, component), (variants or {}).get(component))
        metadata |= {f"{component}.{key}": value for key, value in config.items()}
    return metadata


def select_component(mapping: dict, component: str) -> dict:
    """The entries of ``mapping`` (tensors, metadata, layers) under ``component + "."``, prefix dropped."""
    return {k.removeprefix(f"{component}."): v for k, v in mapping.items() if k.startswith(f"{component}.")}


def pair_factors(
    keys: Iterable[str], suffixes: dict[str, str] = OUR_SUFFIXES
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group factor keys by layer: ({layer: {"A": key, "B": key}}, problems). ``suffixes`` maps a key's ending
    to its factor; a problem ("key: why") is a key with no such ending, or a factor without its partner."""
    found: dict[str, dict[str, str]] = {}
    problems = []
    for key in keys:
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None:
            problems.append(f"{key}: not a LoRA factor (expected a key ending in {' or '.join(suffixes)})")
        else:
            found.setdefault(key.removesuffix(suffix), {})[suffixes[suffix]] = key
    for layer, factors in found.items():
        missing = [f for f in "AB" if f not in factors]
        if missing:  # DoRA's magnitude ("m") is the optional third
            problems.append(f"{next(iter(factors.values()))}: no lora_{missing[0]} for {layer}")
    return {layer: factors for layer, factors in found.items() if "A" in factors and "B" in factors}, problems


def split_layers(
    tensors: StateDict, metadata: dict | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{"unet.<path>": (A, B, alpha)} from tensors in our layout: the one per-layer split that mixing and
    resizing share, for updates that are (alpha / r) B A. Alpha as peft resolves it (see split_dora_layers).
    DoRA layers raise: their update is not B A alone, so no sum or truncation of factors is exact."""
    layers = split_dora_layers(tensors, metadata)
    dora = [
        f"{stem}{MAGNITUDE}: a DoRA layer; its update is not B A alone"
        for stem, (*_, m) in layers.items()
        if m is not None
    ]
    if dora:
        raise cannot_place(dora)
    return {stem: (a, b, alpha) for stem, (a, b, alpha, _) in layers.items()}


def delta_weights(tensors: StateDict, metadata: dict | None = None) -> dict[str, torch.Tensor]:
    """{"unet.<path>": ΔW}: each layer's update (alpha / r) B A in its base weight's shape, fp32, what
    merging adds to W (a Conv2d's 1x1 B folded into A's kernel). DoRA layers raise, as in split_layers."""
    deltas = {}
    for stem, (a, b, alpha) in split_layers(tensors, metadata).items():
        update = b.flatten(1).float() @ a.flatten(1).float()  # (d_out, d_in [* k * k])
        deltas[stem] = (alpha / a.shape[0]) * update.view(b.shape[0], *a.shape[1:])
    return deltas


def split_dora_layers(
    tensors: StateDict, metadata: dict | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]]:
    """{"unet.<path>": (A, B, alpha, magnitude or None)} from tensors in our layout. Alpha as peft resolves
    it: the layer's ``alpha_pattern`` entry, else ``lora_alpha``, else its rank; under ``use_rslora`` it is
    given as the alpha plain LoRA would need for the same scaling, alpha * sqrt(r) (alpha / sqrt(r) =
    that / r), so mixing, resizing and kohya export (kohya has no rsLoRA) need not know. Keys that are no
    factor, or lack their partner, raise (all listed)."""
    pairs, problems = pair_factors(tensors)
    if problems:
        raise cannot_place(problems)
    layers = {}
    for stem, keys in pairs.items():
        a, b = tensors[keys["A"]], tensors[keys["B"]]
        component, _, path = stem.partition(".")
        config = select_component(metadata or {}, component)
        alpha = layer_alpha(config, path, a.shape[0], component)
        if config.get("use_rslora"):
            alpha *= math.sqrt(a.shape[0])
        layers[stem] = (a, b, alpha, tensors[keys["m"]] if "m" in keys else None)
    return layers


def _layout(key: str) -> str | None:
    if key.startswith(KOHYA_PREFIXES):
        return "kohya"
    if key.startswith(tuple(f"{c}." for c in COMPONENTS)):
        return "diffusers"
    if _PEFT_FACTOR.search(key) or _PEFT_MAGNITUDE.search(key):
        return "peft"
    if _ATTN_PROCS_FACTOR.search(key):
        return "attn_procs"
    return None


def detect_format(keys: Iterable[str]) -> str:
    """The layout of a state dict (one of FORMATS), from its keys; raises naming the keys that fit none, or
    fit another layout than most keys do (a file is one layout)."""
    layouts = {key: _layout(key) for key in keys}
    counts = Counter(layout for layout in layouts.values() if layout)
    if not counts:
        raise cannot_place(
            [f"{key}: in no known LoRA layout ({', '.join(FORMATS)})" for key in layouts]
            or ["(no keys): the state dict is empty"]
        )
    layout = counts.most_common(1)[0][0]
    others = [(key, other) for key, other in layouts.items() if other != layout]
    if others:
        raise cannot_place(
            [
                f"{key}: {f'a {other} key' if other else 'in no known layout'} in a {layout} file"
                for key, other in others
            ]
        )
    return layout


def _rename_factor(key: str) -> str:
    suffix = next((s for s in FACTOR_SUFFIXES if key.endswith(s)), None)
    ours = {factor: ending for ending, factor in OUR_SUFFIXES.items()}
    return key if suffix is None else key.removesuffix(suffix) + ours[FACTOR_SUFFIXES[suffix]]


def _our_name(key: str) -> str:
    """Our name for a key "unet."/"text_encoder." + any diffusers spelling: ``to_q.lora.down``, 0.17's
    ``processor.to_q_lora.down``, ``q_proj.lora_linear_layer.down``."""
    # The renames diffusers' loaders apply: convert_unet_state_dict_to_peft in the UNet's load_lora_adapter,
    # convert_state_dict_to_peft's DIFFUSERS_OLD mapping in _load_lora_into_text_encoder. Both take a dict.
    if key.startswith("unet."):
        (new,) = convert_unet_state_dict_to_peft({key: None})
    else:
        (new,) = convert_state_dict_to_peft({key: None}, StateDictType.DIFFUSERS_OLD)
    return _rename_factor(new)


def from_diffusers(state: StateDict, metadata: dict | None = None) -> tuple[StateDict, dict]:
    """Keys "unet."/"text_encoder." + any diffusers spelling -> ours. The metadata is ours already."""
    names = {key: _our_name(key) for key in state}
    count = Counter(names.values())
    clashes = [f"{key}: another key names the same factor" for key, name in names.items() if count[name] > 1]
    if clashes:
        raise cannot_place(clashes)
    return {names[k]: v for k, v in state.items()}, dict(metadata or {})


def from_attn_procs(state: StateDict, metadata: dict | None = None) -> tuple[StateDict, dict]:
    """The blog's ``unet.save_attn_procs`` keys (UNet only, no prefix) -> ours. They carry no alpha, so
    alpha = r: what diffusers' LoRAAttnProcessor computed with (its network_alpha defaulted to None)."""
    return from_diffusers({f"unet.{k}": v for k, v in state.items()})


def from_peft(state: StateDict, config: dict | None = None) -> tuple[StateDict, dict]:
    """peft keys (``base_model.model.`` + path, or the bare path; with or without the adapter name) -> ours.

    ``config`` is the adapter's LoraConfig (adapter_config.json): its ``lora_alpha``, ``alpha_pattern`` ...
    apply to each component the file holds.
    """
    tensors = {}
    for key, tensor in state.items():
        path = _PEFT_FACTOR.sub(r".lora_\1.weight", key.removeprefix("base_model.model."))
        path = _PEFT_MAGNITUDE.sub(MAGNITUDE, path)
        tensors[f"{'text_encoder' if path.startswith(_TEXT_ENCODER_ROOTS) else 'unet'}.{path}"] = tensor
    kept = {k: v for k, v in (config or {}).items() if k in _PEFT_CONFIG_KEYS}
    components = dict.fromkeys(key.partition(".")[0] for key in tensors)
    return tensors, {f"{c}.{k}": v for c in components for k, v in kept.items()}


def _kohya_stem(name: str) -> str | None:
    """Our "unet.<path>" for a kohya module name, or None for one SD 1.x lacks (SDXL's second text encoder).

    kohya names are module paths with "." turned to "_", so they cannot be split back without knowing the
    names; diffusers' _convert_unet_lora_key / _convert_text_encoder_lora_key know SD's, and are what
    ``pipe.load_lora_weights`` uses. kohya always writes CLIP's ``text_model.`` level; transformers 5 has
    none, so it is dropped here (the loader finds the layer either way).
    """
    if name.startswith("lora_unet_"):
        key = "unet." + _convert_unet_lora_key(f"{name}.lora_down.weight")
    elif name.startswith(("lora_te_", "lora_te1_")):
        key = "text_encoder." + _convert_text_encoder_lora_key(f"{name}.lora_down.weight", name)
    else:
        return None
    stem = _our_name(key).removesuffix(".lora_A.weight")
    return stem.replace("text_encoder.text_model.", "text_encoder.", 1)


KOHYA_ENTRIES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")


def magnitude_shape(b: torch.Tensor) -> tuple[int, ...]:
    """peft's shape of DoRA's magnitude for a layer whose B is ``b``: (d_out,), or (1, c_out, 1, 1) for a
    Conv2d (B: (c_out, r, 1, 1))."""
    return (1, b.shape[0], 1, 1) if b.dim() == 4 else (b.shape[0],)


def _from_kohya_module(name: str, entries: dict[str, torch.Tensor]) -> tuple[dict, float | None, list[str]]:
    """One kohya module's tensors: ({"A": A, "B": B, "m": dora_scale?}, alpha, problems)."""
    other = [entry for entry in entries if entry not in KOHYA_ENTRIES]
    if other:  # LoHa's hada_w1_a, LoKr's lokr_w1 ...
        holds = ", ".join(KOHYA_ENTRIES)
        return {}, None, [f"{name}.{entry}: not LoRA (a kohya LoRA module holds {holds})" for entry in other]
    if "lora_down.weight" not in entries or "lora_up.weight" not in entries:
        return {}, None, [f"{name}: needs both lora_down.weight and lora_up.weight, has {', '.join(entries)}"]
    a, b = (
        entries["lora_down.weight"],
        entries["lora_up.weight"],
    )  # A: (r, d_in[, k, k]), B: (d_out, r[, 1, 1])
    alpha = entries.get("alpha", torch.zeros(()))
    if alpha.numel() != 1 or not torch.isfinite(alpha).all():
        return {}, None, [f"{name}.alpha: must be one finite number, the file has {alpha.tolist()}"]
    factors = {"A": a, "B": b}
    if "dora_scale" in entries:  # LyCORIS writes it (d_out, 1); per output channel, as peft's magnitude
        m = entries["dora_scale"]
        if m.numel() != b.shape[0]:
            why = f"needs {b.shape[0]} numbers (one per output channel), the file has shape {tuple(m.shape)}"
            return {}, None, [f"{name}.dora_scale: {why}"]
        factors["m"] = m.reshape(magnitude_shape(b))
    # kohya's rule (sd-scripts networks/lora.py): no alpha, or alpha 0, means alpha = rank.
    return factors, float(alpha.item() or a.shape[0]), []


def from_kohya(state: StateDict, metadata: dict | None = None) -> tuple[StateDict, dict]:
    """kohya/A1111 keys -> ours, each module's ``.alpha`` kept exactly (in the metadata's patterns); LoCon's
    convolutions and DoRA's ``dora_scale`` included."""
    modules: dict[str, dict[str, torch.Tensor]] = {}  # kohya module name -> {"lora_down.weight": tensor ...}
    for key, tensor in state.items():
        name, _, entry = key.partition(".")
        modules.setdefault(name, {})[entry] = tensor
    tensors, layers, variants, problems = {}, {}, {}, []
    for name, entries in modules.items():
        stem = _kohya_stem(name)
        if stem is None:
            problems += [f"{name}.{entry}: SDXL's second text encoder; SD 1.x has one" for entry in entries]
            continue
        factors, alpha, wrong = _from_kohya_module(name, entries)
        problems += wrong
        if wrong:
            continue
        tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = factors["A"], factors["B"]
        if "m" in factors:
            tensors[stem + MAGNITUDE] = factors["m"]
            variants[stem.partition(".")[0]] = {"use_dora": True}
        layers[stem] = (factors["A"].shape[0], alpha)
    if problems:
        raise cannot_place(problems)
    return tensors, metadata_for(layers, variants)


def to_kohya(tensors: StateDict, metadata: dict | None = None) -> StateDict:
    """Ours -> kohya/A1111: ``lora_unet_``/``lora_te_`` + the path with "_" for ".", ``lora_down``/
    ``lora_up`` (4-D on a convolution, as LoCon has them), DoRA's magnitude as ``dora_scale``, and every
    module's alpha as a float32 scalar tensor, as kohya's sd-scripts save it (an alpha float32 cannot hold,
    such as 0.1, comes back rounded to it). kohya has no rsLoRA: its alpha is the one giving the same
    scaling, alpha * sqrt(r).

    diffusers' convert_state_dict_to_kohya is not used: it writes alpha = rank whatever the adapter's alpha
    (wrong unless they are equal), and names the text encoder ``lora_te1_`` without CLIP's ``text_model_``
    level, which A1111 does not find for SD 1.x.
    """
    out = {}
    for stem, (a, b, alpha, m) in split_dora_layers(tensors, metadata).items():
        component, _, path = stem.partition(".")
        if component == "unet":
            name = "lora_unet_" + path.replace(".", "_")
        else:
            name = "lora_te_" + ("text_model." + path.removeprefix("text_model.")).replace(".", "_")
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = a, b
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if m is not None:
            out[f"{name}.dora_scale"] = m
    return out


def to_lora_nb(
    state: StateDict, metadata: dict | None = None, config: dict | None = None
) -> tuple[str, StateDict, dict]:
    """(format, tensors, metadata) in our layout for a state dict in any of FORMATS.

    ``metadata`` is what a safetensors header held under "lora_adapter_metadata" (ours, or for bare peft keys
    the LoraConfig diffusers' ``save_lora_adapter`` writes there); ``config`` a peft adapter_config.json.
    """
    layout = detect_format(state)
    if layout == "peft":
        return layout, *from_peft(state, metadata if config is None else config)
    convert = {"diffusers": from_diffusers, "attn_procs": from_attn_procs, "kohya": from_kohya}[layout]
    return layout, *convert(state, metadata)
