"""The one exception type users see: a short message that says what to do, never a traceback."""


class BannermatchError(Exception):
    """A user-facing error. The CLI prints it on one line and exits with code 2."""
