#!/usr/bin/env bash
# The main job on real bundled data: train TSKD on 4 labelled slices of the bundled CT, segment
# the whole scan, print Dice on the slices that were not labelled. Output in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/tskd demo --out runs/demo "$@"
