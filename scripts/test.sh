#!/usr/bin/env bash
# Set up (or reuse) the environment and run the test suite on real bundled data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest "$@"
