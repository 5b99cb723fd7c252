#!/usr/bin/env bash
# Quickstart 1: set up .venv if needed, then run the main job (or any deepzero command given).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
if [ "$#" -eq 0 ]; then set -- classify train; fi
exec .venv/bin/deepzero "$@"
