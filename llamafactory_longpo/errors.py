"""Errors the plugin reports to users as one line (no traceback): bad records, bad knobs, a run that went wrong."""

TRACEBACK_ENV = "LLAMAFACTORY_LONGPO_TRACEBACK"  # =1: let other errors show their traceback (for debugging)


class ShortToLongError(ValueError):
    """A user-facing error; ``llamafactory-cli`` prints its message alone and exits with status 1."""


class RecordError(ShortToLongError):
    """A bad short-to-long record; the message names file, record (and line) and field."""


class ConfigError(ShortToLongError):
    """A bad knob or an unusable stage/dataset combination; the message names the key."""


class TrainingError(ShortToLongError):
    """A run stopped on purpose (non-finite loss, output folder in use); the message says what is kept."""


class Interrupted(TrainingError):
    """Ctrl-C; exits with 130 like a shell-interrupted command."""

    exit_code = 130


class Terminated(TrainingError):
    """SIGTERM (what a scheduler sends to end a job); exits with 143 (128 + 15) like a terminated command."""

    exit_code = 143


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def one_line(err: BaseException) -> str:
    """Any error in one line: its first line, and its root cause's when that says something else."""
    text = _first_line(err)
    root = err
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    if root is not err and _first_line(root) not in text:
        text += f" (caused by {_first_line(root)})"
    return text
