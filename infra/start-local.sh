#!/usr/bin/env bash
# Start the local stack: moto S3 server (127.0.0.1:5000), Prefect server (127.0.0.1:4200), Ray head.
# PIDs go to infra/.pids; stop everything with infra/stop-local.sh. Logs in infra/.logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
mkdir -p infra/.pids infra/.logs
start() {  # name, command...
  local name=$1; shift
  if [ -f "infra/.pids/$name" ] && kill -0 "$(cat "infra/.pids/$name")" 2>/dev/null; then echo "$name already running"; return; fi
  setsid "$@" >"infra/.logs/$name.log" 2>&1 &
  echo $! >"infra/.pids/$name"
  echo "started $name (pid $!)"
}
start moto "$VENV/bin/moto_server" -H 127.0.0.1 -p "${S3_PORT:-5000}"
start prefect "$VENV/bin/prefect" server start --host 127.0.0.1 --port "${PREFECT_PORT:-4200}"
"$VENV/bin/ray" start --head --num-cpus "${RAY_CPUS:-2}" --disable-usage-stats >infra/.logs/ray.log 2>&1 && echo "started ray head"
cat <<EOT
export QUANTVGGT_S3_ENDPOINT=http://127.0.0.1:${S3_PORT:-5000} AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
export PREFECT_API_URL=http://127.0.0.1:${PREFECT_PORT:-4200}/api
export RAY_ADDRESS=auto
EOT
