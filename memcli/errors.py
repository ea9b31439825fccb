"""The one error type users see: a single line, exit code 2, no traceback."""


class MemcliError(Exception):
    """A problem with the user's input (file, line, key, option) that memcli reports in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message.replace("\n", " "))


class RunAborted(MemcliError):
    """A run ended by a fault outside the user's input (another rank died, the launcher stopped it): exit code 1."""

    exit_code = 1
