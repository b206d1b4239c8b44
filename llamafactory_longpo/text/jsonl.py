"""Reading a JSONL input line by line, with every skipped line counted by its reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import ConfigError, RecordError

T = TypeVar("T")


def read_inputs(
    path: str, parse: Callable[[str, int], T | str], *, strict: bool, log: Any, tag: str
) -> tuple[list[T], dict[str, int]]:
    """Parse a JSONL input line by line. ``parse(line, lineno)`` returns an item, a string (a reason to
    skip the line, counted), or raises :class:`RecordError` (reported with its line, counted as
    ``malformed``; fatal with ``strict``)."""
    items: list[T] = []
    skipped: dict[str, int] = {}
    try:
        fh = open(path, encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the input ({err.strerror})") from None
    with fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                item = parse(line, lineno)
            except RecordError as err:
                if strict:
                    raise
                log(f"[{tag}] skipped: {err}")
                item = "malformed"
            if isinstance(item, str):
                skipped[item] = skipped.get(item, 0) + 1
                continue
            items.append(item)
    if not items:  # an empty dataset would be registered and fail only at training
        counts = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
        raise ConfigError(f"{path}: no usable input line ({counts or 'the file is empty'})")
    return items, skipped
