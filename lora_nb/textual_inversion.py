"""Textual inversion: a new word for the tokenizer, whose embedding is the only thing that learns.

Used alone, it teaches the model one concept through a word (Gal et al., 2022, arXiv 2208.01618). As the
first half of pivotal tuning it finds the word ("the pivot") before LoRA adapts the UNet around it.
The learned vector is saved as diffusers' `load_textual_inversion` reads it: a safetensors file with one
key, the token, holding its embedding.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from transformers import CLIPTextModel, CLIPTokenizer

EMBEDDING_NAME = "learned_embeds.safetensors"  # the file name diffusers' textual inversion scripts write


def check_new_token(tokenizer: CLIPTokenizer, token: str) -> None:
    """A placeholder must be new: not in the vocabulary, and not a word the tokenizer already has ("star")."""
    if token in tokenizer.get_vocab() or len(tokenizer(token, add_special_tokens=False).input_ids) == 1:
        raise ValueError(
            f"placeholder token {token!r} already exists in the tokenizer's vocabulary; "
            "choose a new one, e.g. '<my-subject>'"
        )


def add_placeholder_token(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    token: str,
    initializer_token: str | None = None,
    embedding: torch.Tensor | None = None,
) -> int:
    """Add `token` to the vocabulary with a new embedding row; returns its id.

    The row starts as `embedding` if given, else as the embedding of `initializer_token` (a word that
    must be a single token, typically the class noun), so training starts from something meaningful.
    """
    check_new_token(tokenizer, token)
    if embedding is None:
        if initializer_token is None:
            raise ValueError(f"placeholder token {token!r} needs an initializer_token or a learned embedding")
        ids = tokenizer(initializer_token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"initializer_token {initializer_token!r} must be one token; it is {len(ids)}")
        embedding = text_encoder.get_input_embeddings().weight[ids[0]].detach().clone()
    tokenizer.add_tokens([token])
    token_id = tokenizer.convert_tokens_to_ids(token)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the row is set below
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[token_id] = embedding.to(text_encoder.dtype)
    return token_id


def train_only_rows(embeddings: torch.nn.Embedding, rows: list[int]):
    """Make `embeddings` trainable (fp32) and return a function that undoes every change outside `rows`.

    AdamW's weight decay and momentum touch every row of a trainable matrix, so after each optimiser step
    the other rows are put back from a copy: only the new word learns.
    """
    embeddings.float().weight.requires_grad_(True)
    original = embeddings.weight.detach().clone()
    keep = torch.ones(len(original), dtype=torch.bool)
    keep[rows] = False

    @torch.no_grad()
    def restore_other_rows() -> None:
        embeddings.weight[keep] = original[keep]

    return restore_other_rows


def save_learned_embedding(
    folder: str | Path, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, token: str
) -> Path:
    path = Path(folder) / EMBEDDING_NAME
    token_id = tokenizer.convert_tokens_to_ids(token)
    vector = text_encoder.get_input_embeddings().weight[token_id].detach().float().cpu().clone()
    tmp = path.with_suffix(".tmp")
    safetensors.torch.save_file({token: vector}, tmp)
    tmp.replace(path)
    return path


def read_learned_embedding(path: str | Path) -> tuple[str, torch.Tensor]:
    """(token, embedding) from a diffusers textual-inversion file (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / EMBEDDING_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no textual-inversion embedding at {path}")
    tensors = safetensors.torch.load_file(path)
    if len(tensors) != 1:
        raise ValueError(f"{path}: a textual-inversion file holds one token; this one has {sorted(tensors)}")
    return next(iter(tensors.items()))


def nearest_words(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, vector: torch.Tensor, k: int = 5
) -> list[tuple[str, float]]:
    """The k vocabulary words whose input embeddings point most nearly the way `vector` does (cosine)."""
    table = text_encoder.get_input_embeddings().weight.detach().float()  # (vocab, width)
    similarity = torch.nn.functional.cosine_similarity(table, vector.float()[None], dim=-1)
    words = {i: t for t, i in tokenizer.get_vocab().items() if t.endswith("</w>")}  # whole words only
    ranked = [i for i in similarity.argsort(descending=True).tolist() if i in words][:k]
    return [(words[i].removesuffix("</w>"), float(similarity[i])) for i in ranked]
