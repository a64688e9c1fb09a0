"""Errors that are the user's to fix: the CLI prints their one-line message and exits 1."""


class WsssError(Exception):
    """Base class: the message names the file, key or step and the problem."""


class ConfigError(WsssError, ValueError):
    """A config file or override that cannot be used."""


class DataError(WsssError, ValueError):
    """Bad input data: a missing, corrupt or inconsistent file."""


class TrainingError(WsssError, RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is intact."""
