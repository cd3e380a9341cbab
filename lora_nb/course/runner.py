"""Run the course: every notebook through papermill, in order, then HTML pages and an index to browse.

    python -m lora_nb.course --out outputs/course          # the whole course, embedded default
    python -m lora_nb.course --out out --only 03 -p max_train_steps 50
    python -m lora_nb.course --jobs 1                      # one notebook at a time

On a CPU the notebooks run side by side, one per core, the cores split between their kernels; with a GPU,
one at a time. A progress bar counts the notebooks done and names those running, with the cell that is
running when it is slow; a table sums the run up at the end.

Each notebook gets its own `output_dir` parameter (a folder under `--out`) for the figures and files it
writes. A failing cell is reported with its notebook and cell number; the other notebooks still run, the
site still marks the failure, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from lora_nb.course.site import Failure, NotebookRun, add_nav, format_duration, page_nav, write_index

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"  # lora_nb/course/ -> the repository


class NotebookFailed(RuntimeError):
    def __init__(self, message: str, failure: Failure):
        super().__init__(message)
        self.failure = failure


def course_notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks `NN-topic.ipynb`, in order; `only` keeps those starting with a prefix in it."""
    found = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]-*.ipynb"))
    return [nb for nb in found if not only or any(nb.name.startswith(p) for p in only)]


def _kernel_manager_class():
    """On Unix, each kernel talks over Unix sockets of its own (a fresh name in the temporary folder).

    Over TCP, a kernel's ports are picked free and then released before the kernel binds them, so two
    notebooks started at the same moment (pytest-xdist, two course runs) can pick the same port and one
    waits forever.
    """
    from jupyter_client import AsyncKernelManager

    if os.name != "posix":
        return AsyncKernelManager

    class UnixSocketKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(
                transport="ipc", ip=str(Path(tempfile.gettempdir()) / f"kernel-{uuid.uuid4().hex}"), **kwargs
            )

    return UnixSocketKernelManager


def run_notebook(
    notebook: Path,
    out: Path,
    parameters: dict | None = None,
    cell_timeout: float | None = None,
    on_cell: Callable[[dict], None] | None = None,
) -> Path:
    """Execute `notebook` with papermill into `out/<name>`; its `output_dir` parameter is `out/<stem>`.

    `cell_timeout` (seconds; None: no limit) turns a cell that hangs into a failure that names it.
    `on_cell(cell)` is called as each code cell starts. The executed notebook is kept when a cell fails.
    """
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    out.mkdir(parents=True, exist_ok=True)
    executed = out / notebook.name
    parameters = {"output_dir": str((out / notebook.stem).resolve()), **(parameters or {})}
    current = {}

    def cell_started(cell, cell_index):
        current["cell"] = cell  # a timeout or a dead kernel does not say which cell it was
        if on_cell:
            on_cell(cell)

    try:
        papermill.execute_notebook(
            str(notebook),
            str(executed),
            parameters=parameters,
            cwd=str(notebook.parent),
            progress_bar=False,
            kernel_name="python3",
            execution_timeout=cell_timeout,
            kernel_manager_class=_kernel_manager_class(),
            on_cell_execute=cell_started,
        )
    except PapermillExecutionError as error:
        failure = Failure(f"{error.ename}: {error.evalue}", error.exec_count, _first_line(error.source))
        raise NotebookFailed(
            f"{notebook.name}: cell {error.exec_count} (index {error.cell_index}) failed: {failure.error}",
            failure,
        ) from None
    except (CellTimeoutError, DeadKernelError) as error:  # a timeout's message quotes the cell
        cell = current.get("cell", {})
        failure = Failure(
            str(error).splitlines()[0], cell.get("execution_count"), _first_line(cell.get("source", ""))
        )
        raise NotebookFailed(f"{notebook.name}: {error}", failure) from None
    return executed


def _first_line(source: str, width: int = 60) -> str:
    line = next((line.strip() for line in source.splitlines() if line.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "…"


def to_html(executed: Path, nav: str = "") -> Path:
    """The executed notebook as a page beside it, with `nav` (links to the index and its neighbours)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(executed))
    page = executed.with_suffix(".html")
    page.write_text(add_nav(body, nav) if nav else body, encoding="utf-8")
    return page


def _run_and_render(notebook: Path, out: Path, parameters: dict | None, nav: str, progress) -> NotebookRun:
    """In a worker: run and render (a failed notebook too: its page shows the error), report to `progress`."""
    progress.put((notebook.stem, None))
    start, failure = time.time(), None
    try:
        executed = run_notebook(
            notebook,
            out,
            parameters,
            on_cell=lambda cell: progress.put((notebook.stem, _first_line(cell["source"]))),
        )
    except NotebookFailed as error:
        executed, failure = out / notebook.name, error.failure
    seconds = time.time() - start
    if not executed.is_file():  # the kernel never started
        return NotebookRun(notebook, seconds, failure=failure)
    return NotebookRun(notebook, seconds, executed, to_html(executed, nav), failure)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_jobs(notebooks: int) -> int:
    """One notebook per core on a CPU; one at a time when a GPU is there to share."""
    import torch

    return 1 if torch.cuda.is_available() else max(1, min(usable_cores(), notebooks))


def _set_threads(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)


class Progress:
    """A tqdm bar over the notebooks; its text names those running, their cell, and the cell's code when slow.

    Workers report `(stem, None)` as a notebook starts and `(stem, first line)` as each code cell starts.
    """

    SLOW = 10  # seconds in one cell before its code is shown

    def __init__(self, notebooks: list[Path], file=None):
        from tqdm.auto import tqdm

        file = file or sys.stderr
        # papermill adds a cell, the injected parameters; nbclient reports only the code cells it runs.
        self.cells = {nb.stem: _code_cells(nb) + 1 for nb in notebooks}
        self.running: dict[str, tuple[int, str, float]] = {}  # stem -> (cells started, its code, since)
        self.file = file
        # Notebooks take minutes each: a rate or an estimate from them would mislead.
        bar = "{desc}: {n_fmt}/{total_fmt} notebooks |{bar:20}| {elapsed}{postfix}"
        self.bar = tqdm(total=len(notebooks), desc="course", bar_format=bar, file=file, dynamic_ncols=True)
        self.interval = 1 if file.isatty() else 30  # a log file gets a line now and then, not one a second
        self.shown = 0.0

    def report(self, stem: str, line: str | None) -> None:
        count = self.running.get(stem, (0, "", 0.0))[0]
        self.running[stem] = (count + (line is not None), line or "", time.time())

    def finish(self, run: NotebookRun) -> None:
        self.running.pop(run.notebook.stem, None)
        # benchmarks/notebooks.py reads the times from the "NN-topic.ipynb done in N s" lines.
        name, seconds = run.notebook.name, f"{run.seconds:.0f} s"
        done = f"FAILED after {seconds}: {run.failure.describe()}" if run.failure else f"done in {seconds}"
        self.bar.write(f"{name} {done} -> {run.page or 'no page'}", file=self.file)
        self.show(force=True)  # before the count moves, so no redraw names a notebook that is done
        self.bar.update()

    def show(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self.shown >= self.interval:
            self.bar.set_postfix_str("; ".join(self.describe(stem, now) for stem in self.running))
            self.shown = now

    def describe(self, stem: str, now: float) -> str:
        count, line, since = self.running[stem]
        if not count:
            return f"{stem} starting"
        slow = f", {now - since:.0f} s in `{line}`" if now - since >= self.SLOW else ""
        return f"{stem} cell {count}/{self.cells[stem]}{slow}"

    def close(self) -> None:
        self.bar.close()


def _code_cells(notebook: Path) -> int:
    import nbformat

    return sum(c.cell_type == "code" and bool(c.source.strip()) for c in nbformat.read(notebook, 4).cells)


def summary_table(runs: list[NotebookRun]) -> str:
    """The run as a table for the terminal: one line per notebook, then the totals."""
    width = max(len("notebook"), *(len(run.notebook.stem) for run in runs))
    lines = [f"{'notebook':<{width}}  {'status':<6}  {'time':>10}"]
    for run in runs:
        status, why = ("FAILED", run.failure.describe()) if run.failure else ("passed", "")
        lines.append(
            f"{run.notebook.stem:<{width}}  {status:<6}  {format_duration(run.seconds):>10}  {why}".rstrip()
        )
    failed = sum(run.failure is not None for run in runs)
    lines.append(
        f"{len(runs)} notebooks, {len(runs) - failed} passed, {failed} failed, "
        f"{format_duration(sum(run.seconds for run in runs))} of notebook time"
    )
    return "\n".join(lines)


def run_course(
    out: Path, only: list[str] | None = None, parameters: dict | None = None, jobs: int | None = None
) -> tuple[Path, list[NotebookRun]]:
    """Execute the notebooks (`jobs` at a time), render each to HTML, and show them in order in index.html.

    A notebook that fails does not stop the others; its run carries the failure. Returns the index and the
    runs in course order.
    """
    notebooks = course_notebooks(only)
    jobs = jobs or default_jobs(len(notebooks))
    context = multiprocessing.get_context("spawn")
    # Side by side, more threads than cores would make every kernel crawl; the workers' kernels inherit this.
    threads = {"initializer": _set_threads, "initargs": (max(1, usable_cores() // jobs),)} if jobs > 1 else {}
    print(f"running {len(notebooks)} notebooks, {jobs} at a time, into {out}", flush=True)
    neighbours = zip([None, *notebooks[:-1]], notebooks[1:] + [None])
    navs = {nb: page_nav(previous, following) for nb, (previous, following) in zip(notebooks, neighbours)}
    progress = Progress(notebooks)
    runs = {}
    with context.Manager() as manager, ProcessPoolExecutor(jobs, mp_context=context, **threads) as pool:
        cells = manager.Queue()
        running = {pool.submit(_run_and_render, nb, out, parameters, navs[nb], cells): nb for nb in notebooks}
        pending = set(running)
        try:
            while pending:
                done, pending = wait(pending, timeout=1, return_when=FIRST_COMPLETED)
                while not cells.empty():  # before `done`: a finished notebook's last reports are already here
                    progress.report(*cells.get())
                for future in done:
                    runs[running[future]] = _result(future, running[future])
                    progress.finish(runs[running[future]])
                progress.show()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # on Ctrl-C the notebooks running finish; no new ones start
            raise
        finally:
            progress.close()
    ordered = [runs[nb] for nb in notebooks]
    print(summary_table(ordered), flush=True)
    return write_index(out, ordered, parameters), ordered


def _result(future, notebook: Path) -> NotebookRun:
    """The worker's run; where the worker itself failed (a crash, not a cell), a failed run saying why."""
    try:
        return future.result()
    except Exception as error:  # noqa: BLE001 - one notebook's breakage must not stop the course
        return NotebookRun(notebook, 0.0, failure=Failure(f"{type(error).__name__}: {error}"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/course"))
    parser.add_argument("--only", nargs="*", help="notebook number prefixes, e.g. 01 03")
    parser.add_argument(
        "--jobs", type=int, help="notebooks run at once (default: one per core; 1 with a GPU)"
    )
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a papermill parameter for every notebook (value read as Python literal if it can be)",
    )
    args = parser.parse_args(argv)
    import ast

    parameters = {}
    for name, value in args.parameter:
        try:
            parameters[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parameters[name] = value
    index, runs = run_course(args.out, args.only, parameters, args.jobs)
    print(f"course written: {index}")
    failed = [run.notebook.name for run in runs if run.failure]
    if failed:
        sys.exit(f"{len(failed)} notebook(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
