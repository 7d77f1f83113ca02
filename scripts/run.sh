#!/usr/bin/env bash
# Set up, then run the LoRe protocol on the built-in synthetic population.
# Extra arguments go to `lightning fit`, e.g. scripts/run.sh --model.init_args.rank=1
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lightning fit --config configs/experiment/synthetic.yaml "$@"
