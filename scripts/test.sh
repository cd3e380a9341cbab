#!/usr/bin/env bash
# The test suite (unit tests, ecosystem contracts, every notebook through papermill). Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest "$@"
