"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class BenchError(Exception):
    """A user-facing error: the message names the bad input and says how to fix it."""
