"""Fetch what the course's real mode needs into the Hugging Face cache, once, then run it offline.

    python -m lora_nb.course.prefetch            # SD 1.5 and the naruto captions (about 5.4 GB), then a check
    python -m lora_nb.course.prefetch --check    # only the check: would the course load everything offline?
    HF_HOME=/mnt/usb/hf python -m lora_nb.course.prefetch    # a shared cache for a room of laptops

Interrupted, it resumes: files already complete are skipped, a partial one continues. Afterwards the course
runs with `HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1` (the same HF_HOME), for instance at a workshop.

Only the files the pipeline loads are fetched: SD 1.5's repository also holds 7.7 GB checkpoints, fp16 and
non-EMA variants and pickled copies that diffusers never reads here. The data set is downloaded *and*
prepared, because `datasets` offline reads only its prepared copy, never the hub cache's parquet files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # every notebook's T4 `base_model`
NARUTO = "lambdalabs/naruto-blip-captions"  # the T4 `dataset` of notebooks 01, 03, 05 and 07

# What StableDiffusionPipeline.from_pretrained(SD15) reads: the configs, the tokenizer, and the fp32
# safetensors weights of its components (without `variant=`, neither the fp16 nor the non-EMA files).
# Offline, diffusers checks the snapshot against the repository's cached file list, so a file missing here
# fails the load: tests/test_prefetch.py and the rehearsal check these patterns against that list.
PIPELINE_PATTERNS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "feature_extractor/preprocessor_config.json",
    "*/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "safety_checker/model.safetensors",
]

# Run in a fresh interpreter: huggingface_hub and datasets read HF_HUB_OFFLINE when they are imported.
_CHECK = """
import sys
from diffusers import StableDiffusionPipeline
from datasets import load_dataset
model, dataset = sys.argv[1:3]
folder = StableDiffusionPipeline.download(model)  # what from_pretrained resolves, without loading weights
print(f"{model}: complete in {folder}")
if dataset:
    data = load_dataset(dataset, split="train")
    print(f"{dataset}: {len(data)} examples, columns {data.column_names}")
"""


def prefetch_model(repo_id: str = SD15) -> str:
    """Download (or finish downloading) the pipeline's files; returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=PIPELINE_PATTERNS)


def prefetch_dataset(repo_id: str = NARUTO) -> None:
    """Download the data set's files and prepare the copy `load_dataset(repo_id)` reads offline."""
    from datasets import load_dataset

    data = load_dataset(repo_id, split="train")
    print(f"{repo_id}: {len(data)} examples, columns {data.column_names}")


def offline_environment(env: dict | None = None) -> dict:
    return {**(os.environ if env is None else env), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def check_offline(model: str = SD15, dataset: str | None = NARUTO, env: dict | None = None) -> None:
    """Resolve the model and the data set as the notebooks will, with the network switched off.

    Raises CalledProcessError (its output says what is missing) when something would fail offline.
    """
    subprocess.run(
        [sys.executable, "-c", _CHECK, model, dataset or ""], env=offline_environment(env), check=True
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=SD15, help="the base model's hub id")
    parser.add_argument("--dataset", default=NARUTO, help="the data set's hub id ('' for none)")
    parser.add_argument("--check", action="store_true", help="only check that everything is there offline")
    args = parser.parse_args(argv)
    if not args.check:
        print(f"fetching {args.model} (the pipeline's files only) ...", flush=True)
        print("model in", prefetch_model(args.model), flush=True)
        if args.dataset:
            print(f"fetching and preparing {args.dataset} ...", flush=True)
            prefetch_dataset(args.dataset)
    print("checking offline ...", flush=True)
    try:
        check_offline(args.model, args.dataset or None)
    except subprocess.CalledProcessError:
        sys.exit(
            "offline check failed (see above): run `python -m lora_nb.course.prefetch` again with network"
        )
    print("ready: run the course with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1")


if __name__ == "__main__":
    main()
