#!/usr/bin/env bash
# Install everything into .venv and train on the built-in demo set (extra arguments go to train.py).
# Each run gets its own folder, runs/demo-<time>, unless you name one (--out) or continue one (--resume):
# train.py refuses to start a new run in a folder that holds another.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=train . scripts/install.sh
case " $* " in
  *" --out"*|*" --resume"*) python train.py --amp "$@" ;;
  *) python train.py --amp --out "runs/demo-$(date +%Y%m%d-%H%M%S)" "$@" ;;
esac
