import json
import re
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import make_text_encoder, make_unet, randomize_lora
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from torch import nn

from lora_nb.formats import (
    METADATA_KEY,
    WEIGHT_NAME,
    LoraAdapter,
    load_lora_state_dict,
    load_lora_weights,
    lora_config,
    lora_state_dict,
    read_lora,
    save_lora_weights,
)
from lora_nb.inject import (
    TEXT_ENCODER_ATTENTION,
    UNET_ATTENTION,
    UNET_CONV,
    UNET_FEED_FORWARD,
    inject_lora,
    lora_layers,
    set_lora_scale,
)

# Same ops on the same numbers; the slack only covers a different order of floating-point additions.
ATOL, RTOL = 1e-6, 1e-5


@torch.no_grad()
def outputs(unet, text_encoder, unet_inputs, token_ids) -> tuple[torch.Tensor, torch.Tensor]:
    return unet(*unet_inputs).sample, text_encoder(token_ids).last_hidden_state


@torch.no_grad()
def run_unet(unet, unet_inputs) -> torch.Tensor:
    return unet(*unet_inputs).sample


def trained_pair(mixed: bool = False) -> tuple[nn.Module, nn.Module]:
    """A UNet and text encoder with trained-looking LoRA, rank 4 and alpha 8 (scaling 2, not 1)."""
    unet, text_encoder = make_unet(), make_text_encoder()
    inject_lora(unet, UNET_ATTENTION, rank=4, alpha=8)
    if mixed:  # other layers at another rank and alpha: carried as rank_pattern / alpha_pattern
        inject_lora(unet, UNET_FEED_FORWARD, rank=2, alpha=1)
    inject_lora(text_encoder, TEXT_ENCODER_ATTENTION, rank=4, alpha=8)
    randomize_lora(unet, 1)
    randomize_lora(text_encoder, 2)
    return unet, text_encoder


def test_keys_shapes_and_metadata(tmp_path):
    unet, text_encoder = trained_pair()
    path = save_lora_weights(tmp_path, unet=unet, text_encoder=text_encoder)
    assert path == tmp_path / WEIGHT_NAME
    lora = read_lora(tmp_path)
    tensors, config = lora.tensors, lora.metadata
    assert (
        tensors.keys()
        == {**lora_state_dict(unet, "unet"), **lora_state_dict(text_encoder, "text_encoder")}.keys()
    )
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    assert tensors[f"{q}.lora_A.weight"].shape == (4, 32)  # A: (r, d_in)
    assert tensors[f"{q}.lora_B.weight"].shape == (32, 4)  # B: (d_out, r)
    assert "text_encoder.encoder.layers.1.self_attn.out_proj.lora_B.weight" in tensors
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8
    assert config["text_encoder.r"] == 4 and config["text_encoder.lora_alpha"] == 8
    assert len(config["unet.target_modules"]) == 32


@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed-rank-and-alpha"])
def test_diffusers_loads_our_file_to_the_same_outputs(
    tmp_path, mixed, pipeline_factory, unet_inputs, token_ids
):
    """The ecosystem contract: StableDiffusionPipeline.load_lora_weights reads what we save, alpha
    included."""
    unet, text_encoder = trained_pair(mixed)
    ours = outputs(unet, text_encoder, unet_inputs, token_ids)
    save_lora_weights(tmp_path, unet=unet, text_encoder=text_encoder)

    pipe = pipeline_factory()
    plain = outputs(pipe.unet, pipe.text_encoder, unet_inputs, token_ids)
    pipe.load_lora_weights(tmp_path)
    theirs = outputs(pipe.unet, pipe.text_encoder, unet_inputs, token_ids)
    for our, their, base in zip(ours, theirs, plain):
        assert not torch.allclose(our, base, atol=1e-3)  # the LoRA matters
        torch.testing.assert_close(their, our, atol=ATOL, rtol=RTOL)


def test_our_loader_reads_our_file_back_exactly(tmp_path, unet_inputs, token_ids):
    unet, text_encoder = trained_pair(mixed=True)
    save_lora_weights(tmp_path / "lora.safetensors", unet=unet, text_encoder=text_encoder)
    fresh_unet, fresh_text_encoder = make_unet(), make_text_encoder()
    loaded = load_lora_weights(
        tmp_path / "lora.safetensors", unet=fresh_unet, text_encoder=fresh_text_encoder
    )
    assert sorted(loaded["unet"]) == sorted(lora_layers(unet))
    assert sorted(loaded["text_encoder"]) == sorted(lora_layers(text_encoder))
    assert {n: (m.rank, m.alpha) for n, m in lora_layers(fresh_unet).items()} == {
        n: (m.rank, m.alpha) for n, m in lora_layers(unet).items()
    }
    expected = outputs(unet, text_encoder, unet_inputs, token_ids)
    got = outputs(fresh_unet, fresh_text_encoder, unet_inputs, token_ids)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    with pytest.raises(ValueError, match="already has LoRA"):
        load_lora_weights(tmp_path / "lora.safetensors", unet=fresh_unet)


def test_a_channels_last_model_saves_and_reads_back(tmp_path, unet_inputs):
    """diffusers' docs suggest ``unet.to(memory_format=torch.channels_last)`` for speed. A convolution's 4-D
    LoRA factors are then not contiguous, and safetensors refuses to save them unless they are packed."""
    unet = make_unet()
    inject_lora(unet, UNET_CONV, rank=4)
    randomize_lora(unet, 1)
    unet.to(memory_format=torch.channels_last)
    save_lora_weights(tmp_path, unet=unet)
    fresh = make_unet()
    load_lora_weights(tmp_path, unet=fresh)
    for name, layer in lora_layers(unet).items():
        loaded = lora_layers(fresh)[name]
        assert torch.equal(loaded.lora_A.weight, layer.lora_A.weight), name
        assert torch.equal(loaded.lora_B.weight, layer.lora_B.weight), name
    expected = run_unet(unet, unet_inputs)  # channels_last: another convolution algorithm, other roundings
    torch.testing.assert_close(run_unet(fresh, unet_inputs), expected, atol=1e-5, rtol=1e-4)


def test_a_file_without_metadata_means_alpha_equals_rank_here_and_in_diffusers(
    tmp_path, pipeline_factory, unet_inputs
):
    unet, _ = trained_pair()
    safetensors.torch.save_file(lora_state_dict(unet, "unet"), tmp_path / WEIGHT_NAME)  # tensors only
    set_lora_scale(unet, 0.5)  # scaling alpha/r = 8/4 = 2 becomes 1
    expected = run_unet(unet, unet_inputs)

    fresh = make_unet()
    load_lora_weights(tmp_path, unet=fresh)
    assert {m.alpha for m in lora_layers(fresh).values()} == {4}
    pipe = pipeline_factory()
    pipe.load_lora_weights(tmp_path)
    for model in (fresh, pipe.unet):
        torch.testing.assert_close(run_unet(model, unet_inputs), expected, atol=ATOL, rtol=RTOL)


def test_older_spellings_load(unet_inputs, token_ids):
    """lora.down/lora.up (older diffusers) and a `text_model.` level (CLIPTextModel before transformers 5)."""
    unet, text_encoder = trained_pair()
    old_unet = {
        k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
        for k, v in lora_state_dict(unet, "unet").items()
    }
    old_text = {
        k.replace("text_encoder.", "text_encoder.text_model.", 1): v
        for k, v in lora_state_dict(text_encoder, "text_encoder").items()
    }
    fresh_unet, fresh_text_encoder = make_unet(), make_text_encoder()
    config = {"lora_alpha": 8}
    load_lora_state_dict(fresh_unet, old_unet, prefix="unet", config=config)
    load_lora_state_dict(fresh_text_encoder, old_text, prefix="text_encoder", config=config)
    expected = outputs(unet, text_encoder, unet_inputs, token_ids)
    got = outputs(fresh_unet, fresh_text_encoder, unet_inputs, token_ids)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_diffusers_0_17_processor_spellings_load(unet_inputs, token_ids):
    """diffusers 0.17 pipelines saved "unet."/"text_encoder." + the attention processors' names."""
    unet, text_encoder = trained_pair()
    tensors = {**lora_state_dict(unet, "unet"), **lora_state_dict(text_encoder, "text_encoder")}
    processor = {
        "to_out.0": "to_out",
        "q_proj": "to_q",
        "k_proj": "to_k",
        "v_proj": "to_v",
        "out_proj": "to_out",
    }
    old = {}
    for key, tensor in tensors.items():
        parent, proj, factor = re.fullmatch(r"(.*?)\.(to_out\.0|\w+)\.lora_([AB])\.weight", key).groups()
        parent += ".processor" if key.startswith("unet.") else ""
        old[f"{parent}.{processor.get(proj, proj)}_lora.{'down' if factor == 'A' else 'up'}.weight"] = tensor
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight" in old
    assert "text_encoder.encoder.layers.0.self_attn.to_q_lora.down.weight" in old

    lora = LoraAdapter.from_state_dict(old, {"unet.lora_alpha": 8, "text_encoder.lora_alpha": 8})
    assert lora.format == "diffusers" and lora.tensors.keys() == tensors.keys()
    fresh_unet, fresh_text_encoder = make_unet(), make_text_encoder()
    load_lora_weights(lora, unet=fresh_unet, text_encoder=fresh_text_encoder)
    got = outputs(fresh_unet, fresh_text_encoder, unet_inputs, token_ids)
    assert all(torch.equal(a, b) for a, b in zip(got, outputs(unet, text_encoder, unet_inputs, token_ids)))


def test_read_lora_reports_the_layout_and_save_lora_weights_writes_it_back(tmp_path):
    unet, text_encoder = trained_pair(mixed=True)
    path = save_lora_weights(tmp_path / "a", unet=unet, text_encoder=text_encoder)
    lora = read_lora(tmp_path / "a")
    assert (lora.format, lora.path) == ("diffusers", path)
    direct = read_lora(path)  # the file itself, not its folder
    assert direct.metadata == lora.metadata and direct.tensors.keys() == lora.tensors.keys()
    again = read_lora(save_lora_weights(tmp_path / "b.safetensors", adapter=lora))
    assert again.metadata == lora.metadata and again.tensors.keys() == lora.tensors.keys()
    assert all(torch.equal(again.tensors[k], v) for k, v in lora.tensors.items())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not lora_layers(model)


def test_an_adapter_for_another_model_is_refused_naming_the_first_bad_key(tmp_path):
    # A UNet whose cross-attention reads 16 features, not 32: attn2.to_k/to_v's A is (4, 16) there,
    # (4, 32) here.
    source = UNet2DConditionModel.from_config({**make_unet().config, "cross_attention_dim": 16})
    inject_lora(source, UNET_ATTENTION, rank=4)
    save_lora_weights(tmp_path, unet=source)
    first_bad = next(
        k for k in read_lora(tmp_path).tensors if ".attn2.to_k.lora_A" in k or ".attn2.to_v.lora_A" in k
    )

    unet = make_unet()
    before = snapshot(unet)
    with pytest.raises(ValueError) as error:
        load_lora_weights(tmp_path, unet=unet)
    assert str(error.value).startswith(f"{first_bad}: ")
    assert "(4, 32)" in str(error.value) and "(4, 16)" in str(error.value)  # expected, found
    # attn2.to_k and .to_v in 4 attention blocks: all counted, the first 5 named
    assert str(error.value).endswith("... and 3 more\n8 LoRA keys cannot be placed; nothing was applied")
    assert_untouched(unet, before)


Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
Z = "unet.down_blocks.0.attentions.0.to_z"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {f"{Z}.lora_A.weight": torch.zeros(4, 32), f"{Z}.lora_B.weight": torch.zeros(32, 4)},
            f"'{Z[5:]}' is not",
        ),
        ({f"{K}.alpha": torch.tensor(8.0)}, r"to_k\.alpha: not a LoRA factor"),  # diffusers refuses these too
        ({f"{K}.lora_A.weight": torch.zeros(4, 32)}, r"to_k\.lora_A\.weight: no lora_B"),
    ],
    ids=["unknown-module", "stray-key", "missing-partner"],
)
def test_unknown_modules_stray_keys_and_missing_partners_are_refused(extra, message):
    unet = make_unet()
    before = snapshot(unet)
    state = {f"{Q}.lora_A.weight": torch.zeros(4, 32), f"{Q}.lora_B.weight": torch.zeros(32, 4), **extra}
    with pytest.raises(ValueError, match=message):
        load_lora_state_dict(unet, state, prefix="unet")
    assert_untouched(unet, before)


def test_loading_two_models_is_all_or_nothing(tmp_path):
    unet, text_encoder = trained_pair()
    tensors = {**lora_state_dict(unet, "unet"), **lora_state_dict(text_encoder, "text_encoder")}
    key = "text_encoder.encoder.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(31, 4)
    safetensors.torch.save_file(tensors, tmp_path / WEIGHT_NAME)
    fresh_unet, fresh_text_encoder = make_unet(), make_text_encoder()
    before = snapshot(fresh_unet), snapshot(fresh_text_encoder)
    with pytest.raises(ValueError, match=rf"^{key}: .*\(32, 4\).*\(31, 4\)"):
        load_lora_weights(tmp_path, unet=fresh_unet, text_encoder=fresh_text_encoder)
    assert_untouched(fresh_unet, before[0])  # checked fine, but not loaded: the text encoder part was bad
    assert_untouched(fresh_text_encoder, before[1])


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.safetensors")):
        load_lora_weights(tmp_path / "nope.safetensors", unet=make_unet())
    with pytest.raises(FileNotFoundError, match=str(tmp_path / WEIGHT_NAME)):
        load_lora_weights(tmp_path, unet=make_unet())  # a directory without the file


def test_saving_is_atomic(tmp_path, monkeypatch):
    unet, _ = trained_pair()
    path = save_lora_weights(tmp_path, unet=unet)
    good = path.read_bytes()

    real_write = Path.write_bytes

    def crash(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(OSError, match="disk full"):
        save_lora_weights(tmp_path, unet=unet)
    assert path.read_bytes() == good  # the previous file survives, untouched
    assert [p.name for p in tmp_path.iterdir()] == [WEIGHT_NAME]  # no temp file left behind
    with pytest.raises(OSError, match="disk full"):
        save_lora_weights(tmp_path / "new", unet=unet)
    assert list((tmp_path / "new").iterdir()) == []


def test_metadata_is_what_diffusers_writes(tmp_path):
    """Our header matches the one StableDiffusionPipeline.save_lora_weights writes from the same config."""
    unet, _ = trained_pair(mixed=True)
    ours = save_lora_weights(tmp_path / "ours", unet=unet)
    layers = {k.removeprefix("unet."): v for k, v in lora_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "theirs", unet_lora_layers=layers, unet_lora_adapter_metadata=lora_config(unet)
    )
    headers = []
    for path in (ours, tmp_path / "theirs" / WEIGHT_NAME):
        with safetensors.safe_open(path, framework="pt") as f:
            headers.append(json.loads(f.metadata()[METADATA_KEY]))
    assert headers[0] == headers[1]
    assert headers[0]["unet.alpha_pattern"]["^mid_block.attentions.0.transformer_blocks.0.ff.net.2"] == 1
