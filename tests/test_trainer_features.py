"""The trainer's newer flags: DoRA and rsLoRA layers, LoRA+ and a text-encoder learning rate, caption
dropout under caching, aspect-ratio buckets. Short CPU runs on the embedded tiny model."""

import importlib
import json
import math
import os
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from test_train import CREATURES
from test_train import small as train_small

from lora_nb.course.tiny import TINY_SD_PATH
from lora_nb.formats import METADATA_KEY
from lora_nb.inject import lora_layers
from lora_nb.train import TrainConfig, train

train_module = importlib.import_module("lora_nb.train")  # the module; lora_nb.train is the function


def small(tmp_path, **overrides) -> TrainConfig:
    """test_train's short run, shorter (2 steps) and at a learning rate that moves the factors visibly."""
    return train_small(tmp_path, **{"max_train_steps": 2, "learning_rate": 1e-2, **overrides})


@pytest.fixture
def rates(monkeypatch) -> list[list[float]]:
    """Every optimiser step's learning rates, one per parameter group."""
    seen = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return seen


def unet_output(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, 10, text).sample


# ---------------------------------------------------------------- 1. DoRA and rsLoRA


def test_dora_and_rslora_train_save_and_load_back_in_both_loaders(tmp_path):
    from diffusers import StableDiffusionPipeline

    from lora_nb import load_lora_pipeline

    result = train(small(tmp_path, use_dora=True, use_rslora=True, rank=4, lora_alpha=8))
    layers = lora_layers(result.unet)
    assert layers and all(m.use_dora and m.use_rslora and m.scaling == 8 / 2 for m in layers.values())
    with safetensors.safe_open(result.lora_path, framework="pt") as f:
        metadata = json.loads(f.metadata()[METADATA_KEY])
        assert any(k.endswith("lora_magnitude_vector") for k in f.keys())  # noqa: SIM118
    assert metadata["unet.use_dora"] is True and metadata["unet.use_rslora"] is True

    trained = unet_output(result.unet.eval())
    # The magnitudes trained too: they no longer equal the base weight's norms they started from.
    assert any(not torch.equal(m.lora_magnitude_vector, m.weight_norm(0.0)) for m in layers.values())
    ours = load_lora_pipeline(result.output_dir)
    theirs = StableDiffusionPipeline.from_pretrained(TINY_SD_PATH)
    theirs.load_lora_weights(result.output_dir)
    for pipe in (ours, theirs):
        assert torch.allclose(unet_output(pipe.unet), trained, atol=1e-5)


# ---------------------------------------------------------------- 2. LoRA+ and the text encoder's rate


def names_in(model, group: dict) -> set[str]:
    return {name for name, p in model.named_parameters() if any(p is q for q in group["params"])}


def test_loraplus_puts_b_and_magnitudes_at_ratio_times_their_models_rate(unet, text_encoder):
    from lora_nb.inject import inject_lora, lora_parameters

    inject_lora(unet, ["to_q", "to_v"], 2, use_dora=True)
    inject_lora(text_encoder, ["q_proj"], 2)
    components = train_module.Components(None, text_encoder, None, unet, None)
    config = small(Path("unused"), train_text_encoder=True, loraplus_lr_ratio=16, text_encoder_lr=1e-3)
    params = lora_parameters(unet) + lora_parameters(text_encoder)
    groups = train_module.parameter_groups(config, components, params, lr_factor=2)
    assert [g["lr"] for g in groups] == [2e-2, 2e-2 * 16, 2e-3, 2e-3 * 16]
    kinds = [
        {name.split(".")[-2] if name.endswith(".weight") else name.split(".")[-1] for name in names_in(m, g)}
        for m, g in zip([unet, unet, text_encoder, text_encoder], groups)
    ]
    assert kinds == [{"lora_A"}, {"lora_B", "lora_magnitude_vector"}, {"lora_A"}, {"lora_B"}]
    assert sum(len(g["params"]) for g in groups) == len(params)  # each parameter in exactly one group

    plain = train_module.parameter_groups(small(Path("unused")), components, params)
    assert len(plain) == 1 and plain[0]["params"] is params and plain[0]["lr"] == 1e-2


def test_the_schedule_scales_every_group_alike(tmp_path, rates):
    config = small(
        tmp_path,
        max_train_steps=3,
        lr_scheduler="linear",
        lr_warmup_steps=1,
        train_text_encoder=True,
        loraplus_lr_ratio=4,
        text_encoder_lr=1e-3,
    )
    result = train(config)
    assert len(rates) == 3 and len(rates[0]) == 4
    assert [lrs[0] for lrs in rates] == pytest.approx([0.0, 1e-2, 5e-3])  # warm-up, then linear
    for lrs in rates:
        assert lrs == pytest.approx([lrs[0], 4 * lrs[0], lrs[0] / 10, 4 * lrs[0] / 10])
    assert result.lrs == [lrs[0] for lrs in rates][1:] + [0.0]


# ---------------------------------------------------------------- 3. caption dropout


def creatures(rate: float):
    from lora_nb.data import CaptionedImages, ImageTransform, load_captioned_dataset

    dataset = load_captioned_dataset(CREATURES, local=True).select(range(8))
    return CaptionedImages(dataset["image"], dataset["text"], ImageTransform(32), 0, caption_dropout=rate)


def test_cached_captions_drop_to_the_cached_empty_embedding_at_the_rate():
    from lora_nb.data import tokenize

    components = train_module.load_components(str(TINY_SD_PATH), torch.float32, "cpu")
    cached, plain = creatures(0.5), creatures(0.5)
    cached.cache(components, latents=False, text=True, device="cpu")
    with torch.no_grad():
        empty = components.text_encoder(tokenize(components.tokenizer, [""]))[0][0]
    dropped = []
    for epoch in range(5):
        cached.epoch = plain.epoch = epoch
        for i in range(len(cached)):
            text = cached[i][0]["text_embedding"]
            drop = torch.equal(text, empty)
            assert drop or torch.equal(text, cached.text_embeddings[i])
            assert plain[i][0]["caption"] == ("" if drop else plain.captions[i])  # the same draws uncached
            dropped.append(drop)
    assert 10 <= sum(dropped) <= 30  # 40 draws at p = 0.5
    never = creatures(0.0)
    assert all(never[i][0]["caption"] == never.captions[i] for i in range(len(never)))


def test_dropout_keeps_the_text_cache_and_a_trained_text_encoder_tokenises_empty_captions(
    tmp_path, monkeypatch
):
    seen = []
    real_tokenize = train_module.tokenize

    def spy(tokenizer, captions):
        seen.extend(captions)
        return real_tokenize(tokenizer, captions)

    monkeypatch.setattr(train_module, "tokenize", spy)
    train(small(tmp_path / "frozen", caption_dropout_rate=0.5, max_train_steps=4))
    assert seen == []  # the text encoder is frozen: every step read the cache
    train(small(tmp_path / "trained", train_text_encoder=True, caption_dropout_rate=0.5, max_train_steps=4))
    assert len(seen) == 8 and 0 < seen.count("") < 8


def test_resume_with_caption_dropout_and_loraplus_gives_the_uninterrupted_adapter(tmp_path):
    from lora_nb.formats import read_lora

    settings = {
        "max_train_steps": 6,
        "checkpointing_steps": 3,
        "caption_dropout_rate": 0.3,
        "loraplus_lr_ratio": 4,
        "random_flip": True,
    }
    full = train(small(tmp_path / "a", **settings))
    resumed = train(
        small(tmp_path / "b", resume_from_checkpoint=str(full.output_dir / "checkpoint-3"), **settings)
    )
    a, b = read_lora(full.lora_path).tensors, read_lora(resumed.lora_path).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == full.losses


# ---------------------------------------------------------------- 4. aspect-ratio buckets

SHAPES = {(48, 32): "wide", (32, 48): "tall", (40, 40): "square"}  # drawn size: what the captions say


@pytest.fixture
def non_square(tmp_path) -> Path:
    """12 images, 4 each of 48x32, 32x48 and 40x40, with captions, as an imagefolder."""
    from PIL import Image, ImageDraw

    folder = tmp_path / "non-square"
    folder.mkdir()
    lines = []
    for i in range(12):
        size = list(SHAPES)[i % 3]
        image = Image.new("RGB", size, (40 * i % 256, 90, 200 - 10 * i))
        ImageDraw.Draw(image).ellipse((4, 4, size[0] - 4, size[1] - 4), fill=(250, 200, 0))
        image.save(folder / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"a {SHAPES[size]} yellow blob"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_buckets_have_the_area_and_divisibility_they_need():
    from lora_nb.data import bucket_sizes, nearest_bucket

    assert train_module.bucket_multiple(str(TINY_SD_PATH)) == 16  # VAE x4, UNet x4
    assert bucket_sizes(32, 8) == [(24, 40), (32, 32), (40, 24)]
    sd15 = bucket_sizes(512, 64)
    assert (512, 512) in sd15 and all(w % 64 == h % 64 == 0 and w * h <= 512**2 for w, h in sd15)
    assert all(w * h > 0.8 * 512**2 and 1 / 2 <= w / h <= 2 for w, h in sd15)
    assert [nearest_bucket(w, h, bucket_sizes(32, 8)) for w, h in SHAPES] == [(40, 24), (24, 40), (32, 32)]


@pytest.fixture
def latent_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """The shape of every batch of latents the trainer's loss sees, in order."""
    shapes = []
    real_loss = train_module.denoising_loss

    def spy(unet, scheduler, latents, *args, **kwargs):
        shapes.append(tuple(latents.shape))
        return real_loss(unet, scheduler, latents, *args, **kwargs)

    monkeypatch.setattr(train_module, "denoising_loss", spy)
    return shapes


def test_bucketed_training_batches_one_bucket_at_a_time_and_repeats(tmp_path, latent_shapes, non_square):
    shapes = latent_shapes
    settings = {"train_data_dir": str(non_square), "max_train_samples": None, "max_train_steps": 6}
    settings["aspect_ratio_buckets"] = True
    first = train(small(tmp_path / "a", **settings))  # 6 batches of 2: one epoch, each bucket twice
    assert sorted(shapes) == [(2, 4, 12, 20)] * 2 + [(2, 4, 16, 16)] * 2 + [(2, 4, 20, 12)] * 2
    again = train(small(tmp_path / "b", **settings))
    assert again.losses == first.losses and shapes[6:] == shapes[:6]  # the same order, from the seed
    uncached = train(small(tmp_path / "c", center_crop=False, random_flip=True, **settings))
    assert sorted(shapes[12:]) == sorted(shapes[:6]) and all(map(math.isfinite, uncached.losses))


def test_bucket_batches_shuffle_per_epoch_and_shard_whole_batches(non_square):
    from accelerate.data_loader import BatchSamplerShard

    from lora_nb.data import BucketBatches

    class Epoch:
        epoch = 0

    sizes = [list(SHAPES)[i % 3] for i in range(10)] + [(48, 32)]  # buckets of 5, 3 and 3 examples
    batches = BucketBatches(Epoch, sizes, batch_size=2, seed=0, num_processes=2)
    epoch0 = list(batches)
    assert len(epoch0) == len(batches) == 8  # 3 + 2 + 2 batches, made a multiple of 2 processes
    assert all(len(b) == 2 and len({sizes[i] for i in b}) == 1 for b in epoch0)
    assert {i for b in epoch0 for i in b} == set(range(11))  # every example, in whole one-bucket batches
    assert list(batches) == epoch0
    Epoch.epoch = 1
    epoch1 = list(batches)
    assert epoch1 != epoch0 and {i for b in epoch1 for i in b} == set(range(11))  # reshuffled
    shards = [list(BatchSamplerShard(batches, 2, rank)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 4
    assert shards[0] + shards[1] == epoch1[0::2] + epoch1[1::2]  # each process whole batches, none lost


# ---------------------------------------------------------------- 5. DreamBooth


def dreambooth_config(tmp_path, **overrides):
    from lora_nb.dreambooth import DreamBoothConfig

    settings = {
        "pretrained_model_name_or_path": str(TINY_SD_PATH),
        "instance_data_dir": str(TINY_SD_PATH.parent / "subject"),
        "instance_prompt": "a photo of <sks> star",
        "center_crop": True,
        "train_batch_size": 2,
        "max_train_steps": 2,
        "learning_rate": 1e-3,
        "seed": 0,
        "output_dir": str(tmp_path / "out"),
        "show_progress": False,
        "checkpointing_steps": 0,
    }
    return DreamBoothConfig(**{**settings, **overrides})


def test_dreambooth_takes_dora_rslora_loraplus_and_a_text_encoder_rate(tmp_path, rates):
    from lora_nb.dreambooth import dreambooth

    flags = {"use_dora": True, "use_rslora": True, "loraplus_lr_ratio": 8, "text_encoder_lr": 1e-4}
    result = dreambooth(
        dreambooth_config(
            tmp_path,
            train_text_encoder=True,
            pivotal=True,
            placeholder_token="<sks>",
            initializer_token="star",
            ti_steps=2,
            **flags,
        )
    )
    assert rates[:2] == [[5e-3], [5e-3]]  # the pivot: the word's embedding alone, at --ti_learning_rate
    assert rates[2] == pytest.approx([1e-3, 8e-3, 1e-4, 8e-4])
    for model in (result.unet, result.text_encoder):
        assert all(m.use_dora and m.use_rslora for m in lora_layers(model).values())


@pytest.mark.parametrize("flag", [{"aspect_ratio_buckets": True}, {"caption_dropout_rate": 0.1}])
def test_dreambooth_refuses_the_loaded_data_flags_before_anything_is_written(tmp_path, flag):
    from lora_nb.dreambooth import dreambooth

    config = dreambooth_config(tmp_path, **flag)
    with pytest.raises(ValueError, match=f"--{next(iter(flag))} applies to the data set lora_nb.train"):
        dreambooth(config)
    assert not Path(config.output_dir).exists()


BUCKETED_TWO_PROCESS_SCRIPT = """
import sys, safetensors.torch
from accelerate import PartialState
from lora_nb.formats import lora_state_dict
from lora_nb.course.tiny import TINY_SD_PATH
from lora_nb.train import TrainConfig, train
result = train(TrainConfig(str(TINY_SD_PATH), train_data_dir=sys.argv[1], output_dir=sys.argv[2],
                           aspect_ratio_buckets=True, center_crop=True, train_batch_size=2, max_train_steps=4,
                           learning_rate=1e-3, seed=0, show_progress=False, checkpointing_steps=0))
rank = PartialState().process_index
tensors = {k: v.contiguous() for k, v in lora_state_dict(result.unet).items()}
safetensors.torch.save_file(tensors, f"{sys.argv[2]}/rank{rank}.safetensors")
"""


def test_two_processes_train_on_whole_bucket_batches_in_step(tmp_path, non_square):
    """6 one-bucket batches an epoch, 3 per process: 4 steps cross an epoch boundary in lockstep (a process
    short of a batch would hang the other at its gradient all-reduce)."""
    import subprocess
    import sys

    script = tmp_path / "two.py"
    script.write_text(BUCKETED_TWO_PROCESS_SCRIPT)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
        + [str(non_square), str(out)],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [safetensors.torch.load_file(out / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert any(ranks[0][k].abs().sum() > 0 for k in ranks[0] if "lora_B" in k)


def test_the_shipped_non_square_set_trains_in_its_own_buckets(tmp_path, latent_shapes):
    """data/nonsquare (3:2 and 2:3 sheets) goes to the 80x48 and 48x80 buckets, never cropped square."""
    folder = TINY_SD_PATH.parent / "nonsquare"
    settings = {"train_data_dir": str(folder), "max_train_samples": None, "aspect_ratio_buckets": True}
    result = train(small(tmp_path, max_train_steps=12, **settings))
    assert {shape[2:] for shape in latent_shapes} == {(12, 20), (20, 12)}  # 80x48 and 48x80 images: VAE x4
    assert all(map(math.isfinite, result.losses))
