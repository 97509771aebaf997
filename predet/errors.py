"""User-facing errors.

A :class:`UserError` is a problem with the user's input (a config key, a file, a flag). The CLI
prints its message as one line on stderr and exits with status 2, never with a traceback.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""
