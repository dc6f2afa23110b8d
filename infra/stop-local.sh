#!/usr/bin/env bash
# Stop what infra/start-local.sh started, by the process groups it recorded (other Ray clusters on the host stay).
set -uo pipefail
cd "$(dirname "$0")/.."
for f in infra/.pids/*; do
  [ -f "$f" ] || continue
  pid=$(cat "$f"); name=$(basename "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -- "-$pid" 2>/dev/null || kill "$pid"
    # the Ray head shuts its processes down gracefully (up to ~30 s): wait, so that a restart finds its port free
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    echo "stopped $name"
  fi
  rm -f "$f"
done
