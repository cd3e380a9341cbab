#!/usr/bin/env bash
# The main job: execute the whole course on the embedded default. Executed notebooks, their figures, HTML
# pages and index.html (the course site: open it first) go to outputs/course (or to the folder given as the
# first argument). A failed notebook stops none of the others; the site marks it, and the exit status is 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m lora_nb.course --out "${1:-outputs/course}"
