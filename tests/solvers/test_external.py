import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from solvers import HTTPSolver, SolverError, SubprocessSolver, load
from solvers.burgers import Burgers
from solvers.http import make_server, serve_in_thread

ROOT = Path(__file__).resolve().parents[2]
BAD = str(Path(__file__).parent / "programs" / "bad_solver.py")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_round_trip_through_example_server_equals_in_process():
    cmd = [sys.executable, "-m", "solvers.example_server", "--solver", "burgers", "--option", "n=48"]
    ref = Burgers(48)
    state = ref.initial_state(5, seed=2)
    forcing = np.random.default_rng(0).standard_normal((5, 48)) * 0.1
    with SubprocessSolver(cmd, timeout=30, env=ENV) as remote:
        assert remote.state_shape == (48,) and remote.conditions == ("forcing",)
        a = state
        b = state
        for _ in range(3):
            a = remote.step(a, forcing=forcing)
            b = ref.step(b, forcing=forcing)
        assert a.tobytes() == b.tobytes()
        pid = remote.proc.pid
    assert not _alive(pid)


@pytest.mark.parametrize("mode,match", [
    ("crash", r"exited \(status 3\).*segfault-like failure"),
    ("hang", r"no answer to a step within 2s"),
    ("nan", r"8 NaN/Inf values"),
    ("shape", r"returned shape \(2, 5\); expected \(2, 4\)"),
    ("dtype", r"returned dtype float32; expected float64"),
])
def test_failures_are_solver_errors_within_the_timeout_and_leave_no_process(mode, match):
    solver = SubprocessSolver([sys.executable, BAD, mode], timeout=2, env=ENV)
    pid = solver.proc.pid
    start = time.monotonic()
    with pytest.raises(SolverError, match=match):
        solver.step(np.ones((2, 4)))
    assert time.monotonic() - start < 2 + 3
    solver.close()
    assert not _alive(pid)


def test_missing_handshake_times_out():
    start = time.monotonic()
    with pytest.raises(SolverError, match="no answer to handshake within 1s"):
        SubprocessSolver([sys.executable, BAD, "nohandshake"], timeout=1, env=ENV)
    assert time.monotonic() - start < 4


def test_grandchildren_die_with_the_solver():
    solver = SubprocessSolver([sys.executable, BAD, "spawn"], timeout=1, env=ENV)
    with pytest.raises(SolverError, match="no answer"):
        solver.step(np.ones((1, 4)))
    line = [l for l in solver._stderr if l.startswith("grandchild")][0]
    assert not _alive(int(line.split()[1]))


def test_dropping_the_solver_kills_the_program():
    solver = SubprocessSolver([sys.executable, BAD, "good"], timeout=5, env=ENV)
    pid = solver.proc.pid
    assert np.array_equal(solver.step(np.ones((1, 4))), np.full((1, 4), 2.0))
    del solver
    import gc
    gc.collect()
    time.sleep(0.2)
    assert not _alive(pid)


def test_commands_are_never_run_through_a_shell():
    with pytest.raises(SolverError, match="list of arguments"):
        SubprocessSolver("python -m solvers.example_server")
    with pytest.raises(SolverError, match="cannot start solver program"):
        SubprocessSolver(["/nonexistent/solver"])


def test_http_round_trip_equals_in_process():
    ref = Burgers(16)
    server, url = serve_in_thread(Burgers(16))
    try:
        client = load(url)
        assert isinstance(client, HTTPSolver) and client.state_shape == (16,)
        s = ref.initial_state(3, seed=4)
        assert client.step(s).tobytes() == ref.step(s).tobytes()
        with pytest.raises(SolverError, match="expects state of shape"):
            client.step(np.zeros((1, 3)))
        with pytest.raises(SolverError, match="forcing must have shape"):
            client.step(s, forcing=np.zeros((3, 2)))
    finally:
        server.shutdown()
        server.server_close()


def test_http_server_refuses_non_loopback_unless_asked():
    with pytest.raises(SolverError, match="refusing to bind 0.0.0.0"):
        make_server(Burgers(8), "0.0.0.0", 0)
    server = make_server(Burgers(8), "0.0.0.0", 0, allow_remote=True)
    server.server_close()


def test_cli_serve_and_check(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "applications", "solver", "serve", "--solver", "burgers",
                             "--option", "n=16", "--port", str(port)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving burgers on http://127.0.0.1" in proc.stdout.readline()
        out = subprocess.run([sys.executable, "-m", "applications", "solver", "check", f"http://127.0.0.1:{port}",
                              "--batch", "1,4"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "state_shape     (16,)" in out.stdout and "deterministic   yes" in out.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run([sys.executable, "-m", "applications", "solver", "serve", "--solver", "burgers",
                          "--host", "0.0.0.0"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "refusing to bind 0.0.0.0" in bad.stderr and "Traceback" not in bad.stderr
