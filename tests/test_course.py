"""The course runner: failures name the notebook and cell, one failure stops nothing, progress is shown."""

import io
import re
import time

import nbformat
import pytest

from lora_nb.course import runner as course
from lora_nb.course.site import NotebookRun


def write_notebook(path, *sources, prose=None, key_figure=None):
    """Code cells (the first tagged `parameters`), after a markdown cell of `prose` if given."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.cells[0].metadata["tags"] = ["parameters"]
    if prose:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(prose))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if key_figure:
        nb.metadata["lora_nb"] = {"key_figure": key_figure}
    nbformat.write(nb, path)
    return path


def test_a_failing_cell_is_named_and_the_run_is_kept(tmp_path):
    notebook = write_notebook(
        tmp_path / "09-broken.ipynb", "output_dir = 'x'", "print(output_dir)", "assert False, 'x is not 2'"
    )
    out = tmp_path / "out"
    with pytest.raises(
        course.NotebookFailed,
        match=r"09-broken.ipynb: cell \d+ \(index \d+\) failed: AssertionError: x is not 2",
    ) as raised:
        course.run_notebook(notebook, out)
    failure = raised.value.failure
    assert (failure.cell, failure.source, failure.error) == (
        4,
        "assert False, 'x is not 2'",
        "AssertionError: x is not 2",
    )
    executed = nbformat.read(out / "09-broken.ipynb", as_version=4)  # kept, to read what happened
    printed = [o["text"] for c in executed.cells for o in c.get("outputs", []) if o.get("name") == "stdout"]
    assert printed == [str((out / "09-broken").resolve()) + "\n"]  # the runner's output_dir was injected


def test_a_hanging_cell_fails_and_is_named(tmp_path):
    notebook = write_notebook(tmp_path / "09-hangs.ipynb", "output_dir = 'x'", "import time\ntime.sleep(60)")
    with pytest.raises(
        course.NotebookFailed, match=r"(?s)09-hangs.ipynb: .*timed out.*time.sleep\(60\)"
    ) as raised:
        course.run_notebook(notebook, tmp_path / "out", cell_timeout=2)
    assert raised.value.failure.source == "import time" and "timed out" in raised.value.failure.error


def test_a_failed_notebook_stops_nothing_and_the_site_marks_it(tmp_path, monkeypatch, capsys):
    folder, out = tmp_path / "notebooks", tmp_path / "out"
    folder.mkdir()
    draw = (
        "import os\nfrom PIL import Image\nos.makedirs(output_dir, exist_ok=True)\n"
        "Image.new('RGB', (40, 30), 'red').save(os.path.join(output_dir, 'key.png'))"
    )
    write_notebook(folder / "01-slow.ipynb", "output_dir = 'x'", "import time\ntime.sleep(1)", draw,
                   prose="# 1. Slow", key_figure="key.png")  # fmt: skip
    write_notebook(folder / "02-broken.ipynb", "output_dir = 'x'", "x = 1", "assert x == 2, 'x is not 2'",
                   prose="# 2. Broken")  # fmt: skip
    write_notebook(folder / "03-quick.ipynb", "output_dir = 'x'", "print('hello')", prose="# 3. Quick")
    monkeypatch.setattr(course, "NOTEBOOKS_DIR", folder)
    with pytest.raises(SystemExit, match=r"1 notebook\(s\) failed: 02-broken.ipynb"):
        course.main(["--out", str(out), "--jobs", "2"])

    printed = capsys.readouterr()
    assert "course: 3/3 notebooks" in printed.err  # the progress bar, to its end
    # benchmarks/notebooks.py reads each notebook's time from its "done in" line.
    lines = printed.err.replace("\r", "\n").splitlines()
    done = rf"01-slow\.ipynb done in \d+ s -> {re.escape(str(out / '01-slow.html'))}"
    assert any(re.fullmatch(done, line) for line in lines)
    assert any(line.startswith("02-broken.ipynb FAILED after ") and "In [4]" in line for line in lines)
    table = printed.out[printed.out.index("notebook ") :]
    assert re.search(r"01-slow +passed +\d+ s\n", table) and re.search(r"03-quick +passed", table)
    assert re.search(
        r"02-broken +FAILED +\d+ s +In \[4\] `assert x == 2, 'x is not 2'`: AssertionError", table
    )
    assert "3 notebooks, 2 passed, 1 failed" in table

    index = (out / "index.html").read_text()
    assert index.index('id="01-slow"') < index.index('id="02-broken"') < index.index('id="03-quick"')
    assert 'class="lesson failed" id="02-broken"' in index and "02-broken.html#papermill-error-cell" in index
    assert 'src="01-slow/key.png" width="40" height="30"' in index
    assert "hello" in (out / "03-quick.html").read_text()  # ran, although 02 failed
    broken = (out / "02-broken.html").read_text()
    assert 'id="papermill-error-cell"' in broken  # the index's link lands on the failing cell
    for link in ['href="index.html"', 'href="01-slow.html" rel="prev"', 'href="03-quick.html" rel="next"']:
        assert link in broken


def test_progress_names_the_running_notebooks_and_a_slow_cell(tmp_path):
    notebook = write_notebook(tmp_path / "01-a.ipynb", "output_dir = 'x'", "train()", "")
    log = io.StringIO()
    progress = course.Progress([notebook], file=log)
    progress.report("01-a", None)
    assert progress.describe("01-a", time.time()) == "01-a starting"
    for line in ["output_dir = 'x'", "train()"]:
        progress.report("01-a", line)
    now = time.time()
    # Two code cells with code, and the injected parameters; the empty cell never runs.
    assert progress.describe("01-a", now) == "01-a cell 2/3"
    assert progress.describe("01-a", now + 12) == "01-a cell 2/3, 12 s in `train()`"
    progress.finish(NotebookRun(notebook, 3.0))
    progress.close()
    assert "01-a.ipynb done in 3 s -> no page" in log.getvalue() and not progress.running


def test_notebooks_are_found_in_order_and_filtered():
    names = [nb.name for nb in course.course_notebooks()]
    assert [n[:3] for n in names] == [f"{i:02d}-" for i in range(1, len(names) + 1)]
    assert [nb.name[:2] for nb in course.course_notebooks(["03", "01"])] == ["01", "03"]
