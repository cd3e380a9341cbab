"""Rehearse real mode without a network or a GPU: SD 1.5 and the naruto captions, as files in a hub cache.

    python -m lora_nb.course.rehearsal --hf-home /tmp/hf --out outputs/rehearsal   # snapshot (once), then
                                                                                   # notebooks
    python -m lora_nb.course.rehearsal --hf-home /tmp/hf --only 03                 # one notebook
    python -m lora_nb.course.rehearsal --hf-home /tmp/hf --snapshot-only           # write the cache,
                                                                                   # run nothing

The snapshot is what `python -m lora_nb.course.prefetch` leaves behind, written from the other side: the hub
cache's own layout (`models--org--name/{blobs,snapshots/<commit>,refs/main,trees}`) under the real ids,
SD 1.5's real configs, a CLIP tokenizer of the real vocabulary size (49408; a synthetic BPE, the real one
cannot be downloaded here), random weights, and a few dozen captioned images as the hub's parquet, prepared as
`datasets` prepares a download. The repository's full file list goes into the cache as a download records
it, so diffusers checks, offline, that the files `lora_nb.course.prefetch` fetches are all it needs.

Each notebook then runs with the T4 values written beside its parameters, under HF_HUB_OFFLINE=1, except
what a CPU cannot afford (CPU_OVERRIDES): steps, image counts and resolution. The resolution goes down to
64 px (8x8 latents, the smallest SD 1.5's UNet takes: three 2x downsamplings) in two places: the notebooks'
`resolution`, and the UNet config's `sample_size`, from which diffusers and lora_nb take the native size of
every image they draw or measure. That number (and the config's `_diffusers_version`, without which
diffusers puts SD 1.x's 64 back) is the only change to the real configs; `--native`
keeps SD 1.5's 64 (512 px), for a GPU. On a CPU, `mixed_precision="fp16"` trains in fp32 and says
so (lora_nb.train: a CPU has no fp16 autocast or loss scaling); the notebooks draw in fp32 there too.
"""

from __future__ import annotations

import argparse
import ast
import gc
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from ..inject import TARGET_SETS
from ..sizes import CONFIG_DIR
from .prefetch import NARUTO, PIPELINE_PATTERNS, SD15

CPU_SAMPLE_SIZE = 8  # latents: 64 px images

# ---------------------------------------------------------------- the hub cache's layout


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_hub_repo(
    hub_cache: Path, repo_id: str, files: dict, listing: dict | None = None, repo_type: str = "model"
) -> Path:
    """Write `files` ({path: bytes, or a file to move in}) as a download into `hub_cache` leaves them.

    Blobs are named by etag (git sha1 for small files, sha256 for large ones), the snapshot links to them,
    `refs/main` names the commit. `listing` ({path: size}: the repository's files, fetched or not) becomes
    the cached tree listing that `snapshot_download` writes and diffusers reads offline. Returns the snapshot.
    """
    storage = Path(hub_cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(
        repo_id.encode()
    ).hexdigest()  # a real commit is unknown here: any fixed 40 hex digits
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, content in files.items():
        if isinstance(content, bytes):
            etag = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
            size, entry = len(content), {"blob_id": etag}
            (storage / "blobs" / etag).write_bytes(content)
        else:
            etag, size = _sha256(content), Path(content).stat().st_size
            entry = {"blob_id": hashlib.sha1(etag.encode()).hexdigest(), "lfs_sha256": etag, "lfs_size": size}
            shutil.move(content, storage / "blobs" / etag)
        entries[name] = {"size": size, **entry}
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(storage / "blobs" / etag, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    if listing is not None:
        for name, size in listing.items():
            entries.setdefault(name, {"size": size, "blob_id": hashlib.sha1(name.encode()).hexdigest()})
        (storage / "trees").mkdir(exist_ok=True)
        tree = {"format_version": 1, "files": dict(sorted(entries.items()))}
        (storage / "trees" / f"{commit}.json").write_text(json.dumps(tree, indent=1))
    return snapshot


# ---------------------------------------------------------------- SD 1.5: its files and configs

# stable-diffusion-v1-5/stable-diffusion-v1-5 on the hub, every file with its size in bytes (rounded where
# not known exactly): what a download's tree listing records. Only PIPELINE_PATTERNS' matches are written.
SD15_LISTING = {
    ".gitattributes": 1548,
    "README.md": 14461,
    "model_index.json": 541,
    "v1-inference.yaml": 1873,
    "v1-5-pruned.ckpt": 7703807346,
    "v1-5-pruned.safetensors": 7703324286,
    "v1-5-pruned-emaonly.ckpt": 4265380512,
    "v1-5-pruned-emaonly.safetensors": 4265146304,
    "feature_extractor/preprocessor_config.json": 342,
    "safety_checker/config.json": 4723,
    "safety_checker/model.safetensors": 1215981830,
    "safety_checker/model.fp16.safetensors": 608016280,
    "safety_checker/pytorch_model.bin": 1216064769,
    "safety_checker/pytorch_model.fp16.bin": 608103564,
    "scheduler/scheduler_config.json": 308,
    "text_encoder/config.json": 617,
    "text_encoder/model.safetensors": 492265168,
    "text_encoder/model.fp16.safetensors": 246144352,
    "text_encoder/pytorch_model.bin": 492305335,
    "text_encoder/pytorch_model.fp16.bin": 246187076,
    "tokenizer/merges.txt": 524619,
    "tokenizer/special_tokens_map.json": 472,
    "tokenizer/tokenizer_config.json": 806,
    "tokenizer/vocab.json": 1059962,
    "unet/config.json": 743,
    "unet/diffusion_pytorch_model.safetensors": 3438167540,
    "unet/diffusion_pytorch_model.fp16.safetensors": 1719125304,
    "unet/diffusion_pytorch_model.non_ema.safetensors": 3438167536,
    "unet/diffusion_pytorch_model.bin": 3438354725,
    "unet/diffusion_pytorch_model.fp16.bin": 1719327893,
    "unet/diffusion_pytorch_model.non_ema.bin": 3438366373,
    "vae/config.json": 547,
    "vae/diffusion_pytorch_model.safetensors": 334643268,
    "vae/diffusion_pytorch_model.fp16.safetensors": 167335342,
    "vae/diffusion_pytorch_model.bin": 334707217,
    "vae/diffusion_pytorch_model.fp16.bin": 167405651,
}

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
FEATURE_EXTRACTOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}
# The safety checker is CLIP ViT-L/14's vision tower and projection (its text half is never used).
SAFETY_CHECKER = {
    "_name_or_path": "CompVis/stable-diffusion-safety-checker",
    "architectures": ["StableDiffusionSafetyChecker"],
    "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592,
    "model_type": "clip",
    "projection_dim": 768,
    "text_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "image_size": 224,
    },
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
}
_SPECIAL = {
    "content": "",
    "lstrip": False,
    "normalized": True,
    "rstrip": False,
    "single_word": False,
    "__type": "AddedToken",
}
TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": {**_SPECIAL, "content": "<|startoftext|>"},
    "do_lower_case": True,
    "eos_token": {**_SPECIAL, "content": "<|endoftext|>"},
    "errors": "replace",
    "model_max_length": 77,
    "name_or_path": "openai/clip-vit-large-patch14",
    "pad_token": "<|endoftext|>",
    "special_tokens_map_file": "./special_tokens_map.json",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": {**_SPECIAL, "content": "<|endoftext|>"},
}
SPECIAL_TOKENS_MAP = {
    key: {k: v for k, v in TOKENIZER_CONFIG[key].items() if k != "__type"}
    for key in ("bos_token", "eos_token", "unk_token")
} | {"pad_token": "<|endoftext|>"}


def sd15_configs(sample_size: int | None = CPU_SAMPLE_SIZE) -> dict[str, dict]:
    """SD 1.5's config files ({path in the repo: content}); `sample_size` (None: SD 1.5's 64) for the UNet."""
    unet = {"_diffusers_version": "0.6.0", **json.loads((CONFIG_DIR / "sd15_unet.json").read_text())}
    if sample_size:
        # diffusers resets a sample_size under 64 to 64 in configs older than 0.9 (SD 1.x's legacy fix), so
        # the rehearsal's config says it comes from the diffusers in use, as save_pretrained would write it.
        import diffusers

        unet |= {"sample_size": sample_size, "_diffusers_version": diffusers.__version__}
    text_encoder = {
        "_name_or_path": "openai/clip-vit-large-patch14",
        **json.loads((CONFIG_DIR / "sd15_text_encoder.json").read_text()),
        "torch_dtype": "float32",
        "transformers_version": "4.22.0.dev0",
    }
    return {
        "model_index.json": MODEL_INDEX,
        "unet/config.json": unet,
        "vae/config.json": VAE,
        "text_encoder/config.json": text_encoder,
        "scheduler/scheduler_config.json": SCHEDULER,
        "safety_checker/config.json": SAFETY_CHECKER,
        "feature_extractor/preprocessor_config.json": FEATURE_EXTRACTOR,
        "tokenizer/tokenizer_config.json": TOKENIZER_CONFIG,
        "tokenizer/special_tokens_map.json": SPECIAL_TOKENS_MAP,
    }


# ---------------------------------------------------------------- a CLIP tokenizer of the real size

VOCAB_SIZE = 49408  # CLIP's: 256 bytes, the same with </w>, 48894 merges, 2 special tokens
# Words that become single tokens, as common words are in CLIP's vocabulary: the prompts and captions of the
# notebooks' T4 values and of the rehearsal's data, and the DreamBooth identifier.
WORDS = """a an and the of with in on at to is his her its photo drawing picture painting man woman girl boy
person people ninja frog dog cat star circle square triangle left right top bottom middle blue red green
yellow purple orange pink black white brown grey gray hair scarf eyes ears face hat sword hand holding
standing sitting smiling looking wearing creature antennae round totoro sks cartoon anime character young
old big small headband jacket shirt background"""


def _bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) byte alphabet, in its vocabulary's order: printable bytes as themselves, then the
    other bytes shifted past 255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + i) for i in range(len(others))]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The BPE pieces of one lower-case word: the pair of lowest rank merges first, as in CLIP's tokenizer."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(itertools.pairwise(pieces))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _filler_pairs():
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [a + b for a in letters for b in letters]
    yield from ((a, b) for a in letters for b in letters)
    yield from ((a, b + "</w>") for a in letters for b in letters)
    yield from ((x, y) for x in pairs for y in pairs)


def synthetic_clip_vocabulary(words: str = WORDS, size: int = VOCAB_SIZE) -> tuple[dict[str, int], list[str]]:
    """(vocab.json, merges.txt lines): a byte-level BPE of `size` tokens, `words` whole; deterministic."""
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    known, ranks = set(tokens), {}

    def add(a: str, b: str) -> None:
        ranks[(a, b)] = len(merges)
        merges.append((a, b))
        tokens.append(a + b)
        known.add(a + b)

    for word in sorted(set(words.split())):
        while len(pieces := _bpe(word, ranks)) > 1:  # a later merge never breaks an earlier word's path
            add(pieces[0], pieces[1])
    for a, b in _filler_pairs():
        if len(tokens) == size - 2:
            break
        if a in known and b in known and a + b not in known:
            add(a, b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]


def tokenizer_files() -> dict[str, bytes]:
    vocab, merges = synthetic_clip_vocabulary()
    return {
        "tokenizer/vocab.json": json.dumps(vocab, ensure_ascii=False).encode(),
        "tokenizer/merges.txt": ("\n".join(merges) + "\n").encode(),
    }


# ---------------------------------------------------------------- random weights


def _build(part: str, config: dict):
    """The component `part`, randomly initialised by its own class (seeded: the same files every time)."""
    import torch

    torch.manual_seed(0)
    if part == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(config)
    if part == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(config)
    if part == "text_encoder":
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig(**config))
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    # Its concept thresholds start at 1, above any cosine similarity: random weights never flag an image.
    return StableDiffusionSafetyChecker(CLIPConfig(**config))


WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "safety_checker": "model.safetensors",
}


def write_weights(part: str, config: dict, folder: Path) -> Path:
    """Save `part`'s random weights in `folder`: fp32, like the hub's non-variant files."""
    model = _build(part, config)
    model.save_pretrained(folder / part, safe_serialization=True)
    del model
    gc.collect()
    return folder / part / WEIGHT_FILES[part]


def write_sd15_snapshot(
    hub_cache: Path,
    repo_id: str = SD15,
    configs: dict | None = None,
    sample_size: int | None = CPU_SAMPLE_SIZE,
) -> Path:
    """SD 1.5 as `prefetch_model` leaves it: the files PIPELINE_PATTERNS match, the full listing recorded.

    `configs` ({path: config}) replaces SD 1.5's configs: the tests pass tiny ones.
    """
    from huggingface_hub.utils import filter_repo_objects

    configs = {**sd15_configs(sample_size), **(configs or {})}
    files = {name: json.dumps(config, indent=2).encode() for name, config in configs.items()}
    files |= tokenizer_files()
    wanted = set(filter_repo_objects(SD15_LISTING, allow_patterns=PIPELINE_PATTERNS))
    Path(hub_cache).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=hub_cache) as tmp:  # the same disk: blobs are moved, not copied
        for part, weights in WEIGHT_FILES.items():
            if f"{part}/{weights}" in wanted:
                files[f"{part}/{weights}"] = write_weights(part, configs[f"{part}/config.json"], Path(tmp))
                print(f"  {part}: random weights written", flush=True)
        files = {name: content for name, content in files.items() if name in wanted}
        return write_hub_repo(hub_cache, repo_id, files, listing=SD15_LISTING)


# ---------------------------------------------------------------- the data set

_WHO = ["a man", "a woman", "a girl", "a boy", "a ninja", "a young man", "an old man", "a cartoon character"]
_COLOURS = {
    "blue": (40, 80, 200),
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "yellow": (230, 200, 40),
    "black": (20, 20, 20),
    "white": (235, 235, 235),
    "pink": (240, 140, 180),
    "orange": (240, 140, 30),
}
_WEARING = ["a red scarf", "a headband", "a black jacket", "a green shirt", "a hat", "a sword"]


def naruto_examples(count: int = 48, size: int = 512) -> list[dict]:
    """Drawings captioned like the naruto set's BLIP captions: a figure, its hair, what it wears."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    examples = []
    for i in range(count):
        who, hair, wearing = rng.choice(_WHO), rng.choice(list(_COLOURS)), rng.choice(_WEARING)
        image = Image.new("RGB", (size, size), tuple(rng.randrange(120, 256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        x, y, r = rng.randrange(size // 3, 2 * size // 3), rng.randrange(size // 3, size // 2), size // 6
        draw.rectangle((x - r, y + r, x + r, size), fill=tuple(rng.randrange(0, 200) for _ in range(3)))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(250, 210, 170), outline=(0, 0, 0), width=3)
        draw.chord((x - r, y - r - r // 3, x + r, y + r // 2), 180, 360, fill=_COLOURS[hair])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        examples.append(
            {
                "image": {"bytes": buffer.getvalue(), "path": None},
                "text": f"{who} with {hair} hair and {wearing}",
            }
        )
    return examples


DATASET_CARD = """---
license: other
language:
- en
task_categories:
- text-to-image
dataset_info:
  features:
  - name: image
    dtype: image
  - name: text
    dtype: string
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
---
# naruto-blip-captions (a rehearsal stand-in: synthetic drawings, BLIP-style captions)
"""


def write_naruto_snapshot(hf_home: Path, repo_id: str = NARUTO, count: int = 48, size: int = 512) -> Path:
    """The data set as `prefetch_dataset` leaves it: its parquet in the hub cache, and the prepared copy."""
    from datasets import Dataset, Features, Image, Value

    features = Features({"image": Image(), "text": Value("string")})
    examples = naruto_examples(count, size)
    data = Dataset.from_list(examples, features=features)
    with tempfile.TemporaryDirectory(dir=hf_home) as tmp:
        parquet = Path(tmp) / "train.parquet"
        data.to_parquet(parquet)
        files = {
            "README.md": DATASET_CARD.format(count=count).encode(),
            "data/train-00000-of-00001.parquet": parquet,
        }
        snapshot = write_hub_repo(Path(hf_home) / "hub", repo_id, files, repo_type="dataset")
    prepare_dataset(snapshot, repo_id, Path(hf_home) / "datasets")
    return snapshot


def prepare_dataset(snapshot: Path, repo_id: str, cache_dir: Path) -> None:
    """Build the Arrow copy that `load_dataset(repo_id)` reads offline, from the snapshot's files.

    Online, `load_dataset(repo_id)` prepares the same files into `<namespace>___<name>/default/0.0.0/<hash>`.
    Here the builder reads them from a folder named `<name>`, into a folder that is then given that name
    (told the repo_id, the builder would insist on the files being hf:// paths of the repository).
    """
    from datasets import load_dataset_builder

    namespace, name = repo_id.split("/")
    target = Path(cache_dir) / f"{namespace}___{name}"
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / name
        named.symlink_to(Path(snapshot).resolve(), target_is_directory=True)
        builder = load_dataset_builder(str(named), cache_dir=str(Path(tmp) / "cache"))
        builder.download_and_prepare()
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(tmp) / "cache" / name, target)


def tiny_configs() -> dict[str, dict]:
    """SD 1.5's configs shrunk to a few million parameters (same classes, vocabulary, layout): for tests."""
    configs = sd15_configs()
    unet = {
        **configs["unet/config.json"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "attention_head_dim": 2,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
    }
    small = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    text = {**configs["text_encoder/config.json"], **small, "projection_dim": 32}
    checker = {
        **SAFETY_CHECKER,
        "projection_dim": 32,
        "text_config": {**SAFETY_CHECKER["text_config"], **small},
        "vision_config": {**SAFETY_CHECKER["vision_config"], **small},
    }
    vae = {
        **VAE,
        "block_out_channels": [32],
        "down_block_types": ["DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D"],
        "sample_size": 8,
    }
    return {
        "unet/config.json": unet,
        "text_encoder/config.json": text,
        "safety_checker/config.json": checker,
        "vae/config.json": vae,
    }


def write_snapshot(hf_home: Path, native: bool = False, configs: dict | None = None) -> None:
    """Model and data set into `hf_home` (its hub/ and datasets/), unless an earlier call finished it."""
    hf_home = Path(hf_home)
    stamp = hf_home / f".rehearsal-{'native' if native else 'cpu'}{'-custom' if configs else ''}"
    if stamp.is_file():
        return
    if hf_home.exists():
        shutil.rmtree(hf_home)  # a half-written or different snapshot: start clean
    hf_home.mkdir(parents=True)
    start = time.time()
    print(f"writing the rehearsal snapshot into {hf_home} ...", flush=True)
    write_sd15_snapshot(hf_home / "hub", configs=configs, sample_size=None if native else CPU_SAMPLE_SIZE)
    write_naruto_snapshot(hf_home)
    stamp.write_text(f"{time.time() - start:.0f} s\n")
    print(f"snapshot written in {time.time() - start:.0f} s", flush=True)


# ---------------------------------------------------------------- the notebooks, with their T4 values


def _literal_prefix(text: str):
    """The Python literal `text` starts with ('"fp16" (auto ...)' -> 'fp16', '15000, the blog's' -> 15000)."""
    for end in range(len(text), 0, -1):
        if text[:end].rstrip().endswith(","):  # "15000," is a tuple; the value is the 15000 before it
            continue
        try:
            return ast.literal_eval(text[:end].strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
    raise ValueError(f"no literal in {text!r}")


def t4_parameters(notebook: Path) -> tuple[dict, dict]:
    """The T4 values written beside a notebook's parameters: ({name: value}, {name: comment not a value}).

    A `# T4:` comment on its own line belongs to the assignment above it. Comments such as "the same" or
    "a folder with 5-10 photos of your subject" are not values: the default stays, and they are returned.
    """
    import nbformat

    cell = next(
        c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", [])
    )
    values, notes, name = {}, {}, None
    for line in cell.source.splitlines():
        code, _, comment = line.partition("#")
        if "=" in code and not code.startswith((" ", "\t")):
            name = code.split("=")[0].strip()
        comment = comment.strip()
        if name and comment.startswith("T4:"):
            text = comment[3:].strip()
            try:
                values[name] = _literal_prefix(text)
            except ValueError:
                notes[name] = text
    return values, notes


def notebook_parameters(notebook: Path) -> list[str]:
    import nbformat

    cell = next(
        c for c in nbformat.read(notebook, as_version=4).cells if "parameters" in c.metadata.get("tags", [])
    )
    return [
        ast.unparse(t)
        for node in ast.parse(cell.source).body
        if isinstance(node, ast.Assign)
        for t in node.targets
    ]


# What a CPU cannot afford, and nothing else. Each applies where a notebook has the parameter.
CPU_OVERRIDES = {
    "max_train_steps": 2,  # T4: 500 to 15000
    "overfit_steps": 4,  # 09's over-fitting run, T4: 2000
    "checkpointing_steps": 2,  # 09's checkpoints, T4: every 250 steps
    "ti_steps": 10,  # T4: 500; at 2, 06's check that the new word moved fails
    "resolution": 64,  # T4: 512; 64 px is 8x8 latents, the smallest SD 1.5's UNet takes
    "num_inference_steps": 2,  # T4: 25 or 30
    "num_images": 2,  # images per prompt in 04 and 06 (8)
    "num_class_images": 2,  # T4: 200 class images drawn by the base model
    "heldout": 4,  # held-out images measured on (30)
    "heldout_repeats": 1,  # T4: 4
    "timing_repeats": 1,  # 3
    "expect_learning": False,  # 04 and 06 check that training learned the subject: two steps cannot
    # 05, T4: every target set at ranks 1, 4, 16 and 64 (20 runs); here each target set once
    "ranks": {name: [4] for name in TARGET_SETS},
}


def rehearsal_parameters(notebook: Path) -> tuple[dict, dict]:
    """(the parameters for `notebook`: its T4 values, then CPU_OVERRIDES; the T4 notes not applied)."""
    values, notes = t4_parameters(notebook)
    names = set(notebook_parameters(notebook))
    return {**values, **{k: v for k, v in CPU_OVERRIDES.items() if k in names}}, notes


CELL_TIMEOUT = 1800  # seconds: SD 1.5 on one CPU core is slow, but a cell past half an hour hangs


def rehearse(hf_home: Path, out: Path, only: list[str] | None = None, native: bool = False) -> list:
    """Write the snapshot (once), then run the notebooks one at a time under HF_HUB_OFFLINE=1; the runs."""
    from .runner import NotebookFailed, course_notebooks, run_notebook, summary_table
    from .site import NotebookRun

    write_snapshot(hf_home, native=native)
    # The kernels inherit this environment: the hub is reached only through the cache, never the network.
    os.environ.update(
        {"HF_HOME": str(Path(hf_home).resolve()), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    )
    runs = []
    for notebook in course_notebooks(only):
        parameters, notes = rehearsal_parameters(notebook)
        print(f"{notebook.stem}: {parameters}", flush=True)
        for name, note in notes.items():
            print(f"  {name}: default kept (T4: {note})", flush=True)
        start, failure, executed = time.time(), None, None
        try:
            executed = run_notebook(notebook, out, parameters, cell_timeout=CELL_TIMEOUT)
        except NotebookFailed as error:
            failure = error.failure
        run = NotebookRun(notebook, time.time() - start, executed, None, failure)
        print(
            f"  {'FAILED: ' + failure.describe() if failure else 'passed'} in {run.seconds:.0f} s", flush=True
        )
        runs.append(run)
    print(summary_table(runs), flush=True)
    return runs


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hf-home", type=Path, required=True, help="the cache folder (HF_HOME) to write and use"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/rehearsal"), help="executed notebooks")
    parser.add_argument("--only", nargs="*", help="notebook number prefixes, e.g. 01 03")
    parser.add_argument("--native", action="store_true", help="SD 1.5's own 512 px sample size (for a GPU)")
    parser.add_argument("--snapshot-only", action="store_true", help="write the snapshot, run no notebook")
    args = parser.parse_args(argv)
    if args.snapshot_only:
        write_snapshot(args.hf_home, native=args.native)
        return
    runs = rehearse(args.hf_home, args.out, args.only, args.native)
    failed = [run.notebook.name for run in runs if run.failure]
    if failed:
        sys.exit(f"rehearsal: {len(failed)} notebook(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
