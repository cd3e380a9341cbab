"""The course as a web site: `index.html`, the page a student opens first, and the links between the pages.

The index shows, per notebook in course order, its title, its "What you will learn" list, its key figure
(named in the notebook's metadata: `metadata["lora_nb"]["key_figure"]`, a file the notebook saves in its
`output_dir`), how its run went, and links to the executed notebook, its HTML page and Colab. It works
offline: the style sheet is inlined, there is no script, and nothing is fetched from the network.
"""

from __future__ import annotations

import html
import json
import re
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

COURSE_TITLE = "LoRA fine-tuning of Stable Diffusion, one notebook at a time"
COURSE_SUMMARY = (
    "Stable Diffusion stays frozen; LoRA trains small low-rank updates ΔW = B·A on its attention layers and "
    "ships them as a file of a few megabytes that goes back on an unmodified base model. These notebooks "
    "follow the Hugging Face blog post <cite>Using LoRA for Efficient Stable Diffusion Fine-Tuning</cite> "
    "(Cuenca &amp; Paul, 2023) and measure each step: why the updates can be low-rank, where they go in the "
    "UNet, teaching a model a style and a subject (DreamBooth), how big the files are, and using other "
    "people's adapters. Every notebook here ran on the course's tiny embedded model, on a CPU; open one in "
    "Colab to run it on SD 1.5 on a free T4 GPU."
)
# The notebooks' own "Open in Colab" badges are the one place the repository's address is written.
COLAB_URL = re.compile(r"https://colab\.research\.google\.com/github/[^\s)\"'<>]+")


@dataclass(frozen=True)
class Failure:
    """Why a notebook stopped, and where: `cell` is the failing cell's execution count (its `In [n]`)."""

    error: str
    cell: int | None = None
    source: str = ""  # the failing cell's first line

    def describe(self) -> str:
        where = ([f"In [{self.cell}]"] if self.cell else []) + ([f"`{self.source}`"] if self.source else [])
        return f"{' '.join(where)}: {self.error}" if where else self.error


@dataclass(frozen=True)
class NotebookRun:
    """One notebook's run: `executed` and `page` are None where they were not written."""

    notebook: Path
    seconds: float
    executed: Path | None = None
    page: Path | None = None
    failure: Failure | None = None


@dataclass(frozen=True)
class Lesson:
    """What the index says about a notebook, read from the notebook itself (title and list as HTML)."""

    title: str
    learn: str
    colab: str | None
    key_figure: str | None


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


# A letter's command swallows the spaces after it, as in TeX (`\Delta W` is ΔW); an operator's keeps them.
TEX_SYMBOLS = {
    r"\\Delta\s*": "Δ",
    r"\\alpha\s*": "α",
    r"\\top\b": "⊤",
    r"\\cdot\b": "·",
    r"\\times\b": "×",
    r"\\approx\b": "≈",
    r"\\,": "\u2009",
}


def tex_to_html(tex: str) -> str:
    """The little LaTeX the notebooks' prose uses, as HTML: MathJax would need a CDN; the index is offline.

    Symbols, `\\text{..}`, sub- and superscripts; any other command stays visible as written.
    """
    text = html.escape(tex, quote=False)
    text = re.sub(r"\\text\{([^}]*)\}", r"{\1}", text)  # a group, so `d_\text{in}` subscripts all of "in"
    for command, symbol in TEX_SYMBOLS.items():
        text = re.sub(command, symbol, text)
    text = re.sub(
        r"([_^])(\{[^}]*\}|[^\s{}])",
        lambda m: "<{0}>{1}</{0}>".format("sub" if m[1] == "_" else "sup", m[2].strip("{}")),
        text,
    )
    return f'<span class="math">{text.replace("{", "").replace("}", "")}</span>'


def markdown_to_html(text: str, inline: bool = False) -> str:
    import mistune  # nbconvert's markdown renderer

    maths: list[str] = []

    def set_aside(match: re.Match) -> str:  # before markdown, whose emphasis would eat the TeX's `_`
        maths.append(tex_to_html(match[1]))
        return f"MATH{len(maths) - 1}END"

    if inline:  # a title's "2. " is not a list
        text = re.sub(r"^(\d+)\. ", r"\1\\. ", text)
    rendered = mistune.create_markdown(escape=True)(re.sub(r"\$([^$\n]+)\$", set_aside, text)).strip()
    if inline:
        rendered = re.sub(r"^<p>(.*)</p>$", r"\1", rendered, flags=re.DOTALL)
    return re.sub(r"MATH(\d+)END", lambda m: maths[int(m[1])], rendered)


def read_lesson(notebook: Path) -> Lesson:
    """Title (the first `# ` heading), the list under "What you will learn", the Colab badge's address."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    prose = "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    title = next((line[2:] for line in prose.splitlines() if line.startswith("# ")), notebook.stem)
    _, marker, after = prose.partition("What you will learn")
    learn = after.partition("\n")[2].lstrip("\n").split("\n\n")[0] if marker else ""
    colab = COLAB_URL.search(prose)
    return Lesson(
        markdown_to_html(title, inline=True),
        markdown_to_html(learn),
        colab and colab[0],
        nb["metadata"].get("lora_nb", {}).get("key_figure"),
    )


def _link(href: str, text: str, css: str = "", **attributes: str) -> str:
    extra = "".join(f' {name}="{html.escape(value)}"' for name, value in attributes.items())
    css = f' class="{css}"' if css else ""
    return f'<a href="{html.escape(href)}"{css}{extra}>{text}</a>'


def _thumbnail(out: Path, notebook: Path, lesson: Lesson) -> str:
    """The key figure, linked to the page; where it was not drawn, a box saying so (never a broken image)."""
    figure = out / notebook.stem / lesson.key_figure if lesson.key_figure else None
    if figure is None or not figure.is_file():
        return '<div class="thumb missing">no figure: the notebook did not draw it</div>'
    from PIL import Image

    with Image.open(figure) as image:  # its size reserves the box before the image arrives
        width, height = image.size
    src = figure.relative_to(out).as_posix()
    img = (
        f'<img src="{html.escape(src)}" width="{width}" height="{height}" '
        f'alt="{html.escape(figure.stem)}: the key figure of this notebook">'
    )
    return _link(f"{notebook.stem}.html", img, "thumb") if (out / f"{notebook.stem}.html").is_file() else img


def _status(run: NotebookRun, page_text: str) -> str:
    took = format_duration(run.seconds)
    if run.failure is None:
        return f'<p class="status passed"><strong>✓ passed</strong> in {took}</p>'
    failure = run.failure
    where = html.escape(f"In [{failure.cell}]") if failure.cell else "a cell"
    if run.page and 'id="papermill-error-cell"' in page_text:  # papermill's anchor at the failing cell
        where = _link(f"{run.page.name}#papermill-error-cell", where)
    source = f" <code>{html.escape(failure.source)}</code>" if failure.source else ""
    return (
        f'<p class="status failed"><strong>✗ failed</strong> after {took} at {where}{source}: '
        f'<span class="error">{html.escape(failure.error)}</span></p>'
    )


def _lesson_item(out: Path, run: NotebookRun) -> str:
    lesson = read_lesson(run.notebook)
    page = run.page if run.page and run.page.is_file() else None
    executed = run.executed if run.executed and run.executed.is_file() else None
    title = _link(page.name, lesson.title) if page else lesson.title
    links = [
        _link(page.name, "Read it", "button primary") if page else "",
        _link(executed.name, "Executed notebook", "button", download="") if executed else "",
        _link(lesson.colab, "Open in Colab", "button", rel="noopener") if lesson.colab else "",
    ]
    learn = f"<h3>What you will learn</h3>\n{lesson.learn}" if lesson.learn else ""
    state = "failed" if run.failure else "passed"
    return (
        f'<li class="lesson {state}" id="{html.escape(run.notebook.stem)}">\n'
        f'{_thumbnail(out, run.notebook, lesson)}\n<div class="text">\n<h2>{title}</h2>\n'
        f"{_status(run, page.read_text(encoding='utf-8') if page else '')}\n{learn}\n"
        f'<p class="links">{" ".join(filter(None, links))}</p>\n</div>\n</li>'
    )


def _run_summary(runs: list[NotebookRun], parameters: dict | None) -> str:
    failed = [run for run in runs if run.failure]
    total = format_duration(sum(run.seconds for run in runs))
    when = time.strftime("%Y-%m-%d %H:%M")
    settings = ", ".join(f"<code>{html.escape(f'{k}={v!r}')}</code>" for k, v in (parameters or {}).items())
    summary = f"{len(runs)} notebooks ran in {total} on {when}, with {settings or 'their defaults'}: "
    if not failed:
        return f'<p class="summary passed">{summary}<strong>all passed</strong>.</p>'
    names = ", ".join(_link(f"#{run.notebook.stem}", html.escape(run.notebook.stem)) for run in failed)
    return f'<p class="summary failed">{summary}<strong>{len(failed)} failed</strong> ({names}).</p>'


def write_index(out: Path, runs: list[NotebookRun], parameters: dict | None = None) -> Path:
    """`out/index.html` for `runs`, in the order given (the course order)."""
    css = files("lora_nb.course").joinpath("course.css").read_text(encoding="utf-8")
    items = "\n".join(_lesson_item(out, run) for run in runs)
    index = out / "index.html"
    index.write_text(
        f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(COURSE_TITLE)}</title>
<style>
{css}</style>
</head>
<body>
<header>
<p class="kicker">lora_nb · a course in {len(runs)} notebooks</p>
<h1>{html.escape(COURSE_TITLE)}</h1>
<p class="lead">{COURSE_SUMMARY}</p>
{_run_summary(runs, parameters)}
</header>
<main>
<ol class="course">
{items}
</ol>
</main>
<footer>Written by <code>python -m lora_nb.course</code>. To run the notebooks yourself:
<code>bash scripts/env.sh &amp;&amp; .venv/bin/jupyter lab notebooks/</code>, or open one in Colab.</footer>
</body>
</html>
""",
        encoding="utf-8",
    )
    return index


PAGE_CSS = """<style>
.lora-nb-nav { display: grid; grid-template-columns: 1fr auto 1fr; gap: .5rem 2rem; align-items: baseline;
  max-width: 1200px; margin: 0 auto; padding: .75rem 1rem; font: 1rem/1.4 system-ui, sans-serif; }
.lora-nb-nav a { color: #1f4fa3; font-weight: 600; text-decoration: none; }
.lora-nb-nav a[rel="next"] { text-align: right; }
.lora-nb-nav a:hover, .lora-nb-nav a:focus { text-decoration: underline; }
@media (max-width: 40rem) { .lora-nb-nav { grid-template-columns: 1fr; }
  .lora-nb-nav a[rel="next"] { text-align: left; } }
</style>
"""


def page_nav(previous: Path | None, following: Path | None) -> str:
    """Links from a notebook's page to the index and to its neighbours in the course (source notebooks)."""

    def neighbour(notebook: Path | None, rel: str) -> str:
        if notebook is None:
            return "<span></span>"  # keeps the index link in the middle
        title = read_lesson(notebook).title
        return _link(f"{notebook.stem}.html", f"← {title}" if rel == "prev" else f"{title} →", rel=rel)

    return (
        f'<nav class="lora-nb-nav">{neighbour(previous, "prev")}'
        f"{_link('index.html', 'Course index')}{neighbour(following, 'next')}</nav>"
    )


def add_nav(page: str, nav: str) -> str:
    """nbconvert's page with `nav` above and below the notebook."""
    page = page.replace("</head>", PAGE_CSS + "</head>", 1)
    page = re.sub(r"<body[^>]*>", lambda m: m[0] + "\n" + nav, page, count=1)
    return page.replace("</body>", nav + "\n</body>", 1)
