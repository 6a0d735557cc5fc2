"""User-facing errors.

A `UserError` is a mistake the user can fix (a bad config value, a missing file, bad data).
The CLI prints its message as one line and exits 1; `--debug` shows the traceback.
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls; the message says what is wrong and what to do."""


class ConfigError(UserError):
    """The config file is unreadable or does not validate."""
