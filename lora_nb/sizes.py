"""How big is a LoRA? Trainable parameters and adapter file size, computed without loading a single weight.

A LoRA of rank r on a Linear layer W: (d_out, d_in) stores A: (r, d_in) and B: (d_out, r), so it adds
r * (d_in + d_out) numbers; on a Conv2d W: (c_out, c_in, k, k), A: (r, c_in, k, k) and B: (c_out, r, 1, 1),
r * (c_in * k * k + c_out). DoRA adds one magnitude per output channel. The file holds those numbers plus
a safetensors header (JSON naming each tensor, its dtype, shape and byte offsets, and the adapter's peft
config). The models are built on the meta device:
every module and shape, no memory. The layers counted are exactly the ones ``inject_lora`` would wrap,
because the same ``find_targets`` picks them.

    python -m lora_nb.sizes --models sd15 sd21 sdxl --ranks 1 4 16 --targets attention cross-attention
    python -m lora_nb.sizes --models data/tiny-sd --ranks 4   # any local diffusers folder
"""

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .convert import MAGNITUDE, metadata_for
from .formats import file_header
from .inject import TARGET_SETS, TEXT_ENCODER_ATTENTION, Targets, find_targets
from .layers import lora_class

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
SAFETENSORS_DTYPE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}

# Each model's parts, by the key prefix diffusers gives their LoRA weights; configs/<model>_<part>.json holds
# the hub's config.json for that part. Any local diffusers folder works too: its <part>/config.json.
MODELS = {
    "sd15": ("unet", "text_encoder"),
    "sd21": ("unet", "text_encoder"),
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
}
_TEXT_ENCODER_CLASSES = {cls.__name__: cls for cls in (CLIPTextModel, CLIPTextModelWithProjection)}


def model_parts(model: str) -> tuple[str, ...]:
    """The parts of a named model (MODELS) or of a local diffusers folder (those with a config.json)."""
    if model in MODELS:
        return MODELS[model]
    parts = tuple(
        p for p in ("unet", "text_encoder", "text_encoder_2") if (Path(model) / p / "config.json").is_file()
    )
    if not parts:
        raise ValueError(
            f"unknown model {model!r}: not one of {list(MODELS)}, nor a folder with unet/config.json"
        )
    return parts


def load_config(model: str, part: str = "unet") -> dict:
    """The config.json of one part of a model, e.g. ("sd15", "unet") or ("data/tiny-sd", "text_encoder")."""
    path = CONFIG_DIR / f"{model}_{part}.json" if model in MODELS else Path(model) / part / "config.json"
    return json.loads(path.read_text())


def build_meta(model: str, part: str = "unet") -> nn.Module:
    """One part of a model on the meta device: the real module tree and shapes, no weights."""
    if part not in model_parts(model):
        raise ValueError(f"model {model!r} has no part {part!r}; it has {model_parts(model)}")
    config = load_config(model, part)
    with torch.device("meta"):  # parameters get shapes but no storage: SDXL costs no memory
        if part == "unet":
            return UNet2DConditionModel.from_config(config)
        cls = _TEXT_ENCODER_CLASSES[config["architectures"][0]]  # SDXL's second one has a projection
        return cls(CLIPTextConfig(**config))


def lora_shapes(model: nn.Module, target_modules: Targets) -> dict[str, tuple[int, ...]]:
    """{layer name: its weight's shape} for every layer ``inject_lora(model, target_modules)`` would wrap:
    (d_out, d_in) for a Linear, (c_out, c_in, k, k) for a Conv2d."""
    return {
        name: tuple(model.get_submodule(name).weight.shape) for name in find_targets(model, target_modules)
    }


def layer_tensor_shapes(base: nn.Module, rank: int, use_dora: bool = False) -> dict[str, tuple[int, ...]]:
    """{key ending: shape} of the tensors one LoRA layer on ``base`` saves (A, B, and DoRA's magnitude)."""
    cls = lora_class(base)
    shape_a, shape_b = cls.factor_shapes(base, rank)
    shapes = {".lora_A.weight": shape_a, ".lora_B.weight": shape_b}
    if use_dora:  # peft's shape: (d_out,) for a Linear, (1, c_out, 1, 1) for a Conv2d
        shapes[MAGNITUDE] = (1, shape_b[0], 1, 1) if len(shape_b) == 4 else (shape_b[0],)
    return shapes


def safetensors_header_bytes(
    shapes: Mapping[str, tuple[int, ...]], dtype: str, metadata: Mapping[str, str]
) -> int:
    """Bytes before the tensor data of a safetensors file holding ``shapes`` (all of one dtype).

    The format: an 8-byte little-endian length, then compact JSON {"__metadata__": {...}, key: {"dtype",
    "shape", "data_offsets"}, ...}, padded with spaces to a multiple of 8. Tensors of one dtype are laid out
    in key order, which fixes the offsets (and so the digits they take).
    """
    entries, offset = {}, 0
    for key in sorted(shapes):
        end = offset + math.prod(shapes[key]) * BYTES[dtype]
        entries[key] = {
            "dtype": SAFETENSORS_DTYPE[dtype],
            "shape": list(shapes[key]),
            "data_offsets": [offset, end],
        }
        offset = end
    header = json.dumps(
        {"__metadata__": dict(metadata), **entries}, separators=(",", ":"), ensure_ascii=False
    )
    n = len(header.encode())
    return 8 + n + (-n) % 8


@dataclass
class AdapterSize:
    layers: int  # Linear and Conv2d layers wrapped
    lora_params: int  # trainable parameters: sum of r * (d_in + d_out) (+ d_out magnitudes with DoRA)
    file_bytes: int  # the .safetensors file save_lora_weights writes, header and metadata included
    base_params: int  # every parameter of the models the adapter attaches to
    base_bytes: int  # base_params at the same dtype

    @property
    def ratio(self) -> float:
        """Adapter file size / base model size."""
        return self.file_bytes / self.base_bytes


def adapter_size(
    parts: Mapping[str, tuple[nn.Module, Targets]],
    rank: int,
    dtype: str = "fp32",
    alpha: float | None = None,
    use_dora: bool = False,
    use_rslora: bool = False,
) -> AdapterSize:
    """Size of a rank-``rank`` LoRA on ``parts``: {key prefix: (model, target_modules)}, real or meta models;
    ``use_dora``/``use_rslora`` as for inject_lora (rsLoRA changes only the metadata).

    E.g. ``adapter_size({"unet": (pipe.unet, UNET_ATTENTION)}, rank=4)``. The file size is exact for the file
    ``formats.save_lora_weights`` writes: tensors at ``dtype`` (lora_nb itself saves fp32), and the header
    with its peft-config metadata, made by the same functions the writer uses. Nothing is changed or
    allocated.
    """
    if dtype not in BYTES:
        raise ValueError(f"dtype must be one of {list(BYTES)}, got {dtype!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    shapes, layers, base_params = {}, {}, 0
    for prefix, (model, target_modules) in parts.items():
        for name in find_targets(model, target_modules):
            for ending, shape in layer_tensor_shapes(model.get_submodule(name), rank, use_dora).items():
                shapes[f"{prefix}.{name}{ending}"] = shape
            layers[f"{prefix}.{name}"] = (rank, float(rank if alpha is None else alpha))  # the layers' float
        base_params += sum(p.numel() for p in model.parameters())
    lora_params = sum(math.prod(shape) for shape in shapes.values())
    variants = {"use_dora": use_dora, "use_rslora": use_rslora}
    metadata = file_header(metadata_for(layers, dict.fromkeys(parts, variants)))
    return AdapterSize(
        layers=len(layers),
        lora_params=lora_params,
        file_bytes=safetensors_header_bytes(shapes, dtype, metadata) + lora_params * BYTES[dtype],
        base_params=base_params,
        base_bytes=base_params * BYTES[dtype],
    )


def size_table(
    models: Sequence[str] = ("sd15",),
    targets: Sequence[str] = ("attention",),
    ranks: Sequence[int] = (4,),
    dtypes: Sequence[str] = ("fp32",),
    text_encoder: bool = False,
) -> list[dict]:
    """One row per model x targets x rank x dtype, for a table. MB = 10^6 bytes, as the hub counts them.

    The base is the UNet (plus the text encoders, when ``text_encoder=True`` or the target set trains them)
    stored at the same dtype.
    """
    rows = []
    for name in models:
        unet = build_meta(name, "unet")
        with_text = {target: text_encoder or TARGET_SETS[target][1] for target in targets}
        text_encoders = {}
        if any(with_text.values()):
            text_encoders = {part: build_meta(name, part) for part in model_parts(name) if part != "unet"}
        for target_name in targets:
            chosen = {"unet": (unet, TARGET_SETS[target_name][0])}
            if with_text[target_name]:
                chosen |= {part: (model, TEXT_ENCODER_ATTENTION) for part, model in text_encoders.items()}
            for rank in ranks:
                for dtype in dtypes:
                    size = adapter_size(chosen, rank, dtype)
                    rows.append(
                        {
                            "model": name,
                            "targets": target_name + (" + text encoder" if text_encoder else ""),
                            "rank": rank,
                            "dtype": dtype,
                            "layers": size.layers,
                            "lora_params": size.lora_params,
                            "file_mb": size.file_bytes / 1e6,
                            "base_mb": size.base_bytes / 1e6,
                            "ratio": size.ratio,
                        }
                    )
    return rows


def markdown_table(rows: list[dict]) -> str:
    header = "| model | targets | rank | dtype | layers | LoRA params | file MB | base MB | file / base |"
    lines = [header, "|---|---|--:|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['targets']} | {r['rank']} | {r['dtype']} | {r['layers']} "
            f"| {r['lora_params']:,} "
            f"| {r['file_mb']:.2f} | {r['base_mb']:,.0f} | {r['ratio']:.3%} (1/{1 / r['ratio']:,.0f}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["sd15"], help=f"any of {list(MODELS)}, or a local diffusers folder"
    )
    parser.add_argument("--targets", nargs="+", default=["attention"], choices=list(TARGET_SETS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[4])
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(BYTES))
    parser.add_argument(
        "--text-encoder", action="store_true", help="also LoRA on the text encoders' attention"
    )
    args = parser.parse_args(argv)
    for model in args.models:
        try:
            model_parts(model)
        except ValueError as error:
            parser.error(f"--models: {error}")
    if any(rank < 1 for rank in args.ranks):
        parser.error(f"--ranks {' '.join(map(str, args.ranks))}: a LoRA rank is a positive integer")
    print(markdown_table(size_table(args.models, args.targets, args.ranks, args.dtype, args.text_encoder)))


if __name__ == "__main__":
    main()
