"""The rehearsal's parts, fast: T4 values read from the notebooks, the hub cache's layout, the tokenizer, and
a tiny SD 1.5 stand-in resolved offline by its hub ids. The rehearsal itself is `scripts/rehearse.sh`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_nb.course.prefetch import NARUTO, SD15
from lora_nb.course.rehearsal import (
    CPU_OVERRIDES,
    SD15_LISTING,
    VOCAB_SIZE,
    WORDS,
    rehearsal_parameters,
    synthetic_clip_vocabulary,
    t4_parameters,
    tiny_configs,
    write_snapshot,
)
from lora_nb.course.runner import course_notebooks

NOTEBOOKS = {nb.stem: nb for nb in course_notebooks()}


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf")
    write_snapshot(home, configs=tiny_configs())
    return home


def offline(code: str, hf_home: Path) -> str:
    """Run `code` in a fresh interpreter (the hub libraries read these variables on import); its stdout."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_t4_values_are_read_from_the_comments():
    values, notes = t4_parameters(NOTEBOOKS["03-pokemon-style"])
    assert values["base_model"] == SD15 and values["dataset"] == NARUTO
    assert values["resolution"] == 512 and values["mixed_precision"] == "fp16"
    assert values["learning_rate"] == 1e-4 and values["max_train_steps"] == 15000  # "1e-4, the blog's"
    assert values["gradient_checkpointing"] is True and values["gradient_accumulation_steps"] == 4
    assert values["prompts"][0] == "Totoro"  # a `# T4:` line of its own, under a two-line assignment
    assert notes == {}


def test_every_notebook_names_the_ids_prefetch_fetches():
    """A typo in a T4 id would pass on the embedded default and fail on Colab: caught here."""
    for name, notebook in NOTEBOOKS.items():
        values, _ = t4_parameters(notebook)
        assert values["base_model"] == SD15, name
        for key in ("dataset", "style_data"):
            assert values.get(key, NARUTO) == NARUTO, name


def test_overrides_touch_only_what_a_cpu_cannot_afford():
    for notebook in NOTEBOOKS.values():
        values, _ = t4_parameters(notebook)
        parameters, _ = rehearsal_parameters(notebook)
        changed = {k for k in parameters if k not in values or parameters[k] != values[k]}
        assert changed <= set(CPU_OVERRIDES), notebook.stem
        assert parameters["mixed_precision"] == "fp16" and parameters["base_model"] == SD15


def test_vocabulary_has_clips_size_and_whole_words():
    vocab, merges = synthetic_clip_vocabulary()
    assert len(vocab) == VOCAB_SIZE and len(merges) - 1 == VOCAB_SIZE - 512 - 2
    assert vocab["<|endoftext|>"] == VOCAB_SIZE - 1 and vocab["<|startoftext|>"] == VOCAB_SIZE - 2
    assert all(f"{w}</w>" in vocab for w in WORDS.split()) and "<sks>" not in vocab
    assert synthetic_clip_vocabulary() == (vocab, merges)


def test_snapshot_has_the_hub_cache_layout(hf_home):
    repo = hf_home / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    commit = (repo / "refs" / "main").read_text()
    unet = repo / "snapshots" / commit / "unet" / "diffusion_pytorch_model.safetensors"
    assert unet.is_symlink() and unet.resolve().parent == (repo / "blobs").resolve()
    tree = json.loads((repo / "trees" / f"{commit}.json").read_text())
    assert set(tree["files"]) == set(SD15_LISTING)  # what a download records: every file, fetched or not
    assert not (repo / "snapshots" / commit / "v1-5-pruned.ckpt").exists()


def test_tiny_stand_in_resolves_offline_by_its_hub_ids(hf_home):
    out = offline(
        f"""
from lora_nb.inference import load_base_pipeline
from lora_nb.data import load_captioned_dataset
pipe = load_base_pipeline("{SD15}")
ids = pipe.tokenizer("a photo of sks dog", padding="max_length", max_length=77).input_ids
print(len(pipe.tokenizer), len(ids), pipe.tokenizer.tokenize("a photo of sks dog"))
print(type(pipe.safety_checker).__name__, pipe.unet.config.sample_size)
data = load_captioned_dataset("{NARUTO}")
print(len(data), data.column_names, data[0]["image"].size)
""",
        hf_home,
    )
    lines = out.strip().splitlines()[-3:]
    assert lines[0] == "49408 77 ['a</w>', 'photo</w>', 'of</w>', 'sks</w>', 'dog</w>']"
    assert lines[1] == "StableDiffusionSafetyChecker 8"
    assert lines[2] == "48 ['image', 'text'] (512, 512)"
