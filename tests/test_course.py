"""The course runner: failures name the notebook and cell; the output folder is browsable without a kernel."""

import nbformat
import pytest

from lora_nb import course


def write_notebook(path, *sources):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_a_failing_cell_is_named_and_the_run_is_kept(tmp_path):
    notebook = write_notebook(tmp_path / "09-broken.ipynb", "output_dir = 'x'", "print(output_dir)",
                              "assert False, 'x is not 2'")
    out = tmp_path / "out"
    with pytest.raises(course.NotebookFailed, match=r"09-broken.ipynb: cell \d+ \(index \d+\) failed: "
                                                    r"AssertionError: x is not 2"):
        course.run_notebook(notebook, out)
    executed = nbformat.read(out / "09-broken.ipynb", as_version=4)  # kept, to read what happened
    printed = [o["text"] for c in executed.cells for o in c.get("outputs", []) if o.get("name") == "stdout"]
    assert printed == [str((out / "09-broken").resolve()) + "\n"]  # the runner's output_dir was injected


def test_a_hanging_cell_fails_and_is_named(tmp_path):
    notebook = write_notebook(tmp_path / "09-hangs.ipynb", "output_dir = 'x'", "import time\ntime.sleep(60)")
    with pytest.raises(course.NotebookFailed, match=r"(?s)09-hangs.ipynb: .*timed out.*time.sleep\(60\)"):
        course.run_notebook(notebook, tmp_path / "out", cell_timeout=2)


def test_notebooks_run_side_by_side_and_the_index_keeps_their_order(tmp_path, monkeypatch):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder / "01-slow.ipynb", "output_dir = 'x'", "import time\ntime.sleep(1)")
    write_notebook(folder / "02-quick.ipynb", "output_dir = 'x'", "print('hello')")
    monkeypatch.setattr(course, "NOTEBOOKS_DIR", folder)
    html = course.run_course(tmp_path / "out", jobs=2).read_text()
    assert html.index('href="01-slow.html"') < html.index('href="02-quick.html"')  # 02 finished first
    assert "hello" in (tmp_path / "out" / "02-quick.html").read_text()


def test_index_links_the_pages_in_order(tmp_path):
    pages = [(tmp_path / "01-first.html", 3.0), (tmp_path / "02-second.html", 4.0)]
    html = course.write_index(tmp_path, pages).read_text()
    assert html.index('href="01-first.html"') < html.index('href="02-second.html"')


def test_notebooks_are_found_in_order_and_filtered():
    names = [nb.name for nb in course.course_notebooks()]
    assert names == sorted(names) and names[0].startswith("01-")
    assert [nb.name[:2] for nb in course.course_notebooks(["03", "01"])] == ["01", "03"]
