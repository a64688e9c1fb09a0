"""Errors that are the user's to fix: the CLI prints their one-line message and exits 1."""


class WsssError(Exception):
    """Base class: the message names the file, key or step and the problem."""


class ConfigError(WsssError, ValueError):
    """A config file or override that cannot be used."""


class DataError(WsssError, ValueError):
    """Bad input data: a missing, corrupt or inconsistent file."""


class TrainingError(WsssError, RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is intact."""


def user_message(error: BaseException) -> str:
    """The one-line message of `error`. A DataLoader worker's error reaches the main process re-raised
    with the worker's traceback as its message ("Caught DataError in DataLoader worker process 0.
    Original Traceback ..."); the user's message is its last line, after the exception's name."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    _, sep, message = last.partition(f"{type(error).__name__}: ")  # "wsss.errors.DataError: PATH: problem"
    return message if sep else last
