"""One exception type for mistakes a user can fix (bad flag, missing data, unreadable checkpoint).

The CLI turns a :class:`UserError` into one line on stderr and exit status 2, never a traceback.
"""


class UserError(Exception):
    """A mistake in the user's input; the message says what was wrong and what is allowed."""

    exit_code = 2
