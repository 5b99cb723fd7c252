"""Atomic checkpoints loaded with ``weights_only=True``.

A checkpoint is a dict with a ``format`` marker; it is written to a temporary file in the same
directory, flushed, fsync'ed and renamed over the target (:func:`core.runtime.files.atomic_write`), so a crash never leaves a half-written
file. Loading validates the marker: a corrupt or foreign file is a :class:`UserError` and is
never overwritten (the caller refuses to resume from it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from core.runtime.errors import UserError
from core.runtime.files import atomic_write

FORMAT = "deepzero-checkpoint-v1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    path = Path(path)
    with atomic_write(path, mode=0o600) as f:             # a checkpoint stays its owner's, as before
        torch.save({"format": FORMAT, **state}, f)
    return path


def load_checkpoint(path: str | os.PathLike, *, app: str | None = None) -> dict[str, Any]:
    """Load and validate a checkpoint; ``app`` (if given) must match the app that wrote it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # corrupt, truncated, or a pickle with arbitrary objects
        raise UserError(f"checkpoint {path} is unreadable: corrupt, truncated, or holding objects that a safe "
                        "(weights_only) load refuses") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a deepzero checkpoint (expected format {FORMAT!r})")
    if app is not None and state.get("app") != app:
        raise UserError(f"checkpoint {path} was written by app {state.get('app')!r}, not {app!r}")
    return state
