"""infra/start-local.sh: refuses bad settings before starting anything, reports a dead Ray head, starts a healthy stack.

Each test runs a copy of infra/start-local.sh and infra/stop-local.sh in its own folder (their .pids, .logs,
local.env and .prefect go there, never beside a stack the user runs from this checkout), with the venv of the
interpreter running the tests. Every process a test starts is stopped by stop-local.sh, and checked gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent  # not resolved: a venv's python is a link to the base interpreter


@pytest.fixture
def stack_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder holding infra/start-local.sh and infra/stop-local.sh; whatever they started is stopped at the end."""
    (tmp_path / "infra").mkdir()
    for script in ("start-local.sh", "stop-local.sh"):
        shutil.copy2(REPO / "infra" / script, tmp_path / "infra" / script)
    yield tmp_path
    pids = _pids(tmp_path)
    if pids:
        subprocess.run(["bash", "infra/stop-local.sh"], cwd=tmp_path, capture_output=True, timeout=180)
    _wait_gone(pids)


def _pids(root: Path) -> dict[str, int]:
    d = root / "infra" / ".pids"
    return {f.name: int(f.read_text()) for f in d.iterdir()} if d.is_dir() else {}


def _group_alive(pgid: int) -> bool:
    """Any process left of a process group that start-local.sh started (setsid: the group id is the leader's pid)."""
    out = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True).stdout
    return any(int(g) == pgid and not s.startswith("Z") for g, s in (line.split()[:2] for line in out.splitlines()))


def _wait_gone(pids: dict[str, int], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while any(_group_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(1)
    left = {n: p for n, p in pids.items() if _group_alive(p)}
    for pgid in left.values():  # do not leave them behind, even when the test fails
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, 9)
    assert not left, f"processes left behind by stop-local.sh: {left}"


def _free_port() -> int:
    """A free TCP port outside Ray's worker port range (the kernel's ephemeral range is above it)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def _start(root: Path, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    # RAY_TEMP_DIR: the script creates it even when the head dies; the stack's folder holds it then
    full = {**os.environ, "VENV": str(VENV), "RAY_CPUS": "1", "RAY_TEMP_DIR": str(root / "ray"), **env}
    for var in ("PREFECT_HOME", "PREFECT_API_URL", "RAY_ADDRESS", "LOCAL_PREFECT_HOME"):
        if var not in env:
            full.pop(var, None)
    cmd = ["bash", "infra/start-local.sh", *args]
    return subprocess.run(cmd, cwd=root, env=full, capture_output=True, text=True, timeout=timeout)


def _nothing_started(root: Path) -> None:
    assert not (root / "infra" / ".pids").exists() and not (root / "infra" / "local.env").exists()


@pytest.mark.parametrize(
    "env",
    [
        {"RAY_PORT": "12345"},
        {"RAY_PORT": "10002"},
        {"RAY_PORT": "19999"},
        {"RAY_PORT": "abc"},
        {"RAY_PORT": "80"},
        {"RAY_DASHBOARD_PORT": "15000"},
        {"RAY_CLIENT_SERVER_PORT": "10002"},
    ],
    ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()),
)
def test_bad_ray_port_is_refused_in_one_line(stack_dir: Path, env: dict[str, str]) -> None:
    done = _start(stack_dir, timeout=30, **env)
    [(name, value)] = env.items()
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"start-local.sh: {name}=") and value in line
    if value.isdigit() and int(value) >= 1024:
        assert "is inside Ray's worker port range 10002-19999" in line
    else:
        assert "is not a port number (1024-65535)" in line
    _nothing_started(stack_dir)


def test_options_set_the_ports_they_name(stack_dir: Path) -> None:
    done = _start(stack_dir, "--dashboard-port", "12000", timeout=30)
    assert done.returncode == 2 and "RAY_DASHBOARD_PORT=12000 is inside Ray's worker port range" in done.stderr
    done = _start(stack_dir, "--ray-client-server-port", "x", timeout=30)
    assert done.returncode == 2 and "RAY_CLIENT_SERVER_PORT='x' is not a port number" in done.stderr
    done = _start(stack_dir, "--frobnicate", timeout=30)
    assert done.returncode == 2 and "unknown option '--frobnicate'" in done.stderr
    assert "--temp-dir" in _start(stack_dir, "--help", timeout=30).stdout
    _nothing_started(stack_dir)


def test_a_held_port_is_named_and_nothing_starts(stack_dir: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = _start(stack_dir, timeout=60, S3_PORT=str(port), PREFECT_PORT=str(_free_port()))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"port {port} (S3_PORT) is held by another process" in done.stderr
    assert done.stderr.splitlines()[-1] == "start-local.sh: nothing started"
    _nothing_started(stack_dir)


FAKE_SERVER = """\
#!{python}
# answers 200 to every GET on the port after -p or --port (a stand-in for moto_server and prefect server)
import http.server, sys
args = sys.argv[1:]
port = int(args[args.index("-p" if "-p" in args else "--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""
DEAD_RAY = """\
#!/usr/bin/env bash
# a Ray head that dies at start, as one whose port a Ray worker took
case $1 in
  start) echo "simulated: the Ray head died at start"; exit 1 ;;
  get-auth-token) exit 0 ;;
  *) exit 1 ;;
esac
"""


def test_a_dead_ray_head_fails_the_start_naming_its_log(
    stack_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    venv = _fake_venv(tmp_path_factory.mktemp("fake-venv"), moto_server=FAKE_SERVER, prefect=FAKE_SERVER, ray=DEAD_RAY)
    ports = {k: str(_free_port()) for k in ("S3_PORT", "PREFECT_PORT", "RAY_PORT")}
    done = _start(stack_dir, timeout=120, VENV=str(venv), STARTUP_TIMEOUT="30", RAY_DASHBOARD="0", **ports)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED: ray exited at start: see infra/.logs/ray.log" in done.stderr
    assert "simulated: the Ray head died at start" in done.stderr  # the log's last lines
    assert "FAILED: moto" not in done.stderr and "FAILED: prefect" not in done.stderr
    assert "healthy:" not in done.stdout


STRANGER_SERVER = """\
#!{python}
# binds nothing itself: a process of another session answers on the port (as another user's server that took the
# port between start-local.sh's check and this server's bind); its pid goes to the file named by STRANGER_PID
import os, subprocess, sys, time
args = sys.argv[1:]
port = args[args.index("-p") + 1]
fake = os.path.join(os.path.dirname(sys.argv[0]), "prefect")
stranger = subprocess.Popen([sys.executable, fake, "--port", port], start_new_session=True)
open(os.environ["STRANGER_PID"], "w").write(str(stranger.pid))
time.sleep(3600)
"""


def _fake_venv(root: Path, **scripts: str) -> Path:
    (root / "bin").mkdir()
    (root / "bin" / "python").symlink_to(sys.executable)
    for name, text in scripts.items():
        (root / "bin" / name).write_text(textwrap.dedent(text).replace("{python}", sys.executable))
        (root / "bin" / name).chmod(0o755)
    return root


@pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) tells who holds a port")
def test_a_port_answered_by_another_process_is_not_healthy(
    stack_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    venv = _fake_venv(
        tmp_path_factory.mktemp("fake-venv"), moto_server=STRANGER_SERVER, prefect=FAKE_SERVER, ray=DEAD_RAY
    )
    pid_file = tmp_path_factory.mktemp("stranger") / "pid"
    ports = {k: str(_free_port()) for k in ("S3_PORT", "PREFECT_PORT", "RAY_PORT")}
    try:
        done = _start(
            stack_dir,
            timeout=120,
            VENV=str(venv),
            STARTUP_TIMEOUT="30",
            RAY_DASHBOARD="0",
            STRANGER_PID=str(pid_file),
            **ports,
        )
    finally:
        for _ in range(50):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.1)
        stranger = int(pid_file.read_text())
        os.kill(stranger, 9)
    assert done.returncode == 1, done.stdout + done.stderr
    port = ports["S3_PORT"]
    assert f"FAILED: moto lost its port to another process: S3_PORT={port} (python" in done.stderr
    assert f"pid {stranger})" in done.stderr and "FAILED: prefect" not in done.stderr


def test_stack_starts_healthy_with_its_own_prefect_home(stack_dir: Path) -> None:
    """The real stack on free ports (about 20 s to start and 40 s to stop: Ray's head shuts down gracefully)."""
    ports = {
        k: str(_free_port())
        for k in ("S3_PORT", "PREFECT_PORT", "RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_DASHBOARD_AGENT_PORT")
    }
    client_port = str(_free_port())
    temp = Path(tempfile.mkdtemp(prefix="qv-ray-"))  # short: Ray's socket paths must stay under 107 characters
    try:
        done = _start(stack_dir, "--ray-client-server-port", client_port, "--temp-dir", str(temp), **ports)
        assert done.returncode == 0, done.stdout + done.stderr
        home = stack_dir / "infra" / ".prefect"
        out = done.stdout
        assert f"healthy: moto S3      http://127.0.0.1:{ports['S3_PORT']}" in out
        assert f"healthy: Prefect      http://127.0.0.1:{ports['PREFECT_PORT']}" in out
        assert f"healthy: Ray head     127.0.0.1:{ports['RAY_PORT']}" in out
        assert f"dashboard http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}" in out and f":{client_port})" in out
        assert f"PREFECT_HOME={home}" in out
        env = (stack_dir / "infra" / "local.env").read_text()
        assert f"export PREFECT_HOME={home}\n" in env and f"RAY_ADDRESS=127.0.0.1:{ports['RAY_PORT']}" in env
        assert (home / "prefect.db").exists()  # the server's database is the stack's own
        assert any(temp.glob("session_*")), "Ray's session is not in --temp-dir"
        assert set(_pids(stack_dir)) == {"moto", "prefect", "ray"}
        pids = _pids(stack_dir)
        stopped = subprocess.run(["bash", "infra/stop-local.sh"], cwd=stack_dir, capture_output=True, text=True)
        assert stopped.stdout.splitlines() == ["stopped moto", "stopped prefect", "stopped ray"], stopped
        _wait_gone(pids)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
