"""The embedded tiny Stable Diffusion: SD 1.5's architecture and module names, small enough for a CPU.

Every part is a real class (diffusers `UNet2DConditionModel` and `AutoencoderKL`, transformers
`CLIPTextModel` and `CLIPTokenizer`), so `StableDiffusionPipeline.from_pretrained("data/tiny-sd")` loads it
and every lesson transfers to SD 1.5 unchanged: the attention layers are `attn1`/`attn2` with
`to_q`, `to_k`, `to_v`, `to_out.0`, the text encoder's are `q_proj`, `k_proj`, `v_proj`, `out_proj`.

The weights are made by `scripts/pretrain_tiny_sd.py`; this module builds the untrained parts and loads the
trained pipeline.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .world import IMAGE_SIZE, vocabulary

TINY_SD_PATH = Path(__file__).resolve().parents[2] / "data" / "tiny-sd"  # lora_nb/course/ -> the repository

MAX_TOKENS = 77  # SD 1.5's prompt length
TEXT_WIDTH = 64

# SD 1.5's classes and module names. Attention sits at the 8x8 and 4x4 latent levels and the mid block, not
# at 16x16, where self-attention over 256 tokens would cost more than the rest of the UNet on a CPU.
UNET_CONFIG = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 96),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 2,  # diffusers reads this as the number of heads
    "norm_num_groups": 8,  # 32 groups of one channel would normalise colour away
}
# Three blocks: the latent is a quarter of the image side (SD 1.5's four blocks divide by 8).
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
}
TEXT_LAYERS = 3
# SD 1.5's noise schedule; steps_offset and clip_sample as SD 1.5's scheduler config has them. The UNet
# predicts the velocity v, as SD 2.x's does, not SD 1.5's noise: at the first sampling steps, where the layout
# is decided, a noise prediction is the noisy input itself to within 7 % (sqrt(alpha_bar) at t = 999), and
# an epsilon model trained here never learned to place objects where the prompt says (0 of 32 prompts moved
# with "left" / "right" / "top" / "bottom"). v is the clean image there, so its loss weighs the layout fully.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "v_prediction",
}


def learn_bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges that build each word into a single token, most frequent pairs first."""
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges = []
    while True:
        pairs = Counter(pair for seq in pieces.values() for pair in itertools.pairwise(seq))
        if not pairs:
            return merges
        best = max(pairs, key=lambda pair: (pairs[pair], pair))  # ties broken by name: deterministic
        merges.append(best)
        for w, seq in pieces.items():
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    merged.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            pieces[w] = merged


def build_tokenizer(words: list[str] | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is every byte (alone and word-final) plus one token per word.

    Any lowercase word tokenises: unknown ones such as `sks` fall back to single characters, as rare
    identifiers do in SD 1.5's own vocabulary.
    """
    byte_chars = sorted(ByteLevel.alphabet())  # the 256 characters byte-level BPE maps bytes to
    merges = learn_bpe_merges(words or vocabulary())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def build_text_encoder(tokenizer: CLIPTokenizer, num_hidden_layers: int = TEXT_LAYERS) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=TEXT_WIDTH * 4,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_untrained_pipeline(
    seed: int = 0,
    unet_config: dict | None = None,
    vae_config: dict | None = None,
    words: list[str] | None = None,
    text_layers: int = TEXT_LAYERS,
) -> StableDiffusionPipeline:
    """The tiny pipeline with fresh random weights: what pretraining starts from (this architecture, or
    another one to try)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**(vae_config or VAE_CONFIG)),
        text_encoder=build_text_encoder(tokenizer, num_hidden_layers=text_layers),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**(unet_config or UNET_CONFIG)),
        scheduler=DDPMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_tiny_pipeline(
    path: str | Path = TINY_SD_PATH, fast_scheduler: bool = True
) -> StableDiffusionPipeline:
    """The shipped, pretrained tiny pipeline (offline), with DPM-Solver++ for 25-step sampling by default."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no tiny pipeline at {path} (model_index.json missing); it is made by "
            "scripts/pretrain_tiny_sd.py"
        )
    from ..inference import load_base_pipeline

    return load_base_pipeline(path, fast_scheduler=fast_scheduler)
