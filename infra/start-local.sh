#!/usr/bin/env bash
# Start the local stack: moto S3 server, a Prefect server with its own PREFECT_HOME, a Ray head with its dashboard.
# Writes infra/local.env (source it in every shell that runs quantvggt, prefect or a worker). PIDs go to
# infra/.pids, logs to infra/.logs; stop everything with infra/stop-local.sh. See infra/README.md and --help.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() {
  cat <<'EOT'
usage: infra/start-local.sh [--prefect-home DIR] [--temp-dir DIR] [--ray-client-server-port N] [--dashboard-port N]

Starts moto S3, a Prefect server and a Ray head on 127.0.0.1, checks that each answers, writes infra/local.env.
Settings (environment variable, or the option):
  VENV=.venv                     the virtual environment whose moto_server, prefect and ray run
  S3_PORT=5000                   moto S3
  PREFECT_PORT=4200              Prefect server (API and UI)
  LOCAL_PREFECT_HOME=infra/.prefect  --prefect-home: this stack's PREFECT_HOME (its database, work pools, deployments)
  RAY_PORT=6379                  Ray head (GCS); not in Ray's worker port range 10002-19999
  RAY_CLIENT_SERVER_PORT=10001   --ray-client-server-port: Ray client server (ray://)
  RAY_DASHBOARD=1                0: no dashboard (then ray.util.state and `ray list ...` do not work)
  RAY_DASHBOARD_PORT=8265        --dashboard-port: Ray dashboard (and the state API)
  RAY_DASHBOARD_AGENT_PORT=52365 the dashboard agent's HTTP port (per-node logs and state)
  RAY_TEMP_DIR=/tmp/ray-$USER-$RAY_PORT  --temp-dir: Ray's session files, logs and spilled objects
  RAY_CPUS=2                     CPUs the Ray head offers
  STARTUP_TIMEOUT=120            seconds to wait for all three to answer
EOT
}

while [ $# -gt 0 ]; do
  case $1 in
    --prefect-home) LOCAL_PREFECT_HOME=${2:?--prefect-home needs a directory}; shift 2 ;;
    --temp-dir) RAY_TEMP_DIR=${2:?--temp-dir needs a directory}; shift 2 ;;
    --ray-client-server-port) RAY_CLIENT_SERVER_PORT=${2:?--ray-client-server-port needs a port}; shift 2 ;;
    --dashboard-port) RAY_DASHBOARD_PORT=${2:?--dashboard-port needs a port}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "start-local.sh: unknown option '$1' (see infra/start-local.sh --help)" >&2; exit 2 ;;
  esac
done

VENV=${VENV:-.venv}
S3_PORT=${S3_PORT:-5000} PREFECT_PORT=${PREFECT_PORT:-4200} RAY_PORT=${RAY_PORT:-6379}
RAY_CLIENT_SERVER_PORT=${RAY_CLIENT_SERVER_PORT:-10001} RAY_DASHBOARD=${RAY_DASHBOARD:-1}
RAY_DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265} RAY_DASHBOARD_AGENT_PORT=${RAY_DASHBOARD_AGENT_PORT:-52365}
RAY_TEMP_DIR=${RAY_TEMP_DIR:-${TMPDIR:-/tmp}/ray-$(id -un)-$RAY_PORT} LOCAL_PREFECT_HOME=${LOCAL_PREFECT_HOME:-infra/.prefect}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-120}

refuse() { echo "start-local.sh: $*" >&2; exit 2; }

# -- everything is checked before anything starts -------------------------------------------------------------------
for tool in moto_server prefect ray python; do
  [ -x "$VENV/bin/$tool" ] || refuse "$VENV/bin/$tool not found: create the venv first (make test), or set VENV=/path/to/venv"
done
VENV=$(cd "$VENV" && pwd)
case $RAY_DASHBOARD in 0 | 1) ;; *) refuse "RAY_DASHBOARD=$RAY_DASHBOARD: use 1 (default) or 0" ;; esac
[[ $STARTUP_TIMEOUT =~ ^[0-9]+$ ]] || refuse "STARTUP_TIMEOUT=$STARTUP_TIMEOUT is not a number of seconds"

# name=value pairs of the ports this run would use, per component
MOTO_PORTS="S3_PORT=$S3_PORT" PREFECT_PORTS="PREFECT_PORT=$PREFECT_PORT"
RAY_PORTS="RAY_PORT=$RAY_PORT RAY_CLIENT_SERVER_PORT=$RAY_CLIENT_SERVER_PORT"
[ "$RAY_DASHBOARD" = 1 ] && RAY_PORTS="$RAY_PORTS RAY_DASHBOARD_PORT=$RAY_DASHBOARD_PORT RAY_DASHBOARD_AGENT_PORT=$RAY_DASHBOARD_AGENT_PORT"
seen=" "
for pair in $MOTO_PORTS $PREFECT_PORTS $RAY_PORTS; do
  name=${pair%%=*} port=${pair#*=}
  if ! [[ $port =~ ^[0-9]+$ ]] || [ "$port" -lt 1024 ] || [ "$port" -gt 65535 ]; then
    refuse "$name='$port' is not a port number (1024-65535)"
  fi
  if [[ $name == RAY_* ]] && [ "$port" -ge 10002 ] && [ "$port" -le 19999 ]; then
    refuse "$name=$port is inside Ray's worker port range 10002-19999 (a Ray worker takes it and the head dies): pick another, e.g. $name=$((port < 15000 ? 6380 : 20379))"
  fi
  case $seen in *" $port "*) refuse "$name=$port: the same port is set for two components" ;; esac
  seen="$seen$port "
done

running() { [ -f "infra/.pids/$1" ] && kill -0 "$(cat "infra/.pids/$1")" 2>/dev/null; }
holder() {  # port: "program, pid N" of a process listening on it, where ss can tell
  ss -ltnpH "sport = :$1" 2>/dev/null | grep -o 'users:(("[^"]*",pid=[0-9]*' | head -1 |
    sed 's/users:(("//; s/",pid=/, pid /' || true
}
owned() {  # port, name: 0 if name's process group listens on the port, 2 if nobody does yet, 1 if someone else does
  command -v ss >/dev/null || return 0  # cannot tell: the health checks alone decide
  local lines pid
  lines=$(ss -ltnpH "sport = :$1" 2>/dev/null) || return 0
  [ -n "$lines" ] || return 2
  for pid in $(grep -o 'pid=[0-9]*' <<<"$lines" | cut -d= -f2 | sort -u); do
    [ "$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$(cat "infra/.pids/$2")" ] && return 0
  done
  return 1  # another user's listener shows without a pid: not ours either
}
port_in_use() {  # a listening socket on the port, on any address (what the server's own bind would refuse)
  "$VENV/bin/python" - "$1" <<'EOP'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", int(sys.argv[1])))
except OSError:
    sys.exit(0)
sys.exit(1)
EOP
}
busy=0
for component in moto prefect ray; do
  running "$component" && continue  # started by an earlier start-local.sh: its ports are its own
  case $component in moto) pairs=$MOTO_PORTS ;; prefect) pairs=$PREFECT_PORTS ;; ray) pairs=$RAY_PORTS ;; esac
  for pair in $pairs; do
    name=${pair%%=*} port=${pair#*=}
    if port_in_use "$port"; then
      who=$(holder "$port")
      echo "start-local.sh: port $port ($name) is held by another process${who:+ ($who)}: set $name to a free port" >&2
      busy=1
    fi
  done
done
[ "$busy" = 0 ] || { echo "start-local.sh: nothing started" >&2; exit 2; }

# -- the environment first, so that every process started below (the Ray head and its workers included) has it ----
mkdir -p infra/.pids infra/.logs "$LOCAL_PREFECT_HOME" "$RAY_TEMP_DIR"
LOCAL_PREFECT_HOME=$(cd "$LOCAL_PREFECT_HOME" && pwd) RAY_TEMP_DIR=$(cd "$RAY_TEMP_DIR" && pwd)
# AWS_ENDPOINT_URL is what boto3 and the aws CLI read; the credentials are moto's dummies. PREFECT_HOME: this stack's
# own Prefect database and profiles, never the host's shared ~/.prefect.
cat >infra/local.env <<EOT
export AWS_ENDPOINT_URL=http://127.0.0.1:${S3_PORT}
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_DEFAULT_REGION=us-east-1
export PREFECT_HOME=${LOCAL_PREFECT_HOME}
export PREFECT_API_URL=http://127.0.0.1:${PREFECT_PORT}/api
export RAY_ADDRESS=127.0.0.1:${RAY_PORT} RAY_AUTH_MODE=token
export PREFECT_LOGGING_EXTRA_LOGGERS=quantvggt,workers
EOT
# shellcheck disable=SC1091
source infra/local.env

start() {  # name, command...
  local name=$1; shift
  if running "$name"; then echo "$name already running (pid $(cat "infra/.pids/$name"))"; return; fi
  setsid "$@" >"infra/.logs/$name.log" 2>&1 &
  echo $! >"infra/.pids/$name"
  echo "started $name (pid $!)"
}
start moto "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT"
# offline, the server's analytics would log an error in every run
PREFECT_SERVER_ANALYTICS_ENABLED=false start prefect "$VENV/bin/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
# Ray clusters require a token (~/.ray/auth_token, shared by the head and every client with RAY_AUTH_MODE=token)
if [ -z "${RAY_AUTH_TOKEN:-}${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$HOME/.ray/auth_token" ]; then
  "$VENV/bin/ray" get-auth-token --generate >/dev/null
fi
dashboard=(--include-dashboard false)
if [ "$RAY_DASHBOARD" = 1 ]; then
  dashboard=(--include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$RAY_DASHBOARD_PORT"
    --dashboard-agent-listen-port "$RAY_DASHBOARD_AGENT_PORT")
fi
# --block keeps the head's processes in this process group: stop-local.sh stops exactly them (not every Ray on
# the host)
start ray "$VENV/bin/ray" start --head --block --port "$RAY_PORT" --num-cpus "${RAY_CPUS:-2}" \
  --ray-client-server-port "$RAY_CLIENT_SERVER_PORT" --temp-dir "$RAY_TEMP_DIR" "${dashboard[@]}" \
  --disable-usage-stats

# -- health: each one answers, or the script says which did not and exits non-zero ----------------------------------
ray_node_active() {  # the head's raylet has registered: `ray status` lists an active node (GCS health alone is not it)
  timeout 30 "$VENV/bin/ray" status --address "$RAY_ADDRESS" 2>/dev/null |
    awk '/^Active:/ {a = 1; next} /^[A-Z]/ {a = 0} a && /node_/ {found = 1} END {exit !found}'
}
healthy() {  # name: answers now (on ports that its own processes hold: checked before, by owned)
  case $1 in
    moto) curl -sf -m 5 "http://127.0.0.1:${S3_PORT}/" >/dev/null 2>&1 ;;
    prefect) curl -sf -m 5 "$PREFECT_API_URL/health" >/dev/null 2>&1 ;;
    ray)
      timeout 30 "$VENV/bin/ray" health-check --address "$RAY_ADDRESS" >/dev/null 2>&1 && ray_node_active &&
        { [ "$RAY_DASHBOARD" = 0 ] || curl -sf -m 5 "http://127.0.0.1:${RAY_DASHBOARD_PORT}/api/gcs_healthz" >/dev/null 2>&1; } ;;
  esac
}
ports_of() {  # name: the ports its own processes must hold once it answers (not Ray's client server: optional)
  case $1 in
    moto) echo "S3_PORT=$S3_PORT" ;;
    prefect) echo "PREFECT_PORT=$PREFECT_PORT" ;;
    ray) echo "RAY_PORT=$RAY_PORT"
      [ "$RAY_DASHBOARD" = 0 ] || echo "RAY_DASHBOARD_PORT=$RAY_DASHBOARD_PORT RAY_DASHBOARD_AGENT_PORT=$RAY_DASHBOARD_AGENT_PORT" ;;
  esac
}
failed() {  # name, why
  echo "FAILED: $1 $2: see infra/.logs/$1.log${3:+ ($3)}" >&2
  tail -n 3 "infra/.logs/$1.log" | sed 's/^/  | /' >&2
}
pending="moto prefect ray" deadline=$((SECONDS + STARTUP_TIMEOUT)) status=0
while [ -n "$pending" ]; do
  left=""
  for name in $pending; do
    if ! running "$name"; then failed "$name" "exited at start"; status=1; continue; fi
    wait_for="" stolen=""
    for pair in $(ports_of "$name"); do
      owned "${pair#*=}" "$name" && continue
      case $? in
        2) wait_for=1 ;;  # not listening yet
        *) who=$(holder "${pair#*=}"); stolen="$stolen ${pair%%=*}=${pair#*=} (${who:-pid not visible})" ;;
      esac
    done
    if [ -n "$stolen" ]; then  # another process bound the port after the check above (or answers in our place)
      failed "$name" "lost its port to another process:$stolen"; status=1
    elif [ -n "$wait_for" ] || ! healthy "$name"; then left="$left $name"; fi
  done
  pending=$left
  [ -n "$pending" ] || break
  if [ "$SECONDS" -ge "$deadline" ]; then
    for name in $pending; do failed "$name" "not answering after ${STARTUP_TIMEOUT}s"; done
    status=1; break
  fi
  sleep 1
done
sleep 2  # a head that answered once and died at once (e.g. a port taken by its own workers) is not healthy
for name in moto prefect ray; do
  if ! running "$name" && [ "$status" = 0 ]; then failed "$name" "exited after answering"; status=1; fi
done
if [ "$status" != 0 ]; then
  echo "start-local.sh: the stack is not healthy; infra/stop-local.sh stops what did start" >&2
  exit 1
fi

dash="off (RAY_DASHBOARD=0)"
[ "$RAY_DASHBOARD" = 1 ] && dash="http://127.0.0.1:${RAY_DASHBOARD_PORT}"
echo
echo "healthy: moto S3      $AWS_ENDPOINT_URL"
echo "healthy: Prefect      http://127.0.0.1:${PREFECT_PORT} (UI and API)"
echo "healthy: Ray head     $RAY_ADDRESS (dashboard $dash, client ray://127.0.0.1:${RAY_CLIENT_SERVER_PORT})"
echo "PREFECT_HOME=$PREFECT_HOME (this stack's own Prefect database, work pools and deployments; not ~/.prefect)"
echo "Ray temp dir: $RAY_TEMP_DIR (Ray's logs: $RAY_TEMP_DIR/session_latest/logs)"
echo
echo "Now, in every shell that uses the stack:  source infra/local.env"
