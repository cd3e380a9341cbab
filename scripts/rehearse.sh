#!/usr/bin/env bash
# Real mode rehearsed, offline: SD 1.5 and lambdalabs/naruto-blip-captions written as a Hugging Face cache
# (real ids and configs, random weights), then every notebook with its T4 values under HF_HUB_OFFLINE=1.
# The snapshot (5.5 GB of disk, about a minute) is written once into $REHEARSAL_HF_HOME and reused.
#   bash scripts/rehearse.sh                 # all notebooks -> outputs/rehearsal
#   bash scripts/rehearse.sh --only 03       # extra args go to python -m lora_nb.course.rehearsal
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m lora_nb.course.rehearsal \
  --hf-home "${REHEARSAL_HF_HOME:-${TMPDIR:-/tmp}/lora_nb-rehearsal-hf}" --out outputs/rehearsal "$@"
