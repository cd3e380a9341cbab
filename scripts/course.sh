#!/usr/bin/env bash
# The main job: execute the whole course on the embedded default; executed notebooks, figures and HTML
# (with index.html) go to outputs/course, or to the folder given as the first argument.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m lora_nb.course --out "${1:-outputs/course}"
