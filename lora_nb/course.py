"""Run the course: every notebook through papermill, in order, then HTML pages and an index to browse.

    python -m lora_nb.course --out outputs/course          # the whole course, embedded default
    python -m lora_nb.course --out out --only 03 -p max_train_steps 50
    python -m lora_nb.course --jobs 1                      # one notebook at a time

On a CPU the notebooks run side by side, one per core, the cores split between their kernels; with a GPU,
one at a time.

Each notebook gets its own `output_dir` parameter (a folder under `--out`) for the figures and files it
writes. A failing cell is reported with its notebook and cell number.
"""

from __future__ import annotations

import argparse
import html
import multiprocessing
import os
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


class NotebookFailed(RuntimeError):
    pass


def course_notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks `NN-topic.ipynb`, in order; `only` keeps those whose name starts with a prefix."""
    found = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]-*.ipynb"))
    return [nb for nb in found if not only or any(nb.name.startswith(p) for p in only)]


def _kernel_manager_class():
    """On Unix, each kernel talks over Unix sockets of its own (a fresh name in the temporary folder).

    Over TCP, a kernel's ports are picked free and then released before the kernel binds them, so two notebooks
    started at the same moment (pytest-xdist, two course runs) can pick the same port and one waits forever.
    """
    from jupyter_client import AsyncKernelManager

    if os.name != "posix":
        return AsyncKernelManager

    class UnixSocketKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(transport="ipc", ip=str(Path(tempfile.gettempdir()) / f"kernel-{uuid.uuid4().hex}"),
                             **kwargs)

    return UnixSocketKernelManager


def run_notebook(notebook: Path, out: Path, parameters: dict | None = None,
                 cell_timeout: float | None = None) -> Path:
    """Execute `notebook` with papermill into `out/<name>`; its `output_dir` parameter is `out/<stem>`.

    `cell_timeout` (seconds; None: no limit) turns a cell that hangs into a failure that names it.
    """
    import papermill
    from nbclient.exceptions import CellTimeoutError
    from papermill.exceptions import PapermillExecutionError

    out.mkdir(parents=True, exist_ok=True)
    executed = out / notebook.name
    parameters = {"output_dir": str((out / notebook.stem).resolve()), **(parameters or {})}
    try:
        papermill.execute_notebook(str(notebook), str(executed), parameters=parameters, cwd=str(notebook.parent),
                                   progress_bar=False, kernel_name="python3", execution_timeout=cell_timeout,
                                   kernel_manager_class=_kernel_manager_class())
    except PapermillExecutionError as error:
        raise NotebookFailed(f"{notebook.name}: cell {error.exec_count} (index {error.cell_index}) failed: "
                             f"{error.ename}: {error.evalue}") from None
    except CellTimeoutError as error:  # its message quotes the cell
        raise NotebookFailed(f"{notebook.name}: {error}") from None
    return executed


def to_html(executed: Path) -> Path:
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(executed))
    page = executed.with_suffix(".html")
    page.write_text(body, encoding="utf-8")
    return page


def write_index(out: Path, pages: list[tuple[Path, float]]) -> Path:
    items = "\n".join(f'<li><a href="{html.escape(p.name)}">{html.escape(p.stem)}</a> ({seconds:.0f} s)</li>'
                      for p, seconds in pages)
    index = out / "index.html"
    index.write_text(f"<!doctype html>\n<meta charset='utf-8'>\n<title>lora_nb course</title>\n"
                     f"<h1>lora_nb: LoRA fine-tuning of Stable Diffusion</h1>\n<ol>\n{items}\n</ol>\n")
    return index


def _run_and_render(notebook: Path, out: Path, parameters: dict | None) -> tuple[Path, float]:
    start = time.time()
    page = to_html(run_notebook(notebook, out, parameters))
    return page, time.time() - start


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs(notebooks: int) -> int:
    """One notebook per core on a CPU; one at a time when a GPU is there to share."""
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(usable_cores(), notebooks))


def _set_threads(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)


def run_course(out: Path, only: list[str] | None = None, parameters: dict | None = None,
               jobs: int | None = None) -> Path:
    """Execute the notebooks (`jobs` at a time), render each to HTML, and link them in order from index.html."""
    notebooks = course_notebooks(only)
    jobs = jobs or default_jobs(len(notebooks))
    # Side by side, more threads than cores would make every kernel crawl; the workers' kernels inherit this.
    threads = {"initializer": _set_threads, "initargs": (max(1, usable_cores() // jobs),)} if jobs > 1 else {}
    print(f"running {len(notebooks)} notebooks, {jobs} at a time", flush=True)
    pages = {}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), **threads) as pool:
        running = {pool.submit(_run_and_render, nb, out, parameters): nb for nb in notebooks}
        for future in as_completed(running):
            try:
                pages[running[future]] = future.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # the notebooks already running finish; no new ones start
                raise
            page, seconds = pages[running[future]]
            print(f"{running[future].name} done in {seconds:.0f} s -> {page}", flush=True)
    return write_index(out, [pages[nb] for nb in notebooks])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/course"))
    parser.add_argument("--only", nargs="*", help="notebook number prefixes, e.g. 01 03")
    parser.add_argument("--jobs", type=int, help="notebooks run at once (default: one per core; 1 with a GPU)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a papermill parameter for every notebook (value read as Python literal if it can be)")
    args = parser.parse_args(argv)
    import ast

    parameters = {}
    for name, value in args.parameter:
        try:
            parameters[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parameters[name] = value
    index = run_course(args.out, args.only, parameters, args.jobs)
    print(f"course written: {index}")


if __name__ == "__main__":
    main()
