"""The course site from fake runs (no kernel): the index is parsed, then shown in headless Chromium."""

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import nbformat
import numpy as np
import pytest
from PIL import Image

from lora_nb.course.runner import course_notebooks
from lora_nb.course.site import (
    Failure,
    NotebookRun,
    add_nav,
    markdown_to_html,
    page_nav,
    read_lesson,
    write_index,
)

COLAB = "https://colab.research.google.com/github/lora-nb/lora_nb/blob/main/notebooks/"
# Each figure is one saturated colour, so a screenshot shows whether it was drawn.
FIGURES = {"01-first": (220, 30, 30), "02-second": (30, 60, 220)}


def lesson_notebook(path: Path, title: str, key_figure: str | None = "key.png") -> Path:
    prose = (
        f"# {title}\n\n[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"({COLAB}{path.name})\n\nWhy this matters.\n\n**What you will learn**\n\n"
        f"- the update $\\Delta W = BA$ of rank $r$, with `to_q`;\n"
        f"- its size, $r(d_\\text{{in}} + d_\\text{{out}})$.\n\n"
        "More prose, not in the list."
    )
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell(prose), nbformat.v4.new_code_cell("x = 1")]
    )
    if key_figure:
        nb.metadata["lora_nb"] = {"key_figure": key_figure}
    nbformat.write(nb, path)
    return path


def fake_run(out: Path, notebook: Path, seconds: float, failure: Failure | None = None) -> NotebookRun:
    """What a run leaves in `out`: the executed notebook and its page (papermill's anchor where it failed)."""
    executed = out / notebook.name
    shutil.copy(notebook, executed)
    anchor = '<span id="papermill-error-cell">stopped here</span>' if failure else ""
    page = out / f"{notebook.stem}.html"
    page.write_text(f"<html><head></head><body><p>{notebook.stem}</p>{anchor}</body></html>")
    return NotebookRun(notebook, seconds, executed, page, failure)


@pytest.fixture
def site(tmp_path):
    """Three notebooks: 01 passed, 02 failed at In [3], 03 passed but drew no key figure."""
    sources, out = tmp_path / "notebooks", tmp_path / "site"
    sources.mkdir()
    out.mkdir()
    notebooks = [
        lesson_notebook(sources / "01-first.ipynb", "1. First: low rank"),
        lesson_notebook(sources / "02-second.ipynb", "2. Second: attention"),
        lesson_notebook(sources / "03-third.ipynb", "3. Third: no figure"),
    ]
    for stem, colour in FIGURES.items():
        (out / stem).mkdir()
        figure = np.full((240, 320, 3), colour, np.uint8)
        figure[::40] = 255  # some structure, as a plot has
        Image.fromarray(figure).save(out / stem / "key.png")
    failure = Failure("AssertionError: the loss did not fall", 3, "assert losses[-1] < losses[0]")
    runs = [
        fake_run(out, notebooks[0], 14.0),
        fake_run(out, notebooks[1], 75.0, failure),
        fake_run(out, notebooks[2], 3.0),
    ]
    return write_index(out, runs), runs


class Elements(HTMLParser):
    """Every start tag with its attributes, in document order."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def all(self, tag: str, attribute: str) -> list[str]:
        return [attrs[attribute] for t, attrs in self.tags if t == tag and attribute in attrs]


def test_every_link_and_image_resolves_to_a_file_in_the_output_folder(site):
    index, _ = site
    out, page = index.parent, Elements(index.read_text())
    links, images = page.all("a", "href"), page.all("img", "src")
    assert len(images) == len(FIGURES) and links
    for target in links + images:
        url = urlsplit(target)
        if url.scheme:  # the only way off the site is to Colab, by a click
            assert target.startswith(COLAB), target
            continue
        file = (out / url.path).resolve() if url.path else index
        assert file.is_file() and file.is_relative_to(out.resolve()), target
        if url.fragment:
            assert f'id="{url.fragment}"' in file.read_text(), target


def test_nothing_is_fetched_from_the_network(site):
    index, _ = site
    page = Elements(index.read_text())
    assert not [t for t, _ in page.tags if t in {"script", "link", "iframe", "object", "embed"}]
    assert "url(" not in index.read_text() and "@import" not in index.read_text()
    assert not [src for src in page.all("img", "src") if urlsplit(src).scheme]


def test_the_index_shows_the_course_in_order_with_what_each_notebook_teaches(site):
    index, runs = site
    text, page = index.read_text(), Elements(index.read_text())
    lessons = [attrs["id"] for tag, attrs in page.tags if tag == "li" and "lesson" in attrs.get("class", "")]
    assert lessons == ["01-first", "02-second", "03-third"]
    assert text.index("1. First: low rank") < text.index("2. Second: attention") < text.index("3. Third")
    assert "<ol start" not in text  # a title's "1. " stays a title, not a list
    assert text.count("What you will learn") == 3 and "More prose" not in text
    assert '<span class="math">ΔW = BA</span>' in text and "<code>to_q</code>" in text
    assert "<sub>in</sub>" in text and "$" not in text  # the TeX is typeset without MathJax
    for run in runs:
        assert f'href="{run.notebook.stem}.html"' in text and f'href="{run.notebook.name}"' in text
        assert f'href="{COLAB}{run.notebook.name}"' in text
    assert 'src="01-first/key.png" width="320" height="240"' in text


def lesson_html(text: str, stem: str) -> str:
    start = text.index(f'id="{stem}"')
    return text[start : text.index("</li>\n<li", start) if "</li>\n<li" in text[start:] else None]


def test_a_failed_notebook_is_marked_with_its_failing_cell(site):
    index, _ = site
    text = index.read_text()
    failed = lesson_html(text, "02-second")
    assert 'class="lesson failed"' in text and "✗ failed" in failed and "after 1 min 15 s" in failed
    assert 'href="02-second.html#papermill-error-cell">In [3]</a>' in failed  # jumps to the failing cell
    assert "<code>assert losses[-1] &lt; losses[0]</code>" in failed and "the loss did not fall" in failed
    assert "✓ passed" in lesson_html(text, "01-first") and "✓ passed" in lesson_html(text, "03-third")
    assert '<strong>1 failed</strong> (<a href="#02-second">02-second</a>)' in text


def test_a_missing_key_figure_is_said_not_shown_broken(site):
    index, _ = site
    third = lesson_html(index.read_text(), "03-third")
    assert "<img" not in third and "no figure" in third


def test_a_page_links_to_the_index_and_its_neighbours(tmp_path):
    first, second, third = (lesson_notebook(tmp_path / f"0{i}-n.ipynb", f"{i}. N{i}") for i in (1, 2, 3))
    page = add_nav("<html><head></head><body class='x'><p>body</p></body></html>", page_nav(first, third))
    links = Elements(page).all("a", "href")
    assert links == ["01-n.html", "index.html", "03-n.html"] * 2  # above and below the notebook
    assert "← 1. N1" in page and "3. N3 →" in page and page.index("<style>") < page.index("</head>")
    ends = Elements(add_nav("<body></body>", page_nav(None, second))).all("a", "href")
    assert ends[:2] == ["index.html", "02-n.html"]


def test_the_lesson_is_read_from_the_notebook(tmp_path):
    lesson = read_lesson(lesson_notebook(tmp_path / "05-x.ipynb", "5. Sizes", key_figure=None))
    assert lesson.title == "5. Sizes" and lesson.key_figure is None
    assert lesson.colab == f"{COLAB}05-x.ipynb"
    assert lesson.learn.count("<li>") == 2
    assert markdown_to_html("a <b> *c*", inline=True) == "a &lt;b&gt; <em>c</em>"


def test_the_real_notebooks_mark_a_key_figure_they_save():
    for notebook in course_notebooks():
        lesson = read_lesson(notebook)
        code = "\n".join(c.source for c in nbformat.read(notebook, 4).cells if c.cell_type == "code")
        assert lesson.key_figure and f'save_figure(fig, output_dir, "{lesson.key_figure[:-4]}")' in code
        assert lesson.key_figure.endswith(".png") and lesson.colab and lesson.learn.count("<li>") >= 3


def chromium() -> str:
    found = next(filter(None, map(shutil.which, ["chromium", "chromium-browser", "google-chrome"])), None)
    if found is None:
        pytest.skip(
            "no chromium on PATH: install Debian's `chromium` (scripts/test.sh does when it is missing)"
        )
    return found


def browse(page: Path, profile: Path, width: int, height: int, *args: str) -> str:
    # Its own profile, so two tests (pytest-xdist) can browse at once; any host lookup fails: offline.
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--window-size={width},{height}",
        "--virtual-time-budget=5000",
        *args,
        page.as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


PROBE = """<script>
addEventListener("load", () => {
  for (const img of document.images) img.dataset.loadedWidth = img.complete ? img.naturalWidth : 0;
  document.body.dataset.overflow = document.documentElement.scrollWidth - innerWidth;
});
</script>
</body>"""


@pytest.mark.parametrize("width", [1280, 390], ids=["projector", "phone"])
def test_the_index_renders_in_chromium_with_its_thumbnails(site, tmp_path, width):
    index, _ = site
    # A copy beside the index, with a script that writes into the DOM what the browser loaded and laid out.
    probe = index.with_name("probe.html")
    probe.write_text(index.read_text().replace("</body>", PROBE))
    # --dump-dom lays a page out at least 500 px wide; the screenshot below honours the phone's 390.
    dom = Elements(browse(probe, tmp_path / "profile", max(width, 500), 900, "--dump-dom"))
    assert [int(w) for w in dom.all("img", "data-loaded-width")] == [320, 320]  # both thumbnails decoded
    assert int(dom.all("body", "data-overflow")[0]) <= 0  # nothing wider than the screen: no sideways scroll

    shot = tmp_path / "index.png"
    browse(index, tmp_path / "profile", width, 2400, f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2400, width)
    assert pixels.std() > 30  # not a blank page
    background = pixels[5, 5]
    assert (np.abs(pixels - background).sum(-1) > 60).mean() > 0.05  # text and cards, not an empty page
    for colour in FIGURES.values():  # each thumbnail is on screen, drawn
        assert (np.abs(pixels - colour).sum(-1) < 30).sum() > 2000, f"thumbnail {colour} not drawn"
