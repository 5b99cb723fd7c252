"""The runtime's exceptions: mistakes a user can fix, and training that cannot go on.

The CLI turns a :class:`UserError` into one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

from contextlib import contextmanager


class UserError(Exception):
    """A mistake in the user's input; the message says what was wrong and what is allowed."""

    exit_code = 2


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@contextmanager
def user_errors(what: str = ""):
    """Turn the library's ValueError/OSError into one-line :class:`UserError`.

    Wrap only code that consumes user input (building data, models and estimators from a config),
    where such an exception means a bad value or a missing file, not a bug (other exceptions keep
    their traceback).
    """
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{what}{text}") from None
