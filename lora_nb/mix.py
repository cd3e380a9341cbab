"""Mixing adapters: one adapter whose update is a weighted sum of theirs, exactly.

A layer's update is ΔW = s B A with s = alpha / r. Stacking the factors,

    A = [A1; A2]                 (r1 + r2, d_in)
    B = [w1 s1 B1, w2 s2 B2]     (d_out, r1 + r2)

gives B A = w1 s1 B1 A1 + w2 s2 B2 A2 = w1 ΔW1 + w2 ΔW2, so with alpha = r1 + r2 (s = 1) the mix is exact:
no approximation, loaded unmerged like any adapter, written to one file. It costs rank r1 + r2; ``rank=``
cuts it to a fixed rank by SVD (lora_nb.extract.resize_lora), which is then an approximation.

    mix = mix_loras(["style", "subject"], [0.8, 0.5])
    load_lora_weights(mix, unet=pipe.unet)          # or save_lora_weights("mixed", adapter=mix)
    remove_lora(pipe.unet); load_lora_weights(mix_loras(["style", "subject"], [0.3, 1.0]), unet=pipe.unet)
"""

import os
from collections.abc import Sequence

import torch

from .convert import metadata_for, split_layers
from .extract import resize_lora
from .formats import LoraAdapter, read_lora


@torch.no_grad()
def mix_loras(
    adapters: Sequence[str | os.PathLike | LoraAdapter], weights: Sequence[float], rank: int | None = None
) -> LoraAdapter:
    """The adapter whose every layer adds sum_i weights[i] * ΔW_i (files in any layout, or LoraAdapters).

    Layers in several adapters get their factors stacked (alpha = the summed rank, scaling 1); a layer in
    one adapter keeps its rank and alpha, B times its weight. An adapter of weight 0 adds exactly nothing, so
    it is left out: weights (1, 0) give back the first adapter, tensors and alphas bit for bit. ``rank``
    compresses the result to that rank by SVD (every layer then has alpha = rank). Factors come out in fp32.
    """
    if len(adapters) != len(weights):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    terms: dict[str, list[tuple[torch.Tensor, torch.Tensor, float, float]]] = {}  # stem -> [(A, B, alpha, w)]
    for adapter, weight in zip(adapters, weights):
        if weight == 0:
            continue
        lora = adapter if isinstance(adapter, LoraAdapter) else read_lora(adapter)
        for stem, (a, b, alpha) in split_layers(lora.tensors, lora.metadata).items():
            terms.setdefault(stem, []).append((a.float(), b.float(), alpha, weight))
    if not terms:
        raise ValueError("nothing to mix: every weight is 0")
    tensors, layers = {}, {}
    for stem, layer_terms in terms.items():
        if len(layer_terms) == 1:
            a, b, alpha, weight = layer_terms[0]
            b = weight * b
        else:
            shapes = {(a.shape[1], b.shape[0]) for a, b, _, _ in layer_terms}
            if len(shapes) > 1:
                raise ValueError(f"{stem}: the adapters disagree on its (d_in, d_out): {sorted(shapes)}")
            a = torch.cat([a for a, _, _, _ in layer_terms])  # A: (r1 + r2 + ..., d_in)
            # B: (d_out, r1 + r2 + ...), each block times its weight and scaling alpha_i / r_i
            b = torch.cat(
                [weight * alpha / a_i.shape[0] * b_i for a_i, b_i, alpha, weight in layer_terms], dim=1
            )
            alpha = float(a.shape[0])
        tensors[f"{stem}.lora_A.weight"], tensors[f"{stem}.lora_B.weight"] = a, b
        layers[stem] = (a.shape[0], alpha)
    metadata = metadata_for(layers)
    if rank is not None:
        tensors, _ = resize_lora(tensors, rank, metadata)
        metadata = metadata_for({stem: (rank, float(rank)) for stem in layers})
    return LoraAdapter(tensors, metadata)
