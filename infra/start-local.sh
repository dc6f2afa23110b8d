#!/usr/bin/env bash
# Start the local stack: moto S3 server (127.0.0.1:5000), Prefect server (127.0.0.1:4200), Ray head (127.0.0.1:6379).
# Writes infra/local.env (source it in every shell that runs quantvggt, prefect or a worker). PIDs go to
# infra/.pids, logs to infra/.logs; stop everything with infra/stop-local.sh. See infra/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
S3_PORT=${S3_PORT:-5000} PREFECT_PORT=${PREFECT_PORT:-4200} RAY_PORT=${RAY_PORT:-6379}
mkdir -p infra/.pids infra/.logs

# The environment first, so that every process started below (the Ray head and its workers included) has it.
# AWS_ENDPOINT_URL is what boto3 and the aws CLI read; the credentials are moto's dummies.
cat >infra/local.env <<EOT
export AWS_ENDPOINT_URL=http://127.0.0.1:${S3_PORT}
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
export PREFECT_API_URL=http://127.0.0.1:${PREFECT_PORT}/api
export RAY_ADDRESS=127.0.0.1:${RAY_PORT} RAY_AUTH_MODE=token
export PREFECT_LOGGING_EXTRA_LOGGERS=quantvggt,workers
EOT
# shellcheck disable=SC1091
source infra/local.env

start() {  # name, command...
  local name=$1; shift
  if [ -f "infra/.pids/$name" ] && kill -0 "$(cat "infra/.pids/$name")" 2>/dev/null; then echo "$name already running"; return; fi
  setsid "$@" >"infra/.logs/$name.log" 2>&1 &
  echo $! >"infra/.pids/$name"
  echo "started $name (pid $!)"
}
start moto "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT"
start prefect "$VENV/bin/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
# Ray clusters require a token (~/.ray/auth_token, shared by the head and every client with RAY_AUTH_MODE=token)
if [ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$HOME/.ray/auth_token" ]; then
  "$VENV/bin/ray" get-auth-token --generate >/dev/null
fi
# --block keeps the head's processes in this process group: stop-local.sh stops exactly them (not every Ray on
# the host)
start ray "$VENV/bin/ray" start --head --block --port "$RAY_PORT" --num-cpus "${RAY_CPUS:-2}" \
  --include-dashboard false --disable-usage-stats

# wait until the servers answer, so that the next command in the README works at once
for _ in $(seq 60); do
  if curl -sf "http://127.0.0.1:${S3_PORT}/" >/dev/null 2>&1 && curl -sf "$PREFECT_API_URL/health" >/dev/null 2>&1; then
    break
  fi
  sleep 1
done
curl -sf "$PREFECT_API_URL/health" >/dev/null 2>&1 || echo "Prefect server not answering yet: see infra/.logs/prefect.log"
echo
echo "Now, in every shell that uses the stack:  source infra/local.env"
echo "Prefect UI: http://127.0.0.1:${PREFECT_PORT}"
