"""The keys a training run accepts: the fields of the toolkit's argument classes (with the plugin's knobs, once
:func:`.integration.patch_parser` has swapped them in), their types, and the nearest key to a typo."""

from __future__ import annotations

import re
import typing
from collections.abc import Iterable
from typing import Any


def train_arg_classes() -> list[type]:
    from llamafactory.hparams import parser

    return list(parser._TRAIN_ARGS)


def known_keys() -> list[str]:
    """Every key a training run accepts: the fields of the toolkit's (patched) argument classes."""
    return sorted({f for cls in train_arg_classes() for f in getattr(cls, "__dataclass_fields__", {})})


def unknown_keys_line(keys: list[str]) -> str:
    """``unknown key 'lerning_rate' (did you mean 'learning_rate'?)`` for keys no training argument class has."""
    import difflib

    known = known_keys()
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown key {', '.join(parts)}"


def _type_admits_bool(annotation: Any) -> bool:
    if isinstance(annotation, str):  # postponed annotations (``from __future__ import annotations``)
        return bool(re.search(r"\b(bool|Any)\b", annotation))
    if annotation is bool or annotation is Any:
        return True
    return any(_type_admits_bool(arg) for arg in typing.get_args(annotation) if not isinstance(arg, (str, int)))


def admits_bool_in(classes: Iterable[type], key: str) -> bool:
    """Whether ``key``, a field of one of the dataclasses ``classes``, may hold ``true``/``false`` (a key none of
    them has: yes, it is reported as unknown elsewhere)."""
    for cls in classes:
        found = getattr(cls, "__dataclass_fields__", {}).get(key)
        if found is not None:
            return _type_admits_bool(found.type)
    return True


def admits_bool(key: str) -> bool:
    """Whether training key ``key`` may hold ``true``/``false``."""
    return admits_bool_in(train_arg_classes(), key)
