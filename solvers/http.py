"""Loopback HTTP adapter in the spirit of UM-Bridge (Seelinger et al., JOSS 2023).

Server routes (JSON bodies):

- ``GET /Info`` → ``{"protocolVersion": 1.0, "models": ["forward"]}``
- ``POST /ModelInfo`` → ``{"support": {"Evaluate": true, "Gradient": false, "ApplyJacobian": false,
  "ApplyHessian": false}, "deepzero": {"state_shape": [...], "dtype": "<f8", "conditions": [...]}}``
- ``POST /InputSizes`` / ``POST /OutputSizes`` → ``{"inputSizes": [n]}`` / ``{"outputSizes": [n]}``
  with n the size of one sample's state;
- ``POST /Evaluate`` with ``{"name": "forward", "input": [[...B·n values...]],
  "config": {"batch": B, "conditions": {"re": [...]}}}`` → ``{"output": [[...B·n values...]]}``.
  Without ``config.batch`` the input is one sample (plain UM-Bridge).

Floats travel as JSON numbers (shortest round-trip repr), so values arrive bit-exact. Errors come
back as ``{"error": {"type": ..., "message": ...}}`` with status 400 (bad input) or 500 (solver).
The server binds 127.0.0.1 unless ``allow_remote=True``.
"""
from __future__ import annotations

import ipaddress
import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from solvers.protocol import Closeable, SolverError, as_condition, as_state, check_output

MODEL = "forward"


def is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


class BridgeHandler(BaseHTTPRequestHandler):
    """What every deepzero HTTP server answers alike: quiet logs, JSON replies and errors, ``GET /Info``."""

    def log_message(self, *args) -> None:  # keep the terminal quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _reply(self, status: int, obj: dict[str, Any]) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, status: int, kind: str, message: str) -> None:
        self._reply(status, {"error": {"type": kind, "message": message}})

    def do_GET(self) -> None:
        if self.path == "/Info":
            self._reply(200, {"protocolVersion": 1.0, "models": [MODEL]})
        else:
            self._error(404, "UnknownRoute", f"no route GET {self.path}")


def make_server(solver, host: str = "127.0.0.1", port: int = 0, *, allow_remote: bool = False) -> ThreadingHTTPServer:
    """An HTTP server exposing ``solver`` (not started: call ``serve_forever`` or use ``serve_in_thread``)."""
    if not allow_remote and not is_loopback(host):
        raise SolverError(f"refusing to bind {host}: it is not a loopback address and would expose the solver to "
                          "the network; pass allow_remote=True (CLI: --allow-remote) if you mean it")
    lock = threading.Lock()
    n = int(np.prod(solver.state_shape))
    info = {"state_shape": list(solver.state_shape), "dtype": np.dtype(solver.dtype).str,
            "conditions": list(getattr(solver, "conditions", ()))}

    class Handler(BridgeHandler):
        def do_POST(self) -> None:
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            except ValueError as exc:
                return self._error(400, "InvalidInput", f"body is not JSON: {exc}")
            if body.get("name", MODEL) != MODEL:
                return self._error(400, "ModelNotFound", f"unknown model {body.get('name')!r}; only {MODEL!r}")
            if self.path == "/ModelInfo":
                return self._reply(200, {"support": {"Evaluate": True, "Gradient": False, "ApplyJacobian": False,
                                                     "ApplyHessian": False}, "deepzero": info})
            if self.path == "/InputSizes":
                return self._reply(200, {"inputSizes": [n]})
            if self.path == "/OutputSizes":
                return self._reply(200, {"outputSizes": [n]})
            if self.path != "/Evaluate":
                return self._error(404, "UnknownRoute", f"no route POST {self.path}")
            config = body.get("config") or {}
            try:
                batch = int(config.get("batch", 1))
                flat = np.asarray(body["input"][0], dtype=solver.dtype)
                state = flat.reshape(batch, *solver.state_shape)
                conds = {k: np.asarray(v) for k, v in (config.get("conditions") or {}).items()}
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                return self._error(400, "InvalidInput", f"bad Evaluate request: {exc}")
            try:
                with lock:
                    out = solver.step(state, **conds)
            except SolverError as exc:
                return self._error(500, "SolverError", str(exc))
            except Exception as exc:
                return self._error(500, "SolverError", f"{type(exc).__name__}: {exc}")
            self._reply(200, {"output": [out.reshape(-1).tolist()]})

    return ThreadingHTTPServer((host, port), Handler)


def serve_in_thread(solver, host: str = "127.0.0.1", port: int = 0, **kw) -> tuple[ThreadingHTTPServer, str]:
    server = make_server(solver, host, port, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}"


class HTTPSolver(Closeable):
    """Client for a solver behind the HTTP adapter (``deepzero solver serve``)."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url, self.timeout = url.rstrip("/"), float(timeout)
        self.name = self.url
        info = self._call("GET", "/Info")
        if MODEL not in info.get("models", []):
            raise SolverError(f"{self.url} does not offer model {MODEL!r} (models: {info.get('models')})")
        meta = self._call("POST", "/ModelInfo", {"name": MODEL}).get("deepzero")
        if meta:
            self.state_shape = tuple(meta["state_shape"])
            self.dtype = np.dtype(meta["dtype"])
            self.conditions = tuple(meta.get("conditions", ()))
        else:   # a plain UM-Bridge model: one flat float64 vector
            self.state_shape = (int(self._call("POST", "/InputSizes", {"name": MODEL})["inputSizes"][0]),)
            self.dtype, self.conditions = np.dtype(np.float64), ()

    def _call(self, method: str, route: str, body: dict | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + route, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read()).get("error", {})
            except ValueError:
                err = {}
            raise SolverError(f"solver at {self.url}: {err.get('message', exc.reason)}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise SolverError(f"solver at {self.url} unreachable: {getattr(exc, 'reason', exc)}") from None

    def step(self, state: Any, **conditions: Any) -> np.ndarray:
        arr = as_state(state, self.state_shape, self.dtype, self.name)
        conds = {k: as_condition(k, v, self.name).tolist() for k, v in conditions.items()}
        reply = self._call("POST", "/Evaluate", {"name": MODEL, "input": [arr.reshape(-1).tolist()],
                                                  "config": {"batch": arr.shape[0], "conditions": conds}})
        out = np.asarray(reply["output"][0], dtype=self.dtype).reshape(arr.shape)
        return check_output(out, arr.shape[0], self.state_shape, self.dtype, self.name)
