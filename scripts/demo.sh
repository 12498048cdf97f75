#!/usr/bin/env bash
# The main job on real bundled data: train TSKD on 4 labelled slices of the bundled CT, segment
# the whole scan, print Dice on the slices that were not labelled. Data: Testing/Data/totalseg of
# this checkout (tskd demo --data); output in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/tskd demo --data Testing/Data/totalseg --out runs/demo "$@"
