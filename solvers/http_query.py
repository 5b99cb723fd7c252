"""Query programs over loopback HTTP, in the spirit of UM-Bridge: a server for a callable and its client.

The query itself (shapes, dtypes, checks) is :class:`solvers.query.QuerySpec`; the stdin/stdout
transport is :class:`solvers.query.SubprocessQuery`.

Routes (JSON bodies unless said otherwise):

- ``GET /Info`` → ``{"protocolVersion": 1.0, "models": ["forward"]}``;
- ``POST /ModelInfo`` → ``{"support": {"Evaluate": true, "Gradient": false, ...}, "deepzero": {handshake,
  "npy": bool}}``;
- ``POST /InputSizes`` / ``/OutputSizes`` → ``{"inputSizes": [prod(input_shape)]}`` /
  ``{"outputSizes": [prod(output_shape)]}``;
- ``POST /Evaluate`` with ``{"name": "forward", "input": [[...B·n values...]], "config": {"batch": B}}``
  → ``{"output": [[...B·m values...]]}``; without ``config.batch`` one sample (plain UM-Bridge);
- ``POST /Evaluate`` with ``Content-Type: application/x-npy`` and an ``.npy`` body ``(B, *input_shape)``
  → an ``.npy`` body ``(B, *output_shape)`` (when the server advertises ``"npy": true``).

Errors come back as ``{"error": {"type": ..., "message": ...}}`` with status 400 (bad request) or
500 (the callable failed). Every failure on the client side is a :class:`SolverError`.
"""
from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any

import numpy as np

from solvers.http import MODEL, BridgeHandler, is_loopback
from solvers.protocol import Closeable, SolverError
from solvers.query import QuerySpec

NPY = "application/x-npy"


def make_query_server(fn: Callable[[np.ndarray], np.ndarray], spec: QuerySpec, host: str = "127.0.0.1",
                      port: int = 0, *, allow_remote: bool = False, npy: bool = True,
                      error_types: tuple[type[BaseException], ...] = ()) -> ThreadingHTTPServer:
    """An HTTP server exposing ``fn`` (not started: ``serve_forever()`` or :func:`serve_query_in_thread`).

    Args:
        fn: ``(B, *input_shape)`` array → ``(B, *output_shape)`` array; called under a lock.
        spec: shapes and dtypes; ``spec.info`` is published in ``/ModelInfo``.
        host, port: the bind address; a non-loopback host is refused unless ``allow_remote``.
        npy: accept ``.npy`` bodies on ``/Evaluate`` (and advertise it).
        error_types: exceptions of ``fn`` answered as 400 (the caller's fault, e.g. a spent budget)
            rather than 500.
    """
    if not allow_remote and not is_loopback(host):
        raise SolverError(f"refusing to bind {host}: it is not a loopback address and would expose the model "
                          "to the network; pass allow_remote=True if you mean it")
    lock = threading.Lock()
    n_in, n_out = int(np.prod(spec.input_shape)), int(np.prod(spec.output_shape))
    info = {**spec.handshake(), "npy": bool(npy)}

    class Handler(BridgeHandler):
        def _evaluate(self, x: np.ndarray) -> np.ndarray | None:
            try:
                x = spec.check_input(x, "server")
            except SolverError as exc:
                return self._error(400, "InvalidInput", str(exc))
            try:
                with lock:
                    y = np.asarray(fn(x))
                return spec.check_output(y, x.shape[0], "the served model")
            except error_types as exc:
                return self._error(400, type(exc).__name__, str(exc))
            except Exception as exc:
                return self._error(500, type(exc).__name__, str(exc))

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path == "/Evaluate" and self.headers.get("Content-Type", "").startswith(NPY):
                if not npy:
                    return self._error(400, "InvalidInput", ".npy bodies are not enabled on this server")
                try:
                    x = np.load(io.BytesIO(raw), allow_pickle=False)
                except (ValueError, OSError, EOFError) as exc:
                    return self._error(400, "InvalidInput", f"body is not an .npy array: {exc}")
                y = self._evaluate(x)
                if y is not None:
                    buf = io.BytesIO()
                    np.save(buf, y, allow_pickle=False)
                    self._send(200, buf.getvalue(), NPY)
                return None
            try:
                body = json.loads(raw or b"{}")
            except ValueError as exc:
                return self._error(400, "InvalidInput", f"body is not JSON: {exc}")
            if body.get("name", MODEL) != MODEL:
                return self._error(400, "ModelNotFound",
                                   f"unknown model {body.get('name')!r}; only {MODEL!r}")
            if self.path == "/ModelInfo":
                support = {"Evaluate": True, "Gradient": False, "ApplyJacobian": False, "ApplyHessian": False}
                return self._reply(200, {"support": support, "deepzero": info})
            if self.path == "/InputSizes":
                return self._reply(200, {"inputSizes": [n_in]})
            if self.path == "/OutputSizes":
                return self._reply(200, {"outputSizes": [n_out]})
            if self.path != "/Evaluate":
                return self._error(404, "UnknownRoute", f"no route POST {self.path}")
            try:
                batch = int((body.get("config") or {}).get("batch", 1))
                x = np.asarray(body["input"][0], dtype=spec.input_dtype).reshape(batch, *spec.input_shape)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                return self._error(400, "InvalidInput", f"bad Evaluate request: {exc}")
            y = self._evaluate(x)
            if y is not None:
                self._reply(200, {"output": [y.reshape(-1).tolist()]})
            return None

    return ThreadingHTTPServer((host, port), Handler)


def serve_query_in_thread(fn: Callable[[np.ndarray], np.ndarray], spec: QuerySpec, host: str = "127.0.0.1",
                          port: int = 0, **kw: Any) -> tuple[ThreadingHTTPServer, str]:
    """:func:`make_query_server` serving from a daemon thread; returns ``(server, url)``."""
    server = make_query_server(fn, spec, host, port, **kw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}"


class HTTPQuery(Closeable):
    """Client of a query model behind HTTP: this module's server, or a plain UM-Bridge model.

    With the server's ``deepzero`` block the batch travels in one request (``.npy`` when offered,
    else JSON); a plain UM-Bridge server gets one ``Evaluate`` per sample, and ``spec`` (required
    then) gives the shapes, checked against its ``InputSizes`` / ``OutputSizes``.

    Args:
        url: ``http://host:port``.
        timeout: seconds per request.
        spec: the shapes and dtypes to assume when the server does not declare them.
        role: how errors name the server.
    """

    def __init__(self, url: str, timeout: float = 60.0, *, spec: QuerySpec | None = None,
                 role: str = "query server") -> None:
        self.url, self.timeout, self.role = url.rstrip("/"), float(timeout), role
        self.name = self.url
        info = self._call("GET", "/Info")
        if MODEL not in (info.get("models") or []):
            raise SolverError(f"{role} at {self.url} does not offer model {MODEL!r} "
                              f"(models: {info.get('models')})")
        meta = self._call("POST", "/ModelInfo", {"name": MODEL}).get("deepzero")
        if meta:
            self.spec = QuerySpec.from_handshake(meta, f"{role} at {self.url}")
            self.npy, self.batched = bool(meta.get("npy")), True
        else:
            if spec is None:
                raise SolverError(f"{role} at {self.url} is a plain UM-Bridge model: give its input and "
                                  "output shapes")
            sizes = (self._call("POST", "/InputSizes", {"name": MODEL, "config": {}}).get("inputSizes"),
                     self._call("POST", "/OutputSizes", {"name": MODEL, "config": {}}).get("outputSizes"))
            want = ([int(np.prod(spec.input_shape))], [int(np.prod(spec.output_shape))])
            if list(sizes) != list(want):
                raise SolverError(f"{role} at {self.url} takes {sizes[0]} values and returns {sizes[1]}; "
                                  f"expected {want[0]} (input {spec.input_shape}) and {want[1]} "
                                  f"(output {spec.output_shape})")
            self.spec, self.npy, self.batched = spec, False, False

    def _call(self, method: str, route: str, body: dict | bytes | None = None) -> Any:
        raw = isinstance(body, bytes)
        data = body if raw else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + route, data=data, method=method,
                                     headers={"Content-Type": NPY if raw else "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
                if resp.headers.get("Content-Type", "").startswith(NPY):
                    return np.load(io.BytesIO(payload), allow_pickle=False)
                return json.loads(payload)
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read()).get("error", {})
            except ValueError:
                err = {}
            kind = f"{err['type']}: " if err.get("type") not in (None, "InvalidInput") else ""
            raise SolverError(f"{self.role} at {self.url}: {kind}{err.get('message', exc.reason)}") from None
        except (urllib.error.URLError, OSError) as exc:
            why = getattr(exc, "reason", exc)
            raise SolverError(f"{self.role} at {self.url} unreachable: {why}") from None
        except ValueError as exc:
            raise SolverError(f"{self.role} at {self.url} sent a malformed answer: {exc}") from None

    def _evaluate_json(self, x: np.ndarray, batch: int | None) -> np.ndarray:
        config = {} if batch is None else {"batch": batch}
        reply = self._call("POST", "/Evaluate",
                           {"name": MODEL, "input": [x.reshape(-1).tolist()], "config": config})
        try:
            return np.asarray(reply["output"][0], dtype=self.spec.output_dtype).reshape(
                batch or 1, *self.spec.output_shape)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise SolverError(f"{self.role} at {self.url} sent a malformed answer: {exc}") from None

    def query(self, x: Any) -> np.ndarray:
        """``(B, *input_shape)`` → ``(B, *output_shape)``, checked."""
        who = f"{self.role} at {self.url}"
        arr = self.spec.check_input(x, who)
        if self.npy:
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            out = self._call("POST", "/Evaluate", buf.getvalue())
        elif self.batched:
            out = self._evaluate_json(arr, arr.shape[0])
        else:                                      # plain UM-Bridge: one sample per request
            out = np.concatenate([self._evaluate_json(a, None) for a in arr]) if len(arr) else \
                np.zeros((0, *self.spec.output_shape), self.spec.output_dtype)
        return self.spec.check_output(out, arr.shape[0], who)
