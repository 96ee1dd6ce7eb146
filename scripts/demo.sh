#!/usr/bin/env bash
# Install everything into .venv and train on the built-in demo set (extra arguments go to train.py).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=train . scripts/install.sh
python train.py --amp "$@"
