"""What every benchmark shares: repeated, interleaved timing; medians and spread; targets; tables; the
machine."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- settings shared by every benchmark


@dataclass
class Settings:
    repeats: int = 5  # independent runs per variant; medians and spreads are over these
    quick: bool = False
    threads: int = (
        1  # torch.set_num_threads, the same for every measurement (and OMP_NUM_THREADS in subprocesses)
    )
    min_time: float = 1.0  # seconds each micro-benchmark repeat runs for, at least
    model: Path = ROOT / "data" / "tiny-sd"
    data: Path = ROOT / "data" / "creatures"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the libraries' progress bars, logging and warnings while measuring (datasets, diffusers,
    transformers): a bar redrawn to a terminal costs time, and the report should be readable."""
    import warnings

    import datasets
    import diffusers
    import transformers

    libraries = (datasets, diffusers, transformers)
    levels = [library.logging.get_verbosity() for library in libraries]
    datasets.disable_progress_bars()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for library in libraries:
        library.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        datasets.enable_progress_bars()
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
        for library, level in zip(libraries, levels, strict=True):
            library.logging.set_verbosity(level)


# ---------------------------------------------------------------- statistics


@dataclass
class Stat:
    """Repeated measurements of one quantity: report the median and the spread (min-max) over the repeats."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def lo(self) -> float:
        return min(self.samples)

    @property
    def hi(self) -> float:
        return max(self.samples)

    def fmt(self, scale: float = 1.0, unit: str = "", digits: int = 3) -> str:
        """E.g. "41.2 ms (39.8-44.0, n=5)": the median, then min-max over n repeats."""
        m, lo, hi = (_sig(v * scale, digits) for v in (self.median, self.lo, self.hi))
        sep = " " if unit and unit not in ("×", "%") else ""
        if len(self.samples) == 1:
            return f"{m}{sep}{unit} (n=1)"
        return f"{m}{sep}{unit} ({lo}–{hi}, n={len(self.samples)})"

    def ms(self) -> str:
        return self.fmt(1e3, "ms")

    def ratio(self) -> str:
        return self.fmt(1.0, "×")

    def target(self, name: str, limit: float, unit: str = "×", scale: float = 1.0) -> Target:
        """This measurement (its median, times ``scale``) judged against ``limit``."""
        return Target(
            name, self.median * scale, limit, unit, self.fmt(scale, unit), self.lo * scale, self.hi * scale
        )


def _sig(value: float, digits: int) -> str:
    """A number with about ``digits`` significant figures, never in scientific notation."""
    if value == 0 or not (abs(value) < float("inf")):
        return f"{value:g}"
    magnitude = len(str(int(abs(value)))) if abs(value) >= 1 else 0
    return f"{value:.{max(0, digits - magnitude)}f}"


def paired_ratio(numerator: Stat, denominator: Stat) -> Stat:
    """Ratios of measurements taken side by side in the same repeat (interleaved), one per repeat.

    Pairing cancels slow drifts of a busy machine that a ratio of two medians would keep.
    """
    return Stat([a / b for a, b in zip(numerator.samples, denominator.samples, strict=True)])


def geomean(values: Sequence[float]) -> float:
    """The geometric mean: the fair average of ratios (2× and 0.5× average to 1×)."""
    return math.exp(statistics.fmean(math.log(v) for v in values))


def geomean_target(name: str, ratios: Sequence[Stat], limit: float) -> Target:
    """Per-shape paired ratios judged together: the geometric mean of their medians against ``limit``, with
    the medians' range over the shapes beside it; flagged when any repeat of any shape lies across the
    limit."""
    medians = [r.median for r in ratios]
    return Target(
        name,
        geomean(medians),
        limit,
        spread=f"{min(medians):.3f}–{max(medians):.3f}× over {len(ratios)} shapes",
        lo=min(r.lo for r in ratios),
        hi=max(r.hi for r in ratios),
    )


# ---------------------------------------------------------------- timing


def time_per_call(fn: Callable[[], object], min_time: float, min_calls: int = 3) -> float:
    """Seconds per call of ``fn``: call it until ``min_time`` has passed (at least ``min_calls`` times)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= min_calls and elapsed >= min_time:
            return elapsed / calls


def interleave(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, Stat]:
    """Run each variant once per repeat, rotating the order every repeat; each call returns one measurement.

    Interleaving spreads a noisy neighbour's load evenly over the variants; rotating removes any order bias.
    """
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(variants[name]())
    return {name: Stat(values) for name, values in samples.items()}


def time_interleaved(calls: dict[str, Callable[[], object]], settings: Settings) -> dict[str, Stat]:
    """Seconds per call of each of ``calls``: each warmed up once, then timed interleaved, one sample a
    repeat."""
    for call in calls.values():
        call()  # warm-up
    return interleave(
        {name: (lambda c=c: time_per_call(c, settings.min_time)) for name, c in calls.items()},
        settings.repeats,
    )


# ---------------------------------------------------------------- results


@dataclass
class Target:
    """A measured value against a limit: PASS when ``value <= limit``."""

    name: str
    value: float
    limit: float
    unit: str = "×"
    spread: str = ""  # the measurement with its spread, for the reader
    lo: float | None = None  # the spread's ends, to flag a verdict the noise could flip
    hi: float | None = None

    @property
    def passed(self) -> bool:
        return self.value <= self.limit

    @property
    def verdict(self) -> str:
        verdict = "PASS" if self.passed else "MISS"
        if self.lo is not None and self.hi is not None and self.lo <= self.limit <= self.hi:
            verdict += " (limit within spread)"
        return verdict

    def row(self) -> list[str]:
        sep = "" if self.unit in ("×", "%") else " "
        value = f"{_sig(self.value, 4)}{sep}{self.unit}"  # one digit more than the limit: 1.004× vs ≤ 1.00×
        return [self.name, value, f"≤ {_sig(self.limit, 3)}{sep}{self.unit}", self.verdict, self.spread]


@dataclass
class Section:
    """One benchmark's results: a table, the targets it is judged by, and notes on what was measured."""

    title: str
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None  # why the section did not run (e.g. no CUDA)
    more_tables: list[tuple[str, list[str], list[list[str]]]] = field(
        default_factory=list
    )  # (caption, header, rows)

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.skipped:
            lines += [f"{'Incomplete' if self.rows else 'Skipped'}: {self.skipped}", ""]
        if self.rows:
            lines += [markdown_table(self.header, self.rows), ""]
        for caption, header, rows in self.more_tables:
            lines += [caption, ""] + ([markdown_table(header, rows), ""] if rows else [])
        if self.targets:
            lines += [markdown_table(TARGET_HEADER, [t.row() for t in self.targets]), ""]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"


TARGET_HEADER = ["target", "measured (median)", "limit", "verdict", "median (min–max, n)"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(settings: Settings) -> list[tuple[str, str]]:
    ram = total_ram_gb()
    items = [
        ("CPU", cpu_model()),
        ("logical cores", str(os.cpu_count())),
        (
            "usable cores (affinity)",
            str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else "n/a",
        ),
        ("RAM", f"{ram:.1f} GB" if ram else "n/a"),
        ("GPU", gpu_name()),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        (
            "torch threads",
            (
                f"{torch.get_num_threads()} (torch.set_num_threads; OMP_NUM_THREADS="
                f"{os.environ.get('OMP_NUM_THREADS', 'unset')})"
            ),
        ),
    ]
    versions = ", ".join(
        f"{name} {library_version(name)}"
        for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "papermill")
    )
    items.append(("libraries", versions))
    items.append(("mode", f"{'quick' if settings.quick else 'full'}: {settings.repeats} repeats per variant"))
    return items


def gpu_name() -> str:
    if not torch.cuda.is_available():
        return "none (CUDA not available)"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"


def library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
