"""Put a trained adapter on an unmodified base pipeline, as the blog's inference section does.

    pipe = load_lora_pipeline("sd-model-finetuned-lora")       # base model read from the adapter's card
    image = pipe("Green pokemon with menacing face", num_inference_steps=25).images[0]
    images = sample_images(pipe, "Green pokemon with menacing face", n=4, seed=0)  # seeds 0, 1, 2, 3
    pipe.lora.set_scale(0.5); pipe.lora.fuse(); pipe.lora.unfuse(); pipe.lora.remove()

The blog loaded with `pipe.unet.load_attn_procs(path)`, which current diffusers no longer uses for LoRA;
diffusers' own call today is `pipe.load_lora_weights(path)`. This loader reads the same files without
peft, with lora_nb's layers, and leaves the base weights untouched until you fuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from .convert import select_component
from .formats import WEIGHT_NAME, find_lora_file, load_lora_weights, read_lora
from .inject import fuse_lora, lora_layers, remove_lora, set_lora_scale, unfuse_lora
from .layers import finite_number
from .textual_inversion import EMBEDDING_NAME, read_learned_embedding


def _adapter_file(path: str | Path) -> Path:
    """The weights file for a folder, a file, or a hub repo id (downloaded)."""
    if Path(path).exists():
        return find_lora_file(path)  # a folder may hold the safetensors file or the blog-era .bin
    if str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise FileNotFoundError(f"adapter not found: {path} (neither a local path nor a hub id 'owner/name')")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(str(path), WEIGHT_NAME))


def base_model_from_card(adapter_file: Path, repo_id: str | None = None) -> str | None:
    """The `base_model` in the adapter's model card (README.md beside the weights, or on the hub)."""
    from huggingface_hub import ModelCard

    card_path = adapter_file.parent / "README.md"
    if card_path.is_file():
        card = ModelCard.load(card_path)
    elif repo_id:
        card = ModelCard.load(repo_id)
    else:
        return None
    base = card.data.get("base_model")
    return base[0] if isinstance(base, list) else base


@dataclass
class PipelineLoRA:
    """The adapter on a pipeline: scale it, fuse it into the weights, unfuse, or remove it."""

    pipe: StableDiffusionPipeline
    path: Path
    base_model: str
    token: str | None = None  # a textual-inversion token loaded with the adapter (pivotal tuning)
    set_aside: list = field(default_factory=list)  # while fused: (model, {name: LoRALinear}) to put back

    @property
    def fused(self) -> bool:
        return bool(self.set_aside)

    def _models(self):
        return [m for m in (self.pipe.unet, self.pipe.text_encoder) if lora_layers(m)]

    def set_scale(self, scale: float) -> None:
        """0 gives the base model exactly; 1 the adapter as trained. Unfuse first if fused."""
        if self.fused:
            raise RuntimeError("the adapter is fused into the weights: unfuse() before changing its scale")
        for model in self._models():
            set_lora_scale(model, scale)

    def fuse(self) -> None:
        """Fold the adapter into the base weights: inference then costs what the base model costs.

        The plain layers take the LoRA layers' places until unfuse(), which puts them back and restores
        the base weights bit-exactly.
        """
        if self.fused:
            raise RuntimeError("the adapter is already fused")
        self.set_aside = [(model, fuse_lora(model)) for model in self._models()]

    def unfuse(self) -> None:
        if not self.fused:
            raise RuntimeError("the adapter is not fused")
        for model, layers in self.set_aside:
            unfuse_lora(model, layers)
        self.set_aside = []

    def remove(self) -> None:
        """Back to the base pipeline: the original layers and weights, as loaded."""
        if self.fused:
            self.unfuse()
        for model in self._models():
            remove_lora(model)
        if self.token:
            self.pipe.unload_textual_inversion(self.token)
            self.token = None


def missing_base_model(name: str, path: str | Path, error: OSError) -> FileNotFoundError:
    """The error for a base model that cannot be read: ``name`` is what the user set (a flag, an argument)."""
    if Path(path).is_dir():
        why = "that folder holds no diffusers Stable Diffusion model (no unet/config.json)"
        fix = "give the folder a pipeline's save_pretrained() wrote (model_index.json, unet/, vae/, ...)"
    else:
        why = f"no such folder, nor a hub model that could be read ({str(error).splitlines()[0]})"
        fix = "check the path, or the hub id and the network (offline: `hf download` it first)"
    return FileNotFoundError(f"{name} {path}: {why}; {fix}")


def load_base_pipeline(
    base_model: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    fast_scheduler: bool = True,
) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline (a local folder or a hub id), switched to DPM-Solver++ for 25 steps."""
    try:
        pipe = StableDiffusionPipeline.from_pretrained(base_model, dtype=dtype)
    except OSError as error:
        raise missing_base_model("base model", base_model, error) from None
    if fast_scheduler:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_images(pipe, prompt: str | Sequence[str], n: int | None = None, seed: int = 0, **call) -> list:
    """Images of ``prompt`` (one prompt ``n`` times, or a list of prompts), image i from its own generator
    seeded ``seed + i``: two models drawn with the same seeds start from the same noise, so their images
    differ by their weights alone. ``call`` goes to the pipeline (num_inference_steps, guidance_scale, ...).

    The generators are CPU ones: the same seed gives the same starting noise on any device.
    """
    if isinstance(prompt, str):
        prompts = [prompt] * (1 if n is None else n)
    elif n is not None and n != len(prompt):
        raise ValueError(f"n={n} with {len(prompt)} prompts: give one prompt n times, or the list alone")
    else:
        prompts = list(prompt)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, generator=generators, **call).images


def load_lora_pipeline(
    path: str | Path,
    base_model: str | None = None,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    fast_scheduler: bool = True,
) -> StableDiffusionPipeline:
    """Base pipeline (from `base_model`, else the adapter card's) with the adapter at `path` put on it.

    `path` is an adapter folder, a weights file, or a hub repo id. The returned pipeline carries
    `pipe.lora` (a PipelineLoRA) for scale, fuse, unfuse and remove.
    """
    scale = finite_number(scale, "scale")  # checked before anything loads
    adapter_file = _adapter_file(path)
    repo_id = None if Path(path).exists() else str(path)
    if not base_model:
        base_model = base_model_from_card(adapter_file, repo_id)
        if not base_model:
            raise ValueError(
                f"no base_model for adapter {path}: its model card names none; pass base_model=..."
            )
        beside = adapter_file.parent / base_model
        if not Path(base_model).is_absolute() and beside.exists():  # a local base, relative to the adapter
            base_model = str(beside.resolve())
    lora = read_lora(adapter_file)  # read (and check) the file once, before the possibly large base loads
    pipe = load_base_pipeline(base_model, dtype, device, fast_scheduler)
    has_text = bool(select_component(lora.tensors, "text_encoder"))
    load_lora_weights(lora, unet=pipe.unet, text_encoder=pipe.text_encoder if has_text else None)
    token = None
    if (adapter_file.parent / EMBEDDING_NAME).is_file():  # pivotal tuning saves its new word beside the LoRA
        token, _ = read_learned_embedding(adapter_file.parent)
        pipe.load_textual_inversion(adapter_file.parent, weight_name=EMBEDDING_NAME)
    pipe.lora = PipelineLoRA(pipe, adapter_file, base_model, token)
    pipe.lora.set_scale(scale)
    return pipe
