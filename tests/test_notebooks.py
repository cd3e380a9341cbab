"""The course: every notebook runs under papermill and shows what it promises; the files stay
diff-friendly."""

import json
import re
from pathlib import Path

import nbformat
import pytest

from lora_nb.course.runner import course_notebooks, run_notebook
from lora_nb.formats import read_lora

ROOT = Path(__file__).resolve().parent.parent

# The figures each notebook saves (and shows); a new notebook must be listed here.
EXPECTED_FIGURES = {
    "01-low-rank": [
        "weight-spectra",
        "parameter-count",
        "loss",
        "update-spectrum",
        "update-error",
        "energy-per-layer",
    ],
    "02-cross-attention": ["token-share", "attention-maps"],
    "03-pokemon-style": ["training-examples", "before", "loss", "before-after", "scale-sweep"],
    "04-dreambooth": ["instance-images", "before", "class-images", "after"],
    "05-adapter-sizes": ["sweep-loss", "sweep-sizes", "sweep-samples", "sd-sizes"],
    "06-pivotal-tuning": ["comparison"],
    "07-inference-in-practice": ["mixing"],
    "08-beyond-lora": ["variants", "samples", "magnitude-direction", "dora-scale-zero"],
    "09-judgement": ["learning-rates", "overfit-loss", "fitting", "validation-grid", "burn"],
}
NOTEBOOKS = course_notebooks()
CELL_TIMEOUT = 300  # seconds; the slowest cell takes about a minute here: more is a hang, failed and named


def test_the_course_has_its_notebooks_in_order():
    names = [nb.stem for nb in NOTEBOOKS]
    assert [name[:3] for name in names] == [
        f"{i:02d}-" for i in range(1, len(names) + 1)
    ]  # 01-, 02-, ... no gap
    assert set(names) == set(EXPECTED_FIGURES), "list each notebook's figures in EXPECTED_FIGURES"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_clean_and_complete(notebook):
    nb = nbformat.read(notebook, as_version=4)
    assert nb.metadata["kernelspec"]["name"] == "python3"  # papermill needs the kernelspec
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks without outputs"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "T4:" in tagged[0].source, "one `parameters` cell, with the T4 values beside"
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert f"colab.research.google.com/github/lora-nb/lora_nb/blob/main/notebooks/{notebook.name}" in text
    assert "What you will learn" in text and "## Summary" in text and "## Exercises" in text
    assert any('"google.colab" in sys.modules' in c.source for c in code[:2]), (
        "a Colab-only install cell first"
    )
    assert any("assert " in c.source for c in code), "at least one claim checked by an assert"


def executed_outputs(path):
    nb = nbformat.read(path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_its_defaults(notebook, tmp_path):
    executed = run_notebook(
        notebook, tmp_path, cell_timeout=CELL_TIMEOUT
    )  # a failing cell raises NotebookFailed naming notebook and cell
    outputs = executed_outputs(executed)
    assert not [o for o in outputs if o.output_type == "error"]
    shown = sum("image/png" in o.get("data", {}) for o in outputs)
    expected = EXPECTED_FIGURES[notebook.stem]
    assert shown >= len(expected)
    figures = tmp_path / notebook.stem
    for name in expected:
        assert (figures / f"{name}.png").stat().st_size > 1000, f"{notebook.name} did not save {name}.png"


def test_parameters_can_be_injected(tmp_path):
    """papermill's injected parameters reach the code: a rank-2, 10-step run writes a rank-2 adapter."""
    notebook = next(nb for nb in NOTEBOOKS if nb.stem == "03-pokemon-style")
    executed = run_notebook(
        notebook,
        tmp_path,
        {"rank": 2, "max_train_steps": 10, "prompts": ["a drawing"], "num_inference_steps": 5}
        | {"expect_learning": False},  # ten steps learn too little for the notebook's own checks
        cell_timeout=CELL_TIMEOUT,
    )
    nb = nbformat.read(executed, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "rank = 2" in injected[0].source
    tensors = read_lora(tmp_path / notebook.stem / "lora" / "pytorch_lora_weights.safetensors").tensors
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")} == {2}
    state = json.loads(
        (tmp_path / notebook.stem / "lora" / "README.md").read_text().split("```json")[1].split("```")[0]
    )
    assert state["max_train_steps"] == 10


def test_every_notebook_installs_and_links_the_repository_pyproject_names():
    import tomllib

    url = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    colab = url.replace("https://github.com/", "https://colab.research.google.com/github/")
    for notebook in NOTEBOOKS:
        text = notebook.read_text()
        clones = re.findall(r"git clone -q (\S+) ", text)
        badges = re.findall(r"https://colab\.research\.google\.com/github/[^)\"]+", text)
        assert clones == [url], (notebook.name, clones)
        assert badges and all(b == f"{colab}/blob/main/notebooks/{notebook.name}" for b in badges), badges
