#!/usr/bin/env bash
# Create .venv at the repository root and install deepzero with everything it needs.
# Idempotent: when pyproject.toml and this script are unchanged since the last successful
# install, it only checks the environment and returns in about a second.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1; then py="$cand"; break; fi
  done
fi
[ -n "$py" ] || { echo "setup: no python3.11 found on PATH (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$py" --version 2>&1)"
  "$py" -m venv .venv
fi
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
have="$(cat .venv/.deepzero-setup 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  echo "setup: installing dependencies into .venv (first run: several minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch/torchvision are pinned in pyproject.toml to the builds this project is tested with.
  .venv/bin/python -m pip install --quiet -e ".[test]" --config-settings editable_mode=compat
  # auto-LiRPA 0.3 declares torch<1.13 in its metadata; it works with our compatibility shims,
  # so it is installed without its declared dependencies.
  .venv/bin/python -m pip install --quiet --no-deps "auto-lirpa==0.3" appdirs
  echo "$want" > .venv/.deepzero-setup
fi
.venv/bin/python -c "import core, solvers, applications" \
  || { echo "setup: .venv is broken; remove it (rm -rf .venv) and run again" >&2; exit 1; }
