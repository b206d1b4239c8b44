"""Errors the plugin reports to users as one line (no traceback): bad records, bad knobs, a run that went wrong."""


class ShortToLongError(ValueError):
    """A user-facing error; ``llamafactory-cli`` prints its message alone and exits with status 1."""


class RecordError(ShortToLongError):
    """A bad short-to-long record; the message names file, record (and line) and field."""


class ConfigError(ShortToLongError):
    """A bad knob or an unusable stage/dataset combination; the message names the key."""


class TrainingError(ShortToLongError):
    """A run stopped on purpose (non-finite loss, output folder in use); the message says what is kept."""
