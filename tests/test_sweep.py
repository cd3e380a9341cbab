"""The rank sweep: exact sizes, measurements on the unchanged base model, and clear errors."""

import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from lora_nb.course.evaluate import HeldOut
from lora_nb.course.sweep import (
    BASE,
    VARIANTS,
    format_bytes,
    meta_parts,
    run_label,
    run_sweep,
    sweep_table,
)
from lora_nb.course.tiny import TINY_SD_PATH
from lora_nb.course.world import IMAGE_SIZE
from lora_nb.data import load_captioned_dataset
from lora_nb.formats import read_lora
from lora_nb.inference import load_base_pipeline
from lora_nb.sizes import adapter_size
from lora_nb.train import TrainConfig, train

CREATURES = TINY_SD_PATH.parent / "creatures"
TINY = {
    "max_train_steps": 2,
    "train_batch_size": 2,
    "max_train_samples": 4,
    "heldout": 2,
    "heldout_repeats": 1,
    "num_inference_steps": 2,
    "verbose": False,
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return run_sweep(
        TINY_SD_PATH,
        CREATURES,
        {"attention+text encoder": [1], "attention": [1, 2]},
        full_finetune="cross-attention",
        output_dir=tmp_path_factory.mktemp("sweep"),
        **TINY,
    )


def test_one_row_per_run_base_first_reference_last(rows):
    assert [run_label(r) for r in rows] == [
        "base model",
        "attention+text encoder r1",
        "attention r1",
        "attention r2",
        "cross-attention (full)",
    ]
    assert [r["method"] for r in rows] == ["base", "lora", "lora", "lora", "full"]
    assert all(
        isinstance(r["image"], Image.Image) and r["image"].size == (IMAGE_SIZE, IMAGE_SIZE) for r in rows
    )
    assert all(r["heldout_loss"] > 0 for r in rows)
    assert all(len(r["losses"]) == 2 for r in rows[1:])


def test_parameters_are_rank_times_the_per_rank_count(rows):
    for row in rows[1:4]:
        per_rank = adapter_size(meta_parts(TINY_SD_PATH, row["targets"]), rank=1)
        assert row["params"] == row["rank"] * per_rank.lora_params
        assert row["layers"] == per_rank.layers
    assert rows[3]["params"] == 2 * rows[2]["params"]


def test_file_sizes_are_exact_at_fp32_and_fp16(rows, tmp_path):
    for row in rows[1:4]:
        assert row["file_bytes"] == row["path"].stat().st_size == row["fp32_bytes"]
        with safetensors.safe_open(row["path"], "pt") as f:  # the same file with fp16 tensors
            half = {key: f.get_tensor(key).half() for key in f.keys()}  # noqa: SIM118 -- not a dict
            metadata = f.metadata()
        safetensors.torch.save_file(half, tmp_path / "half.safetensors", metadata=metadata)
        assert (tmp_path / "half.safetensors").stat().st_size == row["fp16_bytes"]


def test_the_full_reference_counts_its_layers_dense(rows):
    full = rows[-1]
    unet = meta_parts(TINY_SD_PATH, "cross-attention")["unet"][0]
    layers = [
        m
        for name, m in unet.named_modules()
        if name.endswith(("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))
    ]
    assert full["layers"] == len(layers) == 28
    assert full["params"] == sum(p.numel() for m in layers for p in m.parameters())
    assert (full["fp32_bytes"], full["fp16_bytes"]) == (4 * full["params"], 2 * full["params"])


def test_each_run_is_measured_on_the_unchanged_base(rows, tmp_path):
    """A run measures the same whether other adapters (text encoder LoRA included) were on the pipeline
    before."""
    alone = run_sweep(
        TINY_SD_PATH, CREATURES, {"attention": [1]}, full_finetune=None, output_dir=tmp_path, **TINY
    )
    assert [r["method"] for r in alone] == ["base", "lora"]
    assert alone[0]["heldout_loss"] == rows[0]["heldout_loss"]
    assert alone[1]["heldout_loss"] == pytest.approx(rows[2]["heldout_loss"], rel=1e-6)
    assert alone[1]["image"].tobytes() == rows[2]["image"].tobytes()


def test_a_sweep_run_is_the_adapter_train_makes_alone(rows, tmp_path):
    """Latents and text embeddings reused from earlier runs change nothing: the same factors, bit for bit."""
    alone = train(
        TrainConfig(
            str(TINY_SD_PATH),
            train_data_dir=str(CREATURES),
            max_train_samples=4,
            center_crop=True,
            random_flip=True,
            train_batch_size=2,
            max_train_steps=2,
            learning_rate=1e-3,
            rank=2,
            seed=0,
            output_dir=str(tmp_path),
            show_progress=False,
            checkpointing_steps=0,
        )
    )
    ours = read_lora(rows[3]["path"]).tensors
    theirs = read_lora(alone.lora_path).tensors
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_held_out_loss_draws_the_same_noise_every_call():
    pipe = load_base_pipeline(TINY_SD_PATH)
    data = load_captioned_dataset(CREATURES).select(range(290, 300))
    held_out = HeldOut(pipe, data["image"], data["text"], seed=3, repeats=2, batch_size=4)
    assert held_out.loss(pipe) == held_out.loss(pipe)
    assert held_out.loss(pipe) != HeldOut(pipe, data["image"], data["text"], seed=4, repeats=2).loss(pipe)


def test_table_has_a_line_per_run(rows):
    table = sweep_table(rows).splitlines()
    assert len(table) == len(rows) + 2
    assert table[2].startswith(f"| {BASE} |") and "| attention | 2 |" in table[5]
    assert "%" in table[3] and "%" not in table[2]  # the change from the base model


@pytest.mark.parametrize(
    ("ranks", "overrides", "message"),
    [
        ({"everything": [4]}, {}, "unknown target set"),
        ({"attention": [4]}, {"full_finetune": "nope"}, "unknown target set"),
        ({"attention": [0]}, {}, "positive"),
        ({"attention": [4]}, {"heldout": 300}, "heldout=300"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, ranks, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_sweep(TINY_SD_PATH, CREATURES, ranks, output_dir=tmp_path, **{**TINY, **overrides})
    assert not any(tmp_path.iterdir())


def test_meta_parts_read_configs_only():
    parts = meta_parts(TINY_SD_PATH, "attention+text encoder")
    assert set(parts) == {"unet", "text_encoder"}
    assert all(p.is_meta for model, _ in parts.values() for p in model.parameters())
    assert set(meta_parts(TINY_SD_PATH, "attention+ff")) == {"unet"}


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 47_920, 3_229_000, 3.44e9)] == [
        "512 B",
        "47.9 kB",
        "3.23 MB",
        "3.44 GB",
    ]


def test_variants_train_what_they_say_and_their_sizes_are_exact(tmp_path):
    rows = run_sweep(
        TINY_SD_PATH,
        CREATURES,
        {"attention": [2]},
        full_finetune=None,
        variants=VARIANTS,
        output_dir=tmp_path,
        **TINY,
    )
    by_variant = {r["variant"]: r for r in rows[1:]}
    assert list(by_variant) == list(VARIANTS)
    assert (
        run_label(by_variant["DoRA"]) == "attention r2 DoRA"
        and run_label(by_variant["LoRA"]) == "attention r2"
    )
    plain = by_variant["LoRA"]
    for row in by_variant.values():
        assert row["file_bytes"] == row["path"].stat().st_size == row["fp32_bytes"]
        assert row["step_seconds"] > 0 and row["step_seconds"] * len(row["losses"]) < row["seconds"]
    magnitudes = sum(1 for key in read_lora(by_variant["DoRA"]["path"]).tensors if "magnitude" in key)
    assert magnitudes == plain["layers"]  # one magnitude vector per adapted layer
    assert by_variant["DoRA"]["params"] > plain["params"] == by_variant["rsLoRA"]["params"]
    assert by_variant["LoRA+"]["params"] == plain["params"]
    assert by_variant["LoRA+"]["losses"][1] != plain["losses"][1]  # B's faster rate changed the second step
    assert by_variant["rsLoRA"]["losses"][1] != plain["losses"][1]  # alpha / sqrt(r): another scale
    locon = by_variant["LoCon"]
    assert locon["targets"] == "attention+conv" and locon["layers"] > plain["layers"]
    assert any(key.endswith("conv1.lora_A.weight") for key in read_lora(locon["path"]).tensors)


def test_an_unknown_variant_target_set_is_named_before_anything_trains(tmp_path):
    with pytest.raises(ValueError, match="attention\\+convs"):
        run_sweep(
            TINY_SD_PATH,
            CREATURES,
            {"attention": [1]},
            variants={"x": {"target_set": "attention+convs"}},
            output_dir=tmp_path,
            **TINY,
        )
    assert not any(tmp_path.iterdir())
