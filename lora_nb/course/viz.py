"""The course's figures: each function draws one idea and returns a matplotlib Figure.

Figures are built without pyplot, so nothing is kept in pyplot's global list (no memory growth over a long
notebook, no figure shown twice, no backend to choose). A notebook shows one by making it the last
expression of a cell -- it renders itself as a PNG -- and keeps it with `save_figure(fig, output_dir, name)`.
"""

from __future__ import annotations

import io
import itertools
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image


class CourseFigure(Figure):
    """A matplotlib Figure that Jupyter displays as a PNG by itself (IPython calls `_repr_png_`)."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        return buffer.getvalue()


def _numpy(x) -> np.ndarray:
    return (
        x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    )


def save_figure(fig: Figure, output_dir: str | Path, name: str) -> Path:
    """Write `fig` to `output_dir/name.png` (the folder is made if needed); returns the path."""
    path = Path(output_dir) / (name if name.endswith(".png") else f"{name}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def image_grid(
    images: Sequence,
    captions: Sequence[str] | None = None,
    ncols: int | None = None,
    title: str | None = None,
    size: float = 1.8,
) -> Figure:
    """Images (PIL, or HxWxC arrays) in a grid, one caption under each; pixels drawn unsmoothed."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    ncols = ncols or min(len(images), 8)
    nrows = math.ceil(len(images) / ncols)
    fig = CourseFigure(figsize=(size * ncols, size * nrows + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < len(images):
            # 32 px images: "nearest" shows the pixels the model drew, not a blur of them.
            ax.imshow(np.asarray(images[i]), interpolation="nearest")
            if captions is not None:
                ax.set_title(textwrap.fill(captions[i], width=int(14 * size)), fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def spectrum_figure(
    spectra: Mapping[str, torch.Tensor], max_rank: int | None = None, title: str | None = None
) -> Figure:
    """Singular values of several matrices: left, s_i / s_1; right, the energy share of the top r.

    The energy of the top r is sum_{i<=r} s_i^2 / sum_i s_i^2, the fraction of ||W||_F^2 that the best rank-r
    approximation keeps (Eckart-Young). A flat spectrum needs many ranks; a low-rank one is done in a few.
    """
    fig = CourseFigure(figsize=(10, 3.6), layout="constrained")
    ax_s, ax_e = fig.subplots(1, 2)
    for label, s in spectra.items():
        s = _numpy(s)
        s = s[:max_rank] if max_rank else s
        energy = np.cumsum(s**2) / np.sum(_numpy(spectra[label]) ** 2)
        ranks = np.arange(1, len(s) + 1)
        ax_s.plot(ranks, s / s[0], marker=".", markersize=3, label=label)
        ax_e.plot(ranks, energy, marker=".", markersize=3, label=label)
    ax_s.set(xlabel="index i", ylabel="s_i / s_1", title="singular values", yscale="log")
    ax_e.set(xlabel="rank r", ylabel="energy share of the top r", title="energy captured", ylim=(0, 1.02))
    ax_e.legend(fontsize=8)
    for ax in (ax_s, ax_e):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def reconstruction_error_figure(
    errors: Mapping[str, Sequence[float]], ranks: Sequence[int] | None = None, title: str | None = None
) -> Figure:
    """Relative error ||W - W_r||_F / ||W||_F of the best rank-r approximation, against r, per matrix."""
    fig = CourseFigure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for label, err in errors.items():
        err = _numpy(err)
        ax.plot(ranks if ranks is not None else np.arange(1, len(err) + 1), err, marker=".", label=label)
    ax.set(
        xlabel="rank r",
        ylabel="relative error",
        title=title or "reconstruction error of truncated SVD",
        ylim=(0, 1.02),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def layer_energy_figure(
    shares: Mapping[str, Sequence[float]],
    layers: Sequence[str],
    rank: int,
    title: str | None = None,
    blocks: Sequence[str] | None = None,
) -> Figure:
    """For every layer (x), the energy share of the top `rank` singular values (y), one series per matrix
    kind. With `blocks` (a label per layer, e.g. its attention block), the axis names each block once, at
    its first layer, and a faint line separates the blocks: dozens of full layer names cannot be read."""
    fig = CourseFigure(figsize=(max(6.0, 0.12 * len(layers)), 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(layers))
    for (label, values), marker in zip(shares.items(), "os^vDx*", strict=False):
        ax.plot(x, _numpy(values), linestyle="none", marker=marker, markersize=4, label=label)
    if blocks is None:
        step = max(1, len(layers) // 24)  # at most ~24 names on the axis
        ax.set_xticks(x[::step], list(layers)[::step], rotation=90, fontsize=6)
    else:
        starts = [i for i in range(len(blocks)) if i == 0 or blocks[i] != blocks[i - 1]]
        ax.set_xticks(starts, [blocks[i] for i in starts], rotation=45, ha="right", fontsize=8)
        for i in starts[1:]:
            ax.axvline(i - 0.5, color="gray", linewidth=0.6, alpha=0.5)
    ax.set(
        ylabel=f"energy share of the top {rank}",
        ylim=(0, 1.02),
        title=title or f"rank-{rank} energy per layer",
    )
    ax.grid(alpha=0.3, axis="y")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", fontsize=8)
    return fig


def parameter_count_figure(
    shapes: Mapping[str, tuple[int, int]], ranks: Sequence[int], title: str | None = None
) -> Figure:
    """Parameters of a dense update d_out x d_in (dashed) against a LoRA pair B A, r (d_in + d_out)
    (solid)."""
    fig = CourseFigure(figsize=(8, 3.6), layout="constrained")
    ax = fig.subplots()
    ranks = np.asarray(ranks)
    for (label, (d_out, d_in)), colour in zip(shapes.items(), _colours(len(shapes)), strict=True):
        ax.plot(ranks, ranks * (d_in + d_out), color=colour, marker=".", label=f"{label}: LoRA")
        ax.axhline(d_in * d_out, color=colour, linestyle="--", linewidth=1, label=f"{label}: dense")
    ax.set(
        xlabel="rank r",
        ylabel="parameters",
        yscale="log",
        xscale="log",
        title=title or "one layer's update: LoRA r(d_in+d_out) against dense d_out*d_in",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the plot: the lines fill it
    return fig


def loss_figure(
    losses: Mapping[str, Sequence[float]] | Sequence[float], window: int = 10, title: str | None = None
) -> Figure:
    """Training loss per step (faint) and its moving average over `window` steps (bold)."""
    curves = losses if isinstance(losses, Mapping) else {"loss": losses}
    fig = CourseFigure(figsize=(5.5, 3.4), layout="constrained")
    ax = fig.subplots()
    for (label, values), colour in zip(curves.items(), _colours(len(curves)), strict=True):
        values = _numpy(values)
        steps = np.arange(1, len(values) + 1)
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=1)
        if len(values) >= window:  # the per-step loss of diffusion is noisy: the timestep is random
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(
                steps[window - 1 :], smooth, color=colour, linewidth=2, label=f"{label} ({window}-step mean)"
            )
        else:
            ax.plot(steps, values, color=colour, linewidth=2, label=label)
    ax.set(xlabel="step", ylabel="loss", title=title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def attention_figure(
    image, maps: Mapping[str, torch.Tensor], title: str | None = None, alpha: float = 0.6, size: float = 1.8
) -> Figure:
    """The image, then one panel per label with its attention map (h x w) laid over the image.

    Each map is resized to the image (bilinear) and scaled to [0, 1] on its own: the panels show *where*
    a token is read, not how much it is read compared with the others.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    height, width = rgb.shape[:2]
    fig = CourseFigure(figsize=(size * (len(maps) + 1), size + (0.5 if title else 0.3)), layout="constrained")
    axes = fig.subplots(1, len(maps) + 1, squeeze=False).ravel()
    axes[0].imshow(rgb, interpolation="nearest")
    axes[0].set_title("image", fontsize=8)
    for ax, (label, amap) in zip(axes[1:], maps.items(), strict=True):
        amap = torch.as_tensor(_numpy(amap))[None, None]  # (1, 1, h, w)
        amap = torch.nn.functional.interpolate(
            amap, size=(height, width), mode="bilinear", align_corners=False
        )[0, 0]
        amap = (amap - amap.min()) / (amap.max() - amap.min()).clamp_min(1e-12)
        ax.imshow(rgb.mean(-1), cmap="gray", interpolation="nearest")  # grey image: the colour is the map
        ax.imshow(amap.numpy(), cmap="jet", alpha=alpha, interpolation="bilinear")
        ax.set_title(label, fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


def token_share_figure(tokens: Sequence[str], shares: Sequence[float], title: str | None = None) -> Figure:
    """A bar per token: the share of all cross-attention it receives (the shares of all tokens sum to one)."""
    fig = CourseFigure(figsize=(max(4.0, 0.6 * len(tokens)), 3.2), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(tokens)), _numpy(shares), color="C0")
    ax.set_xticks(range(len(tokens)), tokens, rotation=45, ha="right", fontsize=8)
    ax.set(ylabel="share of attention", title=title or "where the attention goes")
    ax.grid(alpha=0.3, axis="y")
    return fig


def rank_sweep_figure(rows: Sequence[Mapping], x: str = "params", title: str | None = None) -> Figure:
    """Held-out loss (y) against adapter size (x, log scale) for a rank sweep.

    `rows` are `lora_nb.course.sweep.run_sweep`'s: each has "method" ("lora", "full" or "base"), "targets",
    "rank", "heldout_loss" and the `x` key ("params", "fp32_bytes" or "fp16_bytes"). LoRA runs make one line
    per target set, each point labelled with its rank; a full fine-tune is a star with a dotted line at its
    loss; the base model (no adapter) is a dashed line.
    """
    xlabels = {
        "params": "trainable parameters",
        "fp32_bytes": "file size, fp32 (bytes)",
        "fp16_bytes": "file size, fp16 (bytes)",
    }
    fig = CourseFigure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    lora = [r for r in rows if r["method"] == "lora"]
    names = list(dict.fromkeys(r["targets"] for r in lora))
    for name, colour in zip(names, _colours(len(names)), strict=True):
        runs = sorted((r for r in lora if r["targets"] == name), key=lambda r: r[x])
        ax.plot([r[x] for r in runs], [r["heldout_loss"] for r in runs], color=colour, marker="o", label=name)
        for r in runs:
            ax.annotate(
                f"r{r['rank']}",
                (r[x], r["heldout_loss"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
                color=colour,
            )
    for r in rows:
        if r["method"] == "full":
            ax.plot(
                [r[x]],
                [r["heldout_loss"]],
                color="black",
                marker="*",
                markersize=12,
                linestyle="none",
                label=r["targets"],
            )
            ax.axhline(
                r["heldout_loss"],
                color="black",
                linestyle=":",
                linewidth=1,
                label="the full fine-tune's loss",
            )
        elif r["method"] == "base":
            ax.axhline(
                r["heldout_loss"],
                color="gray",
                linestyle="--",
                linewidth=1.2,
                label="base model (no adapter)",
            )
    ax.set(
        xscale="log",
        xlabel=xlabels.get(x, x),
        ylabel="held-out denoising loss",
        title=title or "held-out loss against adapter size",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return fig


def size_bars_figure(
    labels: Sequence[str],
    sizes: Mapping[str, Sequence[float]],
    unit: str = "MB",
    references: Mapping[str, float] | None = None,
    log: bool = True,
    title: str | None = None,
) -> Figure:
    """Grouped bars: for each label, one bar per series in `sizes` (e.g. "fp32", "fp16"), each bar labelled
    with its value; `references` (e.g. {"UNet, fp32": 6.8}) are dashed horizontal lines."""
    for name, values in sizes.items():
        if len(values) != len(labels):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(labels)} labels")
    fig = CourseFigure(figsize=(max(5.0, 0.9 * len(labels) + 2), 4.0), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(sizes))
    for i, ((name, values), colour) in enumerate(zip(sizes.items(), _colours(len(sizes)), strict=True)):
        bars = ax.bar(x + (i - (len(sizes) - 1) / 2) * width, _numpy(values), width, color=colour, label=name)
        # three significant digits, but "1,480" rather than "1.48e+03"
        ax.bar_label(bars, fmt=lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.3g}", fontsize=6, padding=1)
    for (name, value), colour in zip(
        (references or {}).items(), _colours(len(references or {}))[::-1], strict=True
    ):
        ax.axhline(value, color=colour, linestyle="--", linewidth=1, label=name)
    ax.set_xticks(x, list(labels), rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=unit, title=title or "sizes", yscale="log" if log else "linear")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return fig


def fitting_figure(
    steps: Sequence[int],
    curves: Mapping[str, Sequence[float]],
    base: float | None = None,
    title: str | None = None,
) -> Figure:
    """Losses measured at a run's checkpoints (x: step), one line per data set (say, the examples trained on
    and held-out ones), and the base model's held-out loss dashed: over-fitting is where the lines part."""
    fig = CourseFigure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    for (label, values), colour in zip(curves.items(), _colours(len(curves)), strict=True):
        ax.plot(list(steps), _numpy(values), marker="o", color=colour, label=label)
    if base is not None:
        ax.axhline(base, color="gray", linestyle="--", linewidth=1.2, label="the base model")
    ax.set(xlabel="training step (checkpoint)", ylabel="denoising loss", title=title or "fitting")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def variants_figure(rows: Sequence[Mapping], title: str | None = None) -> Figure:
    """Held-out loss against trainable parameters (left) and against time per step (right), one point per
    LoRA variant of a sweep (`run_sweep(..., variants=...)`'s rows), named in the legend; the base model
    dashed."""
    runs = [r for r in rows if r["method"] == "lora"]
    base = next((r["heldout_loss"] for r in rows if r["method"] == "base"), None)
    fig = CourseFigure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (key, label, scale) in zip(
        axes,
        (("params", "trainable parameters", 1), ("step_seconds", "time per training step (ms)", 1e3)),
        strict=True,
    ):
        # a legend, not labels at the points: variants that cost and reach about the same sit on top of
        # each other, and so would their labels; colour and marker tell them apart
        for r, colour, marker in zip(runs, _colours(len(runs)), itertools.cycle("os^Dv<>P"), strict=False):
            ax.plot(
                [r[key] * scale],
                [r["heldout_loss"]],
                marker=marker,
                markersize=8,
                color=colour,
                linestyle="none",
                alpha=0.85,
                label=r["variant"],
            )
        if base is not None:
            ax.axhline(base, color="gray", linestyle="--", linewidth=1.2, label="base model (no adapter)")
        ax.set(xlabel=label)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel="held-out denoising loss")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    fig.suptitle(title or "the variants: what they cost, what they reach")
    return fig


def magnitude_direction_figure(
    changes: Mapping[str, Sequence[tuple[float, float]]], title: str | None = None
) -> Figure:
    """DoRA's analysis (Liu et al., 2024, fig. 2): per adapted layer, how far training moved the weights'
    magnitude (x) and direction (y); one colour per adapter in `changes` ({name: [(dM, dD) per layer]})."""
    fig = CourseFigure(figsize=(5.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for (name, points), colour in zip(changes.items(), _colours(len(changes)), strict=True):
        dm, dd = np.array(points, dtype=float).T
        ax.scatter(dm, dd, s=14, color=colour, alpha=0.75, label=name)
    ax.set(
        xlabel="magnitude change, mean |m' - m| / m per layer",
        ylabel="direction change, mean 1 - cos(W', W)",
        title=title or "magnitude and direction of each layer's update",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _colours(n: int) -> list:
    cycle = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    return [cycle[i % len(cycle)] for i in range(n)]
