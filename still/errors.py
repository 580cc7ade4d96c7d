"""The one exception type the CLI turns into a one-line error and a non-zero exit."""


class StillError(Exception):
    """A user-facing error: bad input, a missing file, an unusable store.

    The message is one line that names the input and what was expected. The CLI
    prints it to stderr as ``still: error: <message>`` and exits with status 2;
    every other exception is a bug and keeps its traceback.
    """


def carried_still_error(exc: BaseException) -> StillError | None:
    """The :class:`StillError` an error from another Ray process carries in its text, or None.

    A StillError raised in a Ray task or Train worker reaches the caller wrapped
    (``RayTaskError``, ``UserCodeException``, ``TrainingFailedError``) with the remote
    traceback in its message; this recovers the one line a user should read.
    """
    for line in str(exc).splitlines():
        if "StillError: " in line:
            return StillError(line.split("StillError: ", 1)[1].strip())
    return None

