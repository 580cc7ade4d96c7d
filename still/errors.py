"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class StillError(Exception):
    """A user-facing error: bad input, a missing file, an unusable store.

    The message is one line that names the input and what was expected. The CLI
    prints it to stderr as ``still: error: <message>`` and exits with status 2;
    every other exception is a bug and keeps its traceback.
    """
