import os

import pytest
import torch
from conftest import make_text_encoder
from diffusers import UNet2DConditionModel

from lora_nb.course import tiny
from lora_nb.formats import save_lora_weights
from lora_nb.inject import (
    TEXT_ENCODER_ATTENTION,
    UNET_ATTENTION,
    UNET_CROSS_ATTENTION,
    UNET_FEED_FORWARD,
    count_parameters,
    inject_lora,
    lora_layers,
)
from lora_nb.sizes import BYTES, MODELS, adapter_size, build_meta, lora_shapes, main, size_table

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny.UNET_CONFIG)


def test_sd15_rank4_attention_is_the_blogs_3_29_mb_adapter():
    """HF's LoRA blog: rank 4 on SD 1.5's attention gives a 3.29 MB file next to a ~3.44 GB fp32 UNet."""
    size = adapter_size({"unet": (build_meta("sd15"), UNET_ATTENTION)}, rank=4)
    assert size.layers == 128  # 16 transformer blocks x (attn1, attn2) x (to_q, to_k, to_v, to_out.0)
    assert size.lora_params == 797_184
    assert size.file_bytes / 1e6 == pytest.approx(3.29, rel=0.05)
    assert size.base_params == 859_520_964
    assert size.base_bytes / 1e9 == pytest.approx(3.44, rel=0.01)
    assert size.ratio == pytest.approx(1 / 1063, rel=0.01)


@pytest.mark.parametrize(
    ("model", "part", "params"),
    [
        ("sd15", "unet", 859_520_964),
        ("sd15", "text_encoder", 123_060_480),
        ("sd21", "unet", 865_910_724),
        ("sd21", "text_encoder", 340_387_840),
        ("sdxl", "unet", 2_567_463_684),
        ("sdxl", "text_encoder", 123_060_480),
        ("sdxl", "text_encoder_2", 694_659_840),
    ],
)
def test_shipped_configs_have_the_published_parameter_counts(model, part, params):
    module = build_meta(model, part)
    assert all(p.is_meta for p in module.parameters())  # no memory spent
    assert sum(p.numel() for p in module.parameters()) == params


@pytest.mark.parametrize("dtype", list(BYTES))
def test_predicted_file_size_is_the_saved_files_size_exactly(tmp_path, dtype):
    """Tensors, header and metadata: the prediction is the byte count of what save_lora_weights writes."""
    unet, text_encoder = tiny_unet(), make_text_encoder()
    parts = {
        "unet": (unet, UNET_ATTENTION + UNET_FEED_FORWARD),
        "text_encoder": (text_encoder, TEXT_ENCODER_ATTENTION),
    }
    predicted = adapter_size(parts, rank=3, dtype=dtype, alpha=6)
    for model, targets in parts.values():
        inject_lora(model, targets, rank=3, alpha=6)
        model.to(TORCH_DTYPES[dtype])  # LoRALinear makes fp32 factors; the file stores what the model holds
    path = save_lora_weights(tmp_path, unet=unet, text_encoder=text_encoder)
    assert os.path.getsize(path) == predicted.file_bytes


@pytest.mark.parametrize("targets", [UNET_ATTENTION, UNET_CROSS_ATTENTION, UNET_FEED_FORWARD])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_parameter_count_equals_an_injected_models_trainable_count(targets, rank):
    unet = tiny_unet()
    predicted = adapter_size({"unet": (unet, targets)}, rank)
    meta = adapter_size({"unet": (build_meta(str(tiny.TINY_SD_PATH)), targets)}, rank)
    names = inject_lora(unet, targets, rank=rank)
    trainable, total = count_parameters(unet)
    assert predicted.lora_params == meta.lora_params == trainable
    assert predicted.layers == len(names)
    assert predicted.base_params == total - trainable  # the base counted before injection


def test_lora_shapes_and_the_formula():
    unet = tiny_unet()
    shapes = lora_shapes(unet, UNET_ATTENTION)
    assert shapes["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == (64, 64)  # (d_out, d_in)
    assert adapter_size({"unet": (unet, UNET_ATTENTION)}, 2).lora_params == sum(
        2 * (d_in + d_out) for d_out, d_in in shapes.values()
    )
    assert not lora_layers(unet) and all(p.requires_grad for p in unet.parameters())  # nothing was changed


def test_table_rows_and_cli(capsys):
    rows = size_table(
        ["sd15", "sdxl"], ["attention", "cross-attention"], [1, 4], ["fp32", "fp16"], text_encoder=True
    )
    assert len(rows) == 2 * 2 * 2 * 2
    sd15 = {(r["targets"], r["rank"], r["dtype"]): r for r in rows if r["model"] == "sd15"}
    # The text encoder adds 12 layers x 4 projections at 768 x 768.
    with_te = sd15[("attention + text encoder", 4, "fp32")]
    assert with_te["lora_params"] == 797_184 + 48 * 4 * (768 + 768)
    assert with_te["base_mb"] == pytest.approx((859_520_964 + 123_060_480) * 4 / 1e6)
    # fp16 halves the tensors but not the header, so the file is a little over half.
    half = sd15[("attention + text encoder", 4, "fp16")]["file_mb"] / with_te["file_mb"]
    assert 0.5 < half < 0.52
    sdxl = [r for r in rows if r["model"] == "sdxl"]
    assert {r["layers"] for r in sdxl if r["targets"].startswith("attention")} == {560 + 4 * (12 + 32)}

    main(["--models", "sd15", "--ranks", "4", "--targets", "attention"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model |") and len(table) == 3
    assert "| sd15 | attention | 4 | fp32 | 128 | 797,184 | 3.23 |" in table[2]


def test_every_model_part_builds_and_unknown_ones_are_named():
    for model, parts in MODELS.items():
        for part in parts:
            assert lora_shapes(
                build_meta(model, part), UNET_ATTENTION if part == "unet" else TEXT_ENCODER_ATTENTION
            )
    with pytest.raises(ValueError, match="unknown model 'sd3'"):
        build_meta("sd3")
    with pytest.raises(ValueError, match="no part 'text_encoder_2'"):
        build_meta("sd15", "text_encoder_2")
    with pytest.raises(ValueError, match="dtype"):
        adapter_size({"unet": (tiny_unet(), UNET_ATTENTION)}, 4, dtype="int8")


CONV_TARGETS = ["to_q", "to_v", "proj_in", "proj_out", "conv1", "conv2"]  # kohya's LoRA + LoCon


@pytest.mark.parametrize(
    "variant", [{}, {"use_dora": True}, {"use_dora": True, "use_rslora": True}], ids=["lora", "dora", "both"]
)
def test_conv_targets_and_dora_magnitudes_are_counted_to_the_byte(tmp_path, variant):
    unet = tiny_unet()
    predicted = adapter_size({"unet": (unet, CONV_TARGETS)}, rank=3, alpha=6, **variant)
    meta = adapter_size(
        {"unet": (build_meta(str(tiny.TINY_SD_PATH)), CONV_TARGETS)}, rank=3, alpha=6, **variant
    )
    names = inject_lora(unet, CONV_TARGETS, rank=3, alpha=6, **variant)
    trainable, _ = count_parameters(unet)
    assert predicted.lora_params == meta.lora_params == trainable and predicted.layers == len(names)
    path = save_lora_weights(tmp_path, unet=unet)
    assert os.path.getsize(path) == predicted.file_bytes == meta.file_bytes
    conv1 = lora_shapes(tiny_unet(), ["conv1"])["down_blocks.0.resnets.0.conv1"]
    assert len(conv1) == 4  # (c_out, c_in, 3, 3)
