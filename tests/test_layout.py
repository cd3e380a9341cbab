"""The package's two parts: the LoRA library never imports the course (tiny model, data sets, figures)."""

import pkgutil
import subprocess
import sys

import lora_nb

LIBRARY = sorted(m.name for m in pkgutil.iter_modules(lora_nb.__path__) if m.name != "course")


def test_the_library_imports_nothing_of_the_course():
    assert {"layers", "inject", "formats", "train", "inference"} <= set(LIBRARY)
    imports = "; ".join(f"import lora_nb.{name}" for name in LIBRARY)
    check = f"{imports}; import sys; print(sorted(m for m in sys.modules if m.startswith('lora_nb.course')))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_the_course_runs_as_a_module():
    command = [sys.executable, "-m", "lora_nb.course", "--help"]
    out = subprocess.run(command, check=False, capture_output=True, text=True)
    assert out.returncode == 0 and "--out" in out.stdout, out.stderr
