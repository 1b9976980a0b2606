"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class BenchError(Exception):
    """A user-facing error: the message names the bad input and says how to fix it. The CLI exits with
    `exit_code`: 2 (bad input, the default) or 1 (the work itself failed, e.g. a sweep's job)."""

    exit_code = 2
