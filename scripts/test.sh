#!/usr/bin/env bash
# The test suite: unit tests, ecosystem contracts, every notebook through papermill. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
# Offline by design: the embedded default needs no hub, and a stray download should fail fast.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
