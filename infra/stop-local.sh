#!/usr/bin/env bash
# Stop what infra/start-local.sh started.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
for f in infra/.pids/*; do
  [ -f "$f" ] || continue
  pid=$(cat "$f"); name=$(basename "$f")
  if kill -0 "$pid" 2>/dev/null; then kill -- "-$pid" 2>/dev/null || kill "$pid"; echo "stopped $name"; fi
  rm -f "$f"
done
"$VENV/bin/ray" stop >/dev/null 2>&1 && echo "stopped ray"
