#!/usr/bin/env bash
# The test suite: unit tests, ecosystem contracts, every notebook through papermill. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
# The course site's browser test renders the index in headless Chromium (Debian's package); CI runs it.
if ! command -v chromium > /dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing chromium for the course site's browser test..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) > /dev/null
  else
    echo "no chromium and not root: the browser test will be skipped (apt-get install chromium)" >&2
  fi
fi
# Offline by design: the embedded default needs no hub, and a stray download should fail fast.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Lint and format first: seconds, and a red line here is cheaper than after the notebooks.
.venv/bin/ruff check lora_nb tests benchmarks scripts
.venv/bin/ruff format --check lora_nb tests benchmarks scripts
exec .venv/bin/python -m pytest "$@"
