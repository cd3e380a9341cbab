"""The course's notebook suite: wall time and peak memory of ``python -m lora_nb.course --out <tmp>``.

The suite runs in a subprocess (which starts a Jupyter kernel per notebook). Peak memory is measured two ways:
- peak RSS of the whole process tree (the course runner plus its kernels, summed), sampled every 0.05 s
  with psutil (installed with ipykernel); a sampled peak can miss a spike shorter than the interval, and a
  sum of RSS counts pages shared between processes (torch's libraries) once per process: an upper bound;
- the largest single descendant's peak RSS from the kernel (``getrusage(RUSAGE_CHILDREN).ru_maxrss``),
  exact but per process, never summed. Without psutil only this one is reported.
The memory target is judged on the larger of the two.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from .common import ROOT, Section, Settings, Stat

WALL_LIMIT_MIN = 5.0
MEMORY_LIMIT_GB = 3.0


@dataclass
class SuiteRun:
    wall: float  # seconds
    tree_peak: float | None  # bytes, summed over the process tree, sampled
    largest_process_peak: float  # bytes, exact, largest single process
    notebooks: dict[str, float]  # seconds per notebook, as the course runner reports them
    failure: str | None = None  # why the suite stopped early; the numbers then cover the part that ran


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    continue  # ended between listing and reading
            self.peak = max(self.peak, total)
            self.done.wait(self.interval)


def have_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def notebook_times(output: str) -> dict[str, float]:
    """{notebook: seconds} from the runner's "NN-topic.ipynb done in N s -> page" lines."""
    times = {}
    for line in output.splitlines():
        name, found, rest = line.partition(".ipynb done in ")
        if found:
            times[name + ".ipynb"] = float(rest.split()[0])
    return dict(sorted(times.items()))


def run_suite(only: list[str] | None = None) -> SuiteRun:
    # As scripts/course.sh runs it: the runner picks its notebooks at a time and their threads itself.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="lora_nb-course-") as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        command = [sys.executable, "-m", "lora_nb.course", "--out", out] + (["--only", *only] if only else [])
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        sampler = TreeSampler(process.pid) if have_psutil() else None
        if sampler:
            sampler.start()
        output, _ = process.communicate()
        wall = time.perf_counter() - start
        if sampler:
            sampler.done.set()
            sampler.join()
        after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    failure = None
    if process.returncode != 0:
        lines = [line for line in output.splitlines() if "Failed" in line or "Error" in line][-1:]
        failure = (
            f"the notebook suite failed after {wall:.0f} s (exit {process.returncode}): "
            f"{' '.join(lines) or output[-500:]}"
        )
    # ru_maxrss is in kilobytes on Linux (bytes on macOS), and a maximum over all children waited for so far:
    # a value not above the earlier one means this run's largest process was no larger than that.
    scale = 1 if sys.platform == "darwin" else 1024
    return SuiteRun(
        wall, sampler.peak if sampler else None, max(after, before) * scale, notebook_times(output), failure
    )


def benchmark(settings: Settings, repeats: int = 1, only: list[str] | None = None) -> Section:
    runs = []
    for _ in range(repeats):
        runs.append(run_suite(only))
        if runs[-1].failure:
            runs = runs[-1:]  # report the failed run alone, as far as it got
            break
    wall = Stat([r.wall for r in runs])
    largest = Stat([r.largest_process_peak for r in runs])
    tree = Stat([r.tree_peak for r in runs]) if runs[0].tree_peak is not None else None
    # A sampled sum can miss a short spike that getrusage's exact per-process peak catches: judge the larger.
    memory = Stat([max(r.tree_peak or 0, r.largest_process_peak) for r in runs])
    rows = [
        ["wall time", wall.fmt(1 / 60, "min")],
        [
            "peak RSS, whole process tree (sampled every 0.05 s)",
            tree.fmt(1e-9, "GB") if tree else "psutil missing",
        ],
        ["peak RSS, largest single process (getrusage)", largest.fmt(1e-9, "GB")],
    ]
    rows += [
        [f"wall time of {name}", Stat([r.notebooks[name] for r in runs]).fmt(1, "s")]
        for name in runs[0].notebooks
    ]
    failure = runs[0].failure
    subset = f" (only {', '.join(only)})" if only else ""
    targets = [
        wall.target(f"notebook suite wall time{subset}", WALL_LIMIT_MIN, "min", 1 / 60),
        memory.target(
            f"notebook suite peak memory{subset} (larger of tree and process peaks)",
            MEMORY_LIMIT_GB,
            "GB",
            1e-9,
        ),
    ]
    from lora_nb.course.runner import course_notebooks

    names = ", ".join(nb.name for nb in course_notebooks(only))
    notes = [
        (
            f"`python -m lora_nb.course --out <tmp>` on the embedded default: {names}; executed notebooks "
            "and HTML pages are written (to a temporary folder), as the README's main job does: the "
            "runner's own default of one notebook per core on a CPU, the cores split between their "
            "kernels; `--threads` does not apply."
        ),
        (
            "The getrusage peak is over every child this benchmark process has waited for, so it is the "
            "largest process of the runs so far."
        ),
    ]
    if failure:
        rows = [[f"{quantity} (until the failure)", value] for quantity, value in rows]
        return Section(
            "Notebook suite (papermill)",
            ["quantity", "median (min–max, n)"],
            rows,
            [],
            notes,
            skipped=f"targets not judged: {failure}",
        )
    return Section("Notebook suite (papermill)", ["quantity", "median (min–max, n)"], rows, targets, notes)
