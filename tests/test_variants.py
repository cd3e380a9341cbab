"""Beyond plain LoRA: convolution LoRA (kohya's 1x1 proj_in/proj_out, LoCon's 3x3 resnet convs), rsLoRA and
DoRA. Each is checked against peft's own layer given the same factors, and against diffusers'
``load_lora_weights`` reading the file (ours, or kohya's)."""

import json
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import make_unet, randomize_lora
from peft import LoraConfig, inject_adapter_in_model
from test_convert import as_kohya
from test_formats import ATOL, RTOL, assert_untouched, run_unet, snapshot
from torch import nn

from lora_nb.formats import LoraAdapter, export_kohya, load_lora_weights, read_lora, save_lora_weights
from lora_nb.inject import UNET_ATTENTION, inject_lora, lora_layers, merge_lora, unmerge_lora
from lora_nb.layers import LoRAConv2d, LoRALinear

TRANSFORMER_CONVS = ["proj_in", "proj_out"]  # 1x1 in SD 1.5 (use_linear_projection: false), kohya's default
RESNET_CONVS = ["conv1", "conv2"]  # 3x3: LoCon's


def make_conv(kernel: int = 3, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(6, 10, kernel, stride, padding)


def trained(layer, seed: int = 1):
    torch.manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.weight.normal_(std=0.3)
        layer.lora_B.weight.normal_(std=0.3)
    return layer


CONVS = [(1, 1, 0), (3, 1, 1), (3, 2, 1)]  # (kernel, stride, padding): proj_in, resnet conv1, downsampler


@pytest.mark.parametrize(("kernel", "stride", "padding"), CONVS)
def test_conv_lora_is_the_base_plus_the_convolution_with_weight_BA(kernel, stride, padding):
    layer = LoRAConv2d(make_conv(kernel, stride, padding), rank=3, alpha=6)
    x = torch.randn(2, 6, 9, 9)
    torch.testing.assert_close(layer(x), layer.base(x), atol=0, rtol=0)  # B = 0: a fresh layer is the base
    trained(layer)
    assert layer.lora_A.weight.shape == (3, 6, kernel, kernel) and layer.lora_B.weight.shape == (10, 3, 1, 1)
    ba = torch.einsum("or,rikl->oikl", layer.lora_B.weight[:, :, 0, 0], layer.lora_A.weight)
    expected = layer.base(x) + 2.0 * nn.functional.conv2d(x, ba, stride=stride, padding=padding)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.scale = 0.0
    assert torch.equal(layer(x), layer.base(x))


@pytest.mark.parametrize(("kernel", "stride", "padding"), CONVS)
def test_conv_merge_matches_and_unmerge_restores_bit_for_bit(kernel, stride, padding):
    layer = trained(LoRAConv2d(make_conv(kernel, stride, padding), rank=2, alpha=1))
    original = layer.base.weight.detach().clone()
    x = torch.randn(2, 6, 8, 8)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base.weight, original)


@pytest.mark.parametrize(("kernel", "stride", "padding"), CONVS)
def test_conv_lora_equals_peft_conv2d_lora_given_the_same_factors(kernel, stride, padding):
    ours = trained(LoRAConv2d(make_conv(kernel, stride, padding), rank=3, alpha=5))
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["conv"])
    theirs = inject_adapter_in_model(config, nn.ModuleDict({"conv": make_conv(kernel, stride, padding)}))[
        "conv"
    ]
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
    x = torch.randn(2, 6, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.delta_weight(), theirs.get_delta_weight("default"), atol=1e-6, rtol=1e-6)


def test_conv_factors_stay_fp32_and_grouped_convolutions_are_refused():
    layer = LoRAConv2d(make_conv().to(torch.bfloat16), rank=2)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    assert layer(torch.randn(1, 6, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="groups=2"):
        LoRAConv2d(nn.Conv2d(6, 10, 3, groups=2), rank=2)


def locon_unet() -> nn.Module:
    """kohya's default LoRA (attention + 1x1 proj_in/proj_out) plus LoCon's 3x3 resnet convolutions, at
    rank 4 / alpha 8 on attention and rank 2 / alpha 1 on the convolutions (so alphas matter)."""
    unet = make_unet()
    inject_lora(unet, UNET_ATTENTION, rank=4, alpha=8)
    inject_lora(unet, TRANSFORMER_CONVS + RESNET_CONVS, rank=2, alpha=1)
    randomize_lora(unet, 5)
    return unet


def test_the_tiny_unets_have_sd15s_1x1_convolution_projections(unet):
    from lora_nb.course.tiny import TINY_SD_PATH

    shipped = json.loads((Path(TINY_SD_PATH) / "unet" / "config.json").read_text())
    assert shipped["use_linear_projection"] is False and unet.config.use_linear_projection is False
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, nn.Conv2d)
    kinds = {type(m).__name__ for m in lora_layers(locon_unet()).values()}
    assert kinds == {"LoRALinear", "LoRAConv2d"}


def test_a_kohya_locon_file_loads_here_as_in_diffusers(tmp_path, pipeline_factory, unet_inputs):
    """The issue's gap: kohya's default SD 1.5 LoRA (1x1 proj_in/proj_out) and LoCon (3x3 resnet convs),
    4-D lora_down/lora_up and alphas, read by lora_nb and by pipe.load_lora_weights: the same UNet output."""
    source = locon_unet()
    kohya = as_kohya(source)
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert kohya[f"{conv1}.lora_down.weight"].shape == (2, 32, 3, 3)
    safetensors.torch.save_file(kohya, tmp_path / "locon.safetensors")

    ours = make_unet()
    loaded = load_lora_weights(tmp_path / "locon.safetensors", unet=ours)
    assert len(loaded["unet"]) == len(lora_layers(source))
    pipe = pipeline_factory()
    base = run_unet(pipe.unet, unet_inputs)
    pipe.load_lora_weights(tmp_path / "locon.safetensors")
    theirs = run_unet(pipe.unet, unet_inputs)
    assert not torch.allclose(theirs, base, atol=1e-3)
    torch.testing.assert_close(run_unet(ours, unet_inputs), theirs, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(run_unet(ours, unet_inputs), run_unet(source, unet_inputs), atol=0, rtol=0)


def test_diffusers_loads_our_conv_file_and_our_kohya_export_alike(tmp_path, pipeline_factory, unet_inputs):
    source = locon_unet()
    want = run_unet(source, unet_inputs)
    save_lora_weights(tmp_path / "ours", unet=source)
    export_kohya(tmp_path / "ours", tmp_path / "kohya")
    back = read_lora(tmp_path / "kohya")
    original = read_lora(tmp_path / "ours")
    assert back.format == "kohya" and back.metadata == original.metadata
    assert all(torch.equal(back.tensors[k], v) for k, v in original.tensors.items())
    for folder in ("ours", "kohya"):
        pipe = pipeline_factory()
        pipe.load_lora_weights(tmp_path / folder)
        torch.testing.assert_close(run_unet(pipe.unet, unet_inputs), want, atol=ATOL, rtol=RTOL)


def test_merging_a_locon_unet_matches_and_unmerges_exactly(unet_inputs):
    unet = locon_unet()
    before = run_unet(unet, unet_inputs)
    weights = {name: layer.base.weight.clone() for name, layer in lora_layers(unet).items()}
    merge_lora(unet)
    torch.testing.assert_close(run_unet(unet, unet_inputs), before, atol=1e-5, rtol=1e-5)
    unmerge_lora(unet)
    assert all(torch.equal(layer.base.weight, weights[n]) for n, layer in lora_layers(unet).items())


def test_a_conv_factor_of_the_wrong_kernel_is_refused_naming_its_key(tmp_path):
    kohya = as_kohya(locon_unet())
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    kohya[f"{conv1}.lora_down.weight"] = kohya[f"{conv1}.lora_down.weight"][:, :, :1, :1].contiguous()
    key = re.escape("unet.down_blocks.0.resnets.0.conv1.lora_A.weight: down_blocks.0.resnets.0.conv1")
    why = re.escape("needs shape (2, 32, 3, 3) (from the model), the file has (2, 32, 1, 1)")
    fresh = make_unet()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=f"{key} {why}"):
        load_lora_weights(LoraAdapter.from_state_dict(kohya), unet=fresh)
    assert_untouched(fresh, before)


# rsLoRA and DoRA, on a Linear and on both kinds of Conv2d.
VARIANTS = [{"use_rslora": True}, {"use_dora": True}, {"use_rslora": True, "use_dora": True}]
VARIANT_IDS = ["rslora", "dora", "rslora+dora"]


KINDS = {"linear": None, "conv1x1": (1, 1, 0), "conv3x3": (3, 1, 1)}  # conv: (kernel, stride, padding)


def make_base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(6, 10) if kind == "linear" else make_conv(*KINDS[kind])


def lora_class_of(kind: str) -> type:
    return LoRALinear if kind == "linear" else LoRAConv2d


def make_input(kind: str) -> torch.Tensor:
    return torch.randn(2, 5, 6) if kind == "linear" else torch.randn(2, 6, 7, 7)


def trained_variant(layer, seed: int = 1):
    """Factors as after training, and for DoRA a magnitude moved off ||W||."""
    trained(layer, seed)
    if layer.use_dora:
        with torch.no_grad():
            layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn_like(layer.lora_magnitude_vector))
    return layer


def peft_twin(ours, kind: str, variant: dict) -> nn.Module:
    """peft's LoRA layer on an identical base, holding our factors (and magnitude)."""
    config = LoraConfig(r=ours.rank, lora_alpha=ours.alpha, target_modules=["layer"], **variant)
    theirs = inject_adapter_in_model(config, nn.ModuleDict({"layer": make_base(kind)}))["layer"]
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A.weight)
        theirs.lora_B["default"].weight.copy_(ours.lora_B.weight)
        if ours.use_dora:
            theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector)
    return theirs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_variants_equal_peft_given_the_same_factors_and_merge_as_peft_does(kind, variant):
    ours = lora_class_of(kind)(make_base(kind), rank=4, alpha=3, **variant)
    x = make_input(kind)
    assert torch.equal(ours(x), ours.base(x))  # fresh: B = 0 and, for DoRA, m = ||W||
    trained_variant(ours)
    theirs = peft_twin(ours, kind, variant).eval()
    assert ours.scaling == pytest.approx(theirs.scaling["default"])
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    unmerged = ours(x)
    original = ours.base.weight.detach().clone()
    ours.merge()
    theirs.merge()
    torch.testing.assert_close(ours.base.weight, theirs.base_layer.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours(x), unmerged, atol=1e-5, rtol=1e-5)
    ours.unmerge()
    assert torch.equal(ours.base.weight, original)


def test_rslora_scales_by_alpha_over_the_square_root_of_the_rank():
    assert lora_class_of("linear")(make_base("linear"), rank=16, alpha=8, use_rslora=True).scaling == 2.0
    assert lora_class_of("linear")(make_base("linear"), rank=16, alpha=8).scaling == 0.5


def test_dora_at_scale_zero_is_not_the_base_until_the_magnitude_is_reset():
    """scale multiplies B A only: at 0 the weight is m * W / ||W||, the base only while m = ||W||."""
    layer = trained_variant(lora_class_of("linear")(make_base("linear"), rank=4, use_dora=True))
    x = make_input("linear")
    layer.scale = 0.0
    assert not torch.allclose(layer(x), layer.base(x), atol=1e-3)
    w = layer.base.weight
    factor = layer.lora_magnitude_vector / w.norm(dim=1)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, factor[:, None] * w, layer.base.bias))
    layer.reset_magnitude()
    assert torch.equal(layer(x), layer.base(x))


FILE_TARGETS = [*UNET_ATTENTION, *TRANSFORMER_CONVS, *RESNET_CONVS]


def randomize_variant(unet, seed: int) -> None:
    """Trained-looking factors; DoRA magnitudes moved off ||W|| (a random one near 0 would be no DoRA)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
            elif "lora_" in name:
                p.normal_(std=0.1)


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_a_peft_adapter_with_the_variant_loads_here_to_peft_s_outputs(tmp_path, variant, unet_inputs):
    """peft's own writer (PeftModel.save_pretrained): adapter_config.json with use_rslora / use_dora, the
    magnitudes as lora_magnitude_vector, attention and convolutions."""
    from peft import get_peft_model

    peft_unet = make_unet()
    model = get_peft_model(peft_unet, LoraConfig(r=4, lora_alpha=3, target_modules=FILE_TARGETS, **variant))
    randomize_variant(model, 6)
    model.save_pretrained(tmp_path)
    lora = read_lora(tmp_path)
    assert lora.format == "peft" and all(lora.metadata[f"unet.{key}"] for key in variant)
    fresh = make_unet()
    load_lora_weights(lora, unet=fresh)
    assert {(m.use_rslora, m.use_dora) for m in lora_layers(fresh).values()} == {
        (variant.get("use_rslora", False), variant.get("use_dora", False))
    }
    want = run_unet(peft_unet, unet_inputs)
    assert not torch.allclose(want, run_unet(make_unet(), unet_inputs), atol=1e-3)
    torch.testing.assert_close(run_unet(fresh, unet_inputs), want, atol=ATOL, rtol=RTOL)


def variant_unet(variant: dict, seed: int = 7) -> nn.Module:
    unet = make_unet()
    inject_lora(unet, FILE_TARGETS, rank=4, alpha=3, **variant)
    randomize_variant(unet, seed)
    return unet


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
def test_diffusers_loads_our_variant_file_to_the_same_outputs(
    tmp_path, variant, pipeline_factory, unet_inputs
):
    source = variant_unet(variant)
    want = run_unet(source, unet_inputs)
    path = save_lora_weights(tmp_path, unet=source)
    assert all(read_lora(path).metadata[f"unet.{key}"] for key in variant)
    pipe = pipeline_factory()
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(run_unet(pipe.unet, unet_inputs), want, atol=ATOL, rtol=RTOL)
    fresh = make_unet()
    load_lora_weights(tmp_path, unet=fresh)
    assert torch.equal(run_unet(fresh, unet_inputs), want)


def kohya_dora() -> tuple[nn.Module, dict]:
    """A DoRA UNet and its kohya/LyCORIS file: dora_scale beside lora_down/lora_up, (d_out, 1) for a Linear
    as LyCORIS writes it."""
    source = variant_unet({"use_dora": True}, seed=8)
    kohya = as_kohya(source)
    for path, layer in lora_layers(source).items():
        m = layer.lora_magnitude_vector.detach()
        kohya[f"lora_unet_{path.replace('.', '_')}.dora_scale"] = m.reshape(-1, 1) if m.dim() == 1 else m
    return source, kohya


def test_a_kohya_dora_file_loads_and_exports_back(tmp_path, unet_inputs):
    source, kohya = kohya_dora()
    lora = LoraAdapter.from_state_dict(kohya)
    assert lora.format == "kohya" and lora.metadata["unet.use_dora"] is True
    fresh = make_unet()
    load_lora_weights(lora, unet=fresh)
    want = run_unet(source, unet_inputs)
    torch.testing.assert_close(run_unet(fresh, unet_inputs), want, atol=0, rtol=0)
    back = LoraAdapter.from_state_dict(safetensors.torch.load_file(export_kohya(lora, tmp_path / "k")))
    assert back.metadata == lora.metadata
    assert all(torch.equal(back.tensors[k], v) for k, v in lora.tensors.items())


@pytest.mark.xfail(
    strict=True,
    reason="diffusers 0.42's StableDiffusionLoraLoaderMixin.lora_state_dict drops every dora_scale key "
    "('a DoRA checkpoint that is not compatible in Diffusers'), so an SD 1.5 kohya DoRA file loads as plain "
    "LoRA; our own layout (lora_magnitude_vector) does load, tested above",
)
def test_diffusers_loads_a_kohya_dora_file_for_sd15(pipeline_factory, unet_inputs):
    source, kohya = kohya_dora()
    pipe = pipeline_factory()
    pipe.load_lora_weights(kohya)
    torch.testing.assert_close(
        run_unet(pipe.unet, unet_inputs), run_unet(source, unet_inputs), atol=ATOL, rtol=RTOL
    )


def test_an_rslora_kohya_export_carries_the_equivalent_alpha(tmp_path, pipeline_factory, unet_inputs):
    """kohya has no rsLoRA: the export's alpha is alpha * sqrt(r), the same scaling; diffusers agrees."""
    source = variant_unet({"use_rslora": True})
    export_kohya(LoraAdapter.from_models(unet=source), tmp_path / "kohya")
    kohya = safetensors.torch.load_file(tmp_path / "kohya" / "pytorch_lora_weights.safetensors")
    assert kohya["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 6.0  # 3 * sqrt(4)
    pipe = pipeline_factory()
    pipe.load_lora_weights(tmp_path / "kohya")
    torch.testing.assert_close(
        run_unet(pipe.unet, unet_inputs), run_unet(source, unet_inputs), atol=ATOL, rtol=RTOL
    )


def test_bad_dora_magnitudes_are_refused_naming_the_key():
    _, kohya = kohya_dora()
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    kohya[f"{name}.dora_scale"] = torch.ones(5)
    with pytest.raises(ValueError, match=rf"{name}\.dora_scale: needs 32 numbers"):
        LoraAdapter.from_state_dict(kohya)
    source = variant_unet({"use_dora": True})
    tensors = LoraAdapter.from_models(unet=source).tensors
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    del tensors[f"{q}.lora_magnitude_vector"]
    fresh = make_unet()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=rf"{q}\.lora_A\.weight: the metadata says use_dora, but"):
        load_lora_weights(LoraAdapter(tensors, {"unet.use_dora": True}), unet=fresh)
    assert_untouched(fresh, before)


def test_mixing_refuses_dora_layers():
    from lora_nb.mix import mix_loras

    lora = LoraAdapter.from_models(unet=variant_unet({"use_dora": True}))
    with pytest.raises(ValueError, match="a DoRA layer; its update is not B A alone"):
        mix_loras([lora, lora], [0.5, 0.5])
