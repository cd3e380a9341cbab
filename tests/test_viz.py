"""The course's figures: the right number of panels, images and curves, and PNG files on disk."""

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from lora_nb.course.viz import (
    attention_figure,
    fitting_figure,
    image_grid,
    layer_energy_figure,
    loss_figure,
    magnitude_direction_figure,
    parameter_count_figure,
    rank_sweep_figure,
    reconstruction_error_figure,
    save_figure,
    size_bars_figure,
    spectrum_figure,
    token_share_figure,
    variants_figure,
)


def images(n, size=8):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def panels_with_images(fig):
    return [ax for ax in fig.axes if ax.images]


def test_image_grid_one_panel_per_image_with_captions():
    fig = image_grid(images(5), captions=[f"c{i}" for i in range(5)], ncols=3, title="five")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6  # 2 rows x 3 columns
    shown = panels_with_images(fig)
    assert len(shown) == 5
    assert [ax.get_title() for ax in shown] == [f"c{i}" for i in range(5)]
    assert np.array_equal(shown[0].images[0].get_array(), np.asarray(images(5)[0]))


def test_image_grid_accepts_arrays_and_checks_captions():
    assert len(panels_with_images(image_grid([np.zeros((4, 4, 3))] * 3))) == 3
    with pytest.raises(ValueError, match="captions"):
        image_grid(images(2), captions=["only one"])
    with pytest.raises(ValueError, match="at least one"):
        image_grid([])


def test_spectrum_figure_energy_reaches_one():
    spectra = {"W": torch.linalg.svdvals(torch.randn(16, 12)), "low rank": torch.tensor([3.0, 1.0, 0.0])}
    fig = spectrum_figure(spectra)
    ax_s, ax_e = fig.axes
    assert len(ax_s.lines) == len(ax_e.lines) == 2
    for line in ax_e.lines:
        energy = line.get_ydata()
        assert energy[-1] == pytest.approx(1.0) and np.all(np.diff(energy) >= 0)
    assert ax_e.lines[1].get_ydata()[0] == pytest.approx(0.9)  # 3^2 / (3^2 + 1^2)
    assert ax_s.lines[0].get_ydata()[0] == pytest.approx(1.0)  # s_1 / s_1


def test_spectrum_figure_max_rank_cuts_the_curve_not_the_total():
    s = torch.ones(10)
    ax_e = spectrum_figure({"flat": s}, max_rank=4).axes[1]
    assert ax_e.lines[0].get_ydata() == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_reconstruction_error_figure_one_curve_per_matrix():
    fig = reconstruction_error_figure({"a": [0.5, 0.2, 0.0], "b": [0.9, 0.8, 0.7]}, ranks=[1, 2, 4])
    (ax,) = fig.axes
    assert len(ax.lines) == 2 and list(ax.lines[0].get_xdata()) == [1, 2, 4]


def test_layer_energy_figure_one_series_per_kind():
    layers = [f"layer{i}" for i in range(60)]
    fig = layer_energy_figure({"dW": np.full(60, 0.9), "noise": np.full(60, 0.2)}, layers, rank=4)
    (ax,) = fig.axes
    assert [len(line.get_ydata()) for line in ax.lines] == [60, 60]
    assert len(ax.get_xticks()) <= 30 and "top 4" in ax.get_ylabel()


def test_layer_energy_figure_names_each_block_once():
    layers = [f"block{i // 8}.layer{i % 8}" for i in range(24)]
    fig = layer_energy_figure(
        {"dW": np.full(24, 0.9)}, layers, rank=4, blocks=[n.split(".")[0] for n in layers]
    )
    (ax,) = fig.axes
    assert list(ax.get_xticks()) == [0, 8, 16]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["block0", "block1", "block2"]


def test_parameter_count_figure_lora_against_dense():
    fig = parameter_count_figure({"to_k": (320, 768)}, ranks=[1, 4, 16])
    (ax,) = fig.axes
    lora, dense = ax.lines
    assert list(lora.get_ydata()) == [1088, 4352, 17408]  # r * (768 + 320)
    assert list(dense.get_ydata()) == [320 * 768] * 2  # a horizontal line


def test_loss_figure_raw_and_smoothed():
    (ax,) = loss_figure(list(np.linspace(1, 0, 30)), window=10).axes
    raw, smooth = ax.lines
    assert len(raw.get_ydata()) == 30 and len(smooth.get_ydata()) == 21
    (ax,) = loss_figure({"a": [1.0, 0.5], "b": [0.9, 0.4]}, window=10).axes  # too short to smooth
    assert len(ax.lines) == 4


def test_attention_figure_image_then_one_overlay_per_map():
    maps = {"red": torch.rand(4, 4), "circle": torch.rand(4, 4)}
    fig = attention_figure(images(1, size=16)[0], maps, title="a red circle")
    assert len(fig.axes) == 3
    assert len(fig.axes[0].images) == 1
    assert all(len(ax.images) == 2 for ax in fig.axes[1:])  # grey image + heat map
    heat = fig.axes[1].images[1].get_array()
    assert heat.shape == (16, 16) and heat.min() == pytest.approx(0) and heat.max() == pytest.approx(1)
    assert [ax.get_title() for ax in fig.axes] == ["image", "red", "circle"]


def test_token_share_figure_one_bar_per_token():
    (ax,) = token_share_figure(["<start>", "red", "circle", "padding"], [0.7, 0.1, 0.15, 0.05]).axes
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.7, 0.1, 0.15, 0.05])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["<start>", "red", "circle", "padding"]


def test_figures_render_themselves_as_png():
    png = image_grid(images(1))._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_figure_writes_png(tmp_path):
    fig = image_grid(images(2))
    path = save_figure(fig, tmp_path / "new" / "folder", "grid")
    assert path == tmp_path / "new" / "folder" / "grid.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(path).size[0] > 0
    assert save_figure(fig, tmp_path, "again.png").name == "again.png"


def sweep_rows():
    rows = [{"method": "base", "targets": "base model", "rank": None, "params": 0, "heldout_loss": 0.30}]
    rows += [
        {
            "method": "lora",
            "targets": "attention",
            "rank": r,
            "params": 100 * r,
            "heldout_loss": 0.29 - r / 1000,
        }
        for r in (16, 1, 4)
    ]  # out of order: the line is drawn by size
    rows += [
        {"method": "lora", "targets": "cross-attention", "rank": 4, "params": 200, "heldout_loss": 0.285},
        {
            "method": "full",
            "targets": "attention (full fine-tune)",
            "rank": None,
            "params": 5000,
            "heldout_loss": 0.28,
        },
    ]
    return rows


def test_rank_sweep_figure_one_line_per_target_set_with_references():
    (ax,) = rank_sweep_figure(sweep_rows()).axes
    attention, cross, base_line, star, full_line = ax.lines  # references in the rows' order
    assert list(attention.get_xdata()) == [100, 400, 1600]  # sorted by size
    assert list(attention.get_ydata()) == pytest.approx([0.289, 0.286, 0.274])
    assert list(cross.get_xdata()) == [200]
    assert list(star.get_xdata()) == [5000] and star.get_marker() == "*"
    assert list(full_line.get_ydata()) == [0.28, 0.28] and list(base_line.get_ydata()) == [0.30, 0.30]
    assert sorted(t.get_text() for t in ax.texts) == ["r1", "r16", "r4", "r4"]
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "held-out denoising loss"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "attention",
        "cross-attention",
        "base model (no adapter)",
        "attention (full fine-tune)",
        "the full fine-tune's loss",
    ]


def test_rank_sweep_figure_other_x():
    rows = [{**r, "fp16_bytes": 2 * r["params"]} for r in sweep_rows()]
    (ax,) = rank_sweep_figure(rows, x="fp16_bytes").axes
    assert list(ax.lines[0].get_xdata()) == [200, 800, 3200] and "fp16" in ax.get_xlabel()


def test_size_bars_figure_grouped_bars_labels_and_references():
    fig = size_bars_figure(
        ["a", "b", "c"],
        {"fp32": [4.0, 40.0, 1480.0], "fp16": [2.0, 20.0, 740.0]},
        unit="kB",
        references={"UNet": 6750.0},
    )
    (ax,) = fig.axes
    assert [p.get_height() for p in ax.patches] == pytest.approx([4, 40, 1480, 2, 20, 740])
    # each bar's value, and plainly: "1,480", not "1.48e+03"
    assert [t.get_text() for t in ax.texts] == ["4", "40", "1,480", "2", "20", "740"]
    assert list(ax.lines[0].get_ydata()) == [6750.0, 6750.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "kB"
    with pytest.raises(ValueError, match="2 values for 3 labels"):
        size_bars_figure(["a", "b", "c"], {"fp32": [1.0, 2.0]})


def variant_rows():
    base = {"method": "base", "variant": None, "params": 0, "step_seconds": None, "heldout_loss": 0.30}
    runs = [("LoRA", 100, 0.010, 0.28), ("DoRA", 120, 0.015, 0.27)]
    keys = ("variant", "params", "step_seconds", "heldout_loss")
    return [base] + [{"method": "lora", **dict(zip(keys, run, strict=True))} for run in runs]


def test_variants_figure_puts_each_variant_at_its_cost_and_loss():
    left, right = variants_figure(variant_rows()).axes
    assert [list(line.get_xdata()) for line in left.lines[:2]] == [[100], [120]]
    assert [list(line.get_xdata()) for line in right.lines[:2]] == [[10.0], [15.0]]  # milliseconds
    assert [list(line.get_ydata()) for line in right.lines[:2]] == [[0.28], [0.27]]
    (legend,) = left.figure.legends  # one for both panels: each variant by name, and the base model
    assert [t.get_text() for t in legend.get_texts()] == ["LoRA", "DoRA", "base model (no adapter)"]
    assert list(left.lines[2].get_ydata()) == [0.30, 0.30]  # the base model


def test_magnitude_direction_figure_one_cloud_per_adapter():
    (ax,) = magnitude_direction_figure({"LoRA": [(0.1, 0.01), (0.2, 0.02)], "DoRA": [(0.3, 0.0)]}).axes
    lora, dora = ax.collections
    assert lora.get_offsets().tolist() == [[0.1, 0.01], [0.2, 0.02]] and len(dora.get_offsets()) == 1
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["LoRA", "DoRA"]


def test_fitting_figure_one_line_per_curve_and_the_base():
    (ax,) = fitting_figure([50, 100], {"trained on": [0.2, 0.1], "held out": [0.25, 0.3]}, base=0.27).axes
    trained, held, base = ax.lines
    assert list(trained.get_xdata()) == [50, 100] and list(held.get_ydata()) == [0.25, 0.3]
    assert list(base.get_ydata()) == [0.27, 0.27]
