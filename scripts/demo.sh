#!/usr/bin/env bash
# The main job: install, then run the demo (generates its own data; no download).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m rtdetr_fast demo "$@"
