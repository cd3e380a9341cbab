"""Where does a word act? The UNet's attention layers, and cross-attention maps captured while sampling.

Every transformer block of SD's UNet has two attention layers. `attn1` is self-attention: queries, keys and
values all come from the image features. `attn2` is cross-attention: queries come from the image, keys and
values from the text encoder's output, so its `to_k`/`to_v` read `cross_attention_dim` features (768 in
SD 1.5) -- these are the only layers through which the prompt reaches the image.

In `attn2`, each latent pixel (a query) spreads one unit of attention over the prompt's tokens (the keys):
softmax(Q K^T / sqrt(d)), shape (batch * heads, pixels, tokens). Averaged over heads, layers and denoising
steps and laid out on the latent grid, a token's column is a heat map of where that token is read: the
"cross-attention maps" of prompt-to-prompt (Hertz et al., 2022).

The capture wraps each `attn2` processor: the layer's own processor still computes the output, so the
image is bit for bit what it would have been, and the probabilities are recomputed beside it from the same
`to_q`/`to_k` (LoRA layers included). The original processors are put back afterwards, even on error.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


@dataclass
class AttentionLayer:
    name: str
    kind: str  # "self" (attn1) or "cross" (attn2)
    grid: int  # query grid side at the model's native size: a (grid x grid) latent map has grid^2 queries
    query_dim: int  # to_q.in_features: image feature width
    context_dim: int  # to_k.in_features: image width (self) or text width (cross)
    inner_dim: int  # to_q.out_features = heads * head_dim
    heads: int


def attention_modules(unet: nn.Module) -> dict[str, Attention]:
    """The UNet's attention layers by qualified name, in module order."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}


def _grid(name: str, unet: nn.Module) -> int:
    """Latent side at which the layer named `name` works (a down block halves it at its end; up blocks
    double)."""
    side, levels = unet.config.sample_size, len(unet.config.block_out_channels)
    block, index = name.split(".")[:2]
    if block == "down_blocks":
        return side // 2 ** int(index)
    if block == "up_blocks":
        return side // 2 ** (levels - 1 - int(index))
    return side // 2 ** (levels - 1)  # mid_block


def describe_attention(unet: nn.Module) -> list[AttentionLayer]:
    """One row per attention layer: kind, grid, and the widths its projections map between."""
    return [
        AttentionLayer(
            name,
            "cross" if m.is_cross_attention else "self",
            _grid(name, unet),
            m.to_q.in_features,
            m.to_k.in_features,
            m.to_q.out_features,
            m.heads,
        )
        for name, m in attention_modules(unet).items()
    ]


def attention_table(unet: nn.Module) -> str:
    """`describe_attention` as a text table (names shortened by dropping "transformer_blocks.0.")."""
    rows = [("layer", "kind", "grid", "to_q (in->out)", "to_k/to_v (in->out)", "heads")]
    for r in describe_attention(unet):
        rows.append(
            (
                r.name.replace("transformer_blocks.0.", ""),
                r.kind,
                f"{r.grid}x{r.grid}",
                f"{r.query_dim}->{r.inner_dim}",
                f"{r.context_dim}->{r.inner_dim}",
                str(r.heads),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


# ---------------------------------------------------------------- tokens


def prompt_tokens(tokenizer, prompt: str) -> list[str]:
    """The prompt's tokens as the text encoder sees them: start token, words (or word pieces), end token."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [t.removesuffix("</w>") for t in tokenizer.convert_ids_to_tokens(ids)]


def token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions of `word`'s tokens in the encoded prompt (the start token is position 0).

    A word can be several tokens (SD 1.5's tokenizer splits rare words, e.g. "sks"), so this is a list: the
    first run of the prompt's ids equal to the word's own ids.
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    piece = tokenizer(word, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(piece) + 1):
        if piece and ids[start : start + len(piece)] == piece:
            return list(range(start, start + len(piece)))
    raise ValueError(
        f"{word!r} is not in the prompt {prompt!r}, whose tokens are {prompt_tokens(tokenizer, prompt)}"
    )


# ---------------------------------------------------------------- capturing cross-attention


class AttentionStore:
    """Running sum of attention maps, each resized to one grid: `total` is (batch, tokens, height, width)."""

    def __init__(self, latent_size: tuple[int, int], size: tuple[int, int]):
        self.latent_size = (
            latent_size  # (H, W) of the UNet's input, to lay each layer's queries out on a grid
        )
        self.size = size
        self.total: torch.Tensor | None = None
        self.count = 0  # maps added: layers x denoising steps

    def grid_of(self, pixels: int) -> tuple[int, int]:
        """(h, w) of a layer with `pixels` queries: the latent divided by a power of two, rounded up."""
        height, width = self.latent_size
        factor = 2 ** round(math.log2(math.sqrt(height * width / pixels)))
        h, w = math.ceil(height / factor), math.ceil(width / factor)
        if h * w != pixels:
            raise ValueError(f"{pixels} queries do not lie on a grid of the {height}x{width} latent")
        return h, w

    @torch.no_grad()
    def add(self, probs: torch.Tensor, heads: int) -> None:
        """probs: (batch * heads, pixels, tokens), each row summing to one."""
        bh, pixels, tokens = probs.shape
        h, w = self.grid_of(pixels)
        maps = probs.float().reshape(bh // heads, heads, h, w, tokens).mean(1)  # (batch, h, w, tokens)
        maps = maps.permute(0, 3, 1, 2)  # (batch, tokens, h, w)
        if (h, w) != self.size:
            # Bilinear weights sum to one, so each pixel's attention still sums to one over the tokens.
            maps = F.interpolate(
                maps, size=self.size, mode="bilinear", align_corners=False, antialias=h > self.size[0]
            )
        self.total = maps if self.total is None else self.total + maps
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no cross-attention was captured: did the UNet run inside the capture?")
        return (self.total / self.count).cpu()


class CaptureProcessor:
    """An attention processor that lets the layer's own processor compute the output, and records
    softmax(QK^T)."""

    def __init__(self, processor, store: AttentionStore):
        self.processor = processor
        self.store = store

    def __call__(
        self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs
    ):
        out = self.processor(
            attn,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **kwargs,
        )
        with torch.no_grad():
            # The default processor's path for SD's transformer blocks: hidden_states (batch, pixels,
            # channels).
            context = encoder_hidden_states
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            batch, tokens, _ = context.shape
            mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (batch*heads, pixels, head_dim)
            key = attn.head_to_batch_dim(attn.to_k(context))  # (batch*heads, tokens, head_dim)
            self.store.add(attn.get_attention_scores(query, key, mask), attn.heads)
        return out


@contextmanager
def capture_cross_attention(
    unet: nn.Module, latent_size: tuple[int, int], size: tuple[int, int] | None = None
):
    """Within the block, every cross-attention layer of `unet` adds its maps to the yielded AttentionStore.

    `latent_size` is the (H, W) of the latents the UNet will see; maps are averaged at `size` (default: that).
    """
    store = AttentionStore(tuple(latent_size), tuple(size or latent_size))
    layers = {name: m for name, m in attention_modules(unet).items() if m.is_cross_attention}
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers")
    originals = {name: m.processor for name, m in layers.items()}
    try:
        for name, m in layers.items():
            m.set_processor(CaptureProcessor(originals[name], store))
        yield store
    finally:  # a failed or interrupted pipeline call must not leave the UNet recording
        for name, m in layers.items():
            m.set_processor(originals[name])


@dataclass
class CrossAttentionMaps:
    prompt: str
    images: list  # what the pipeline returned
    maps: torch.Tensor  # (images, tokens, height, width): each pixel's attention over all tokens sums to 1
    tokens: list[str]  # the prompt's tokens, maps[:, i] belongs to tokens[i]

    def word(self, tokenizer, word: str) -> torch.Tensor:
        """(images, height, width): attention to `word`, summed over its tokens."""
        return self.maps[:, token_indices(tokenizer, self.prompt, word)].sum(1)


def cross_attention_maps(
    pipe, prompt: str, size: tuple[int, int] | None = None, **call_kwargs
) -> CrossAttentionMaps:
    """Run `pipe(prompt, **call_kwargs)` and return its images with the cross-attention maps of the prompt.

    Maps are averaged over heads, cross-attention layers and denoising steps. Under classifier-free guidance
    the UNet also sees the empty prompt; only the prompt's own half is kept.
    """
    height = call_kwargs.get("height") or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = call_kwargs.get("width") or pipe.unet.config.sample_size * pipe.vae_scale_factor
    latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    with capture_cross_attention(pipe.unet, latent_size, size) as store:
        images = pipe(prompt, **call_kwargs).images
    maps = store.mean()
    if maps.shape[0] == 2 * len(
        images
    ):  # [negative prompt, prompt]: the order diffusers concatenates them in
        maps = maps[len(images) :]
    return CrossAttentionMaps(prompt, images, maps, prompt_tokens(pipe.tokenizer, prompt))


def concentration(word_map: torch.Tensor, mask: np.ndarray) -> float:
    """How much more of a word's attention falls on `mask` than an even spread would put there: the map's
    share inside the mask over the mask's share of the image (1: no preference). `word_map` (h, w) is
    resized to the mask's (height, width) first."""
    resized = F.interpolate(word_map[None, None].float(), size=mask.shape, mode="bilinear")[0, 0]
    inside = torch.from_numpy(np.asarray(mask, dtype=bool))
    if not inside.any():
        raise ValueError("the mask is empty: there is no object to attend to")
    return float(resized[inside].sum() / resized.sum() / inside.float().mean())
