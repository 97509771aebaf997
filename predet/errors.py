"""User-facing errors.

A :class:`UserError` is a problem with the user's input (a config key, a file, a flag). The CLI
prints its message as one line on stderr and exits with status 2, never with a traceback.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class Preempted(Exception):
    """A run stopped by SIGTERM / SIGUSR1 after saving its checkpoint (see
    :mod:`predet.engine.preemption`). The CLI prints ``message`` (rank 0) and exits with
    ``status`` (128 + the signal's number)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
