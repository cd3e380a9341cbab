"""lora_nb.course.prefetch: what it fetches is what the course loads offline (checked on a tiny stand-in)."""

import subprocess

import pytest

from lora_nb.course import prefetch, rehearsal


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf")
    rehearsal.write_snapshot(home, configs=rehearsal.tiny_configs())
    return home


def test_the_patterns_fetch_the_pipeline_and_skip_the_rest():
    from huggingface_hub.utils import filter_repo_objects

    fetched = set(filter_repo_objects(rehearsal.SD15_LISTING, allow_patterns=prefetch.PIPELINE_PATTERNS))
    assert "unet/diffusion_pytorch_model.safetensors" in fetched and "tokenizer/vocab.json" in fetched
    skipped = set(rehearsal.SD15_LISTING) - fetched
    assert {"v1-5-pruned.ckpt", "unet/diffusion_pytorch_model.fp16.safetensors"} <= skipped
    gigabytes = sum(rehearsal.SD15_LISTING[f] for f in fetched) / 1e9
    assert 5.0 < gigabytes < 6.0, gigabytes  # the size the docstring and the README promise


def test_prefetch_fetches_with_the_patterns(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "huggingface_hub.snapshot_download", lambda repo, **kw: calls.append((repo, kw)) or "x"
    )
    assert prefetch.prefetch_model() == "x"
    assert calls == [(prefetch.SD15, {"allow_patterns": prefetch.PIPELINE_PATTERNS})]


def test_offline_check_passes_on_what_prefetch_leaves(hf_home, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(hf_home))
    prefetch.check_offline()


def test_offline_check_fails_when_a_needed_file_was_not_fetched(tmp_path, monkeypatch):
    """diffusers checks the snapshot against the cached file list: a pattern too few is caught offline."""
    patterns = [p for p in prefetch.PIPELINE_PATTERNS if p != "safety_checker/model.safetensors"]
    monkeypatch.setattr(rehearsal, "PIPELINE_PATTERNS", patterns)
    rehearsal.write_sd15_snapshot(tmp_path / "hub", configs=rehearsal.tiny_configs())
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(subprocess.CalledProcessError):
        prefetch.check_offline(dataset=None)
