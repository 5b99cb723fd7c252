#!/usr/bin/env bash
# Start a shared MLflow tracking server without Docker.
#   MLFLOW_BACKEND_URI  backend store (default: PostgreSQL on localhost; a sqlite:/// URI also works)
#   MLFLOW_ARTIFACTS    artifact directory served (proxied) to clients
#   MLFLOW_HOST         interface to bind (default 127.0.0.1: loopback only)
#   MLFLOW_PORT         port (default 5000)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$root/.venv/bin/python"
[ -x "$py" ] || py=python3
backend="${MLFLOW_BACKEND_URI:-postgresql://mlflow:mlflow@127.0.0.1:5432/mlflow}"
artifacts="${MLFLOW_ARTIFACTS:-$root/mlflow/server-artifacts}"
mkdir -p "$artifacts"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec "$py" -m mlflow server --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
  --serve-artifacts --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-2}"
