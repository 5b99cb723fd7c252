"""The wire format between deepzero and an external solver program (stdin/stdout).

Every message is one frame: a 1-byte kind, an 8-byte little-endian payload length, the payload.

- kind ``J``: UTF-8 JSON object;
- kind ``N``: one array in NumPy ``.npy`` format (``np.save`` bytes, ``allow_pickle`` off).

Session:
1. On start the program sends ``J {"protocol": "deepzero-solver/1", "state_shape": [...],
   "dtype": "float64", "conditions": ["re", ...]}`` (the handshake).
2. Per step deepzero sends ``J {"op": "step", "conditions": ["re"]}``, then ``N state`` (B, *state_shape),
   then one ``N`` per listed condition, in order. The program answers ``N new_state`` or
   ``J {"error": "message"}``.
3. ``J {"op": "close"}`` asks the program to exit (status 0).
"""
from __future__ import annotations

import io
import json
import struct
from typing import Any, BinaryIO

import numpy as np

PROTOCOL = "deepzero-solver/1"
_HEADER = struct.Struct("<cQ")
MAX_FRAME = 1 << 34


class WireError(Exception):
    """A malformed frame or a closed stream."""


def write_json(stream: BinaryIO, obj: dict[str, Any]) -> None:
    payload = json.dumps(obj).encode()
    stream.write(_HEADER.pack(b"J", len(payload)) + payload)


def write_array(stream: BinaryIO, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    payload = buf.getvalue()
    stream.write(_HEADER.pack(b"N", len(payload)) + payload)


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise WireError("stream closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(stream: BinaryIO) -> tuple[str, Any]:
    """Returns ("J", dict) or ("N", ndarray)."""
    kind, length = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    if length > MAX_FRAME:
        raise WireError(f"frame of {length} bytes is too large")
    payload = _read_exact(stream, length)
    if kind == b"J":
        try:
            return "J", json.loads(payload.decode())
        except ValueError as exc:
            raise WireError(f"bad JSON frame: {exc}")
    if kind == b"N":
        try:
            return "N", np.load(io.BytesIO(payload), allow_pickle=False)
        except ValueError as exc:
            raise WireError(f"bad .npy frame: {exc}")
    raise WireError(f"unknown frame kind {kind!r}")


def serve(solver, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Run the program side of the protocol for an in-process ``solver`` until close/EOF."""
    conditions = list(getattr(solver, "conditions", ()))
    write_json(stdout, {"protocol": PROTOCOL, "state_shape": list(solver.state_shape),
                        "dtype": np.dtype(solver.dtype).str, "conditions": conditions})
    stdout.flush()
    while True:
        try:
            kind, msg = read_frame(stdin)
        except WireError:
            return 0                                   # deepzero went away: exit quietly
        if kind != "J" or msg.get("op") not in ("step", "close"):
            write_json(stdout, {"error": f"expected a step or close request, got {kind} {msg!r:.80}"})
            stdout.flush()
            continue
        if msg["op"] == "close":
            return 0
        try:
            _, state = read_frame(stdin)
            conds = {name: read_frame(stdin)[1] for name in msg.get("conditions", [])}
            out = solver.step(state, **conds)
            write_array(stdout, out)
        except Exception as exc:                        # report, keep serving
            write_json(stdout, {"error": f"{type(exc).__name__}: {exc}"})
        stdout.flush()
