"""YAML read the way LLaMA-Factory reads it, with its mistakes reported in one line.

``llamafactory-cli train x.yaml key=value`` loads the file and the overrides through OmegaConf, whose loader
takes ``1e-5`` as a number. Plain YAML 1.1 (PyYAML's ``safe_load``) wants a dot, ``1.0e-5``, and reads
``1e-5`` as the string ``"1e-5"``; a config the toolkit trains with would then fail this package's checks
or its memory planner. OmegaConf's loader itself is private API, so the one rule is repeated here.

Two YAML habits lose a value without a word, so they are refused here: a key written twice (plain YAML
keeps one of the two values), and a YAML 1.1 boolean word (``no``, ``off``, ``yes``, ``on``) where a word
is meant: ``save_strategy: no`` reaches the toolkit as ``False``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Optional, Union

import yaml

from .errors import ConfigError

_BOOL_WORDS = re.compile(r"^(?:yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF)$")  # YAML 1.1 only; 1.2 keeps true/false


@dataclass(frozen=True)
class BoolWord:
    """A value written as a YAML 1.1 boolean word, which every YAML reader here turns into ``True``/``False``."""

    key: str
    line: int  # 1-based
    word: str


class _Loader(yaml.SafeLoader):
    """The safe loader, plus floats written with an exponent and no dot (``1e-5``, ``-3E2``); refuses a key
    written twice in one mapping, and notes each value written as a YAML 1.1 boolean word."""

    def __init__(self, stream: Union[str, IO[str]]) -> None:
        super().__init__(stream)
        self.bool_words: list[BoolWord] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # merged keys (<<) may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in first:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {key!r} (first on line {first[key]})", problem_mark=key_node.start_mark
                )
            first[key] = line
            if (
                isinstance(value_node, yaml.ScalarNode)
                and value_node.tag == "tag:yaml.org,2002:bool"
                and value_node.style is None
                and _BOOL_WORDS.match(value_node.value)
            ):
                self.bool_words.append(BoolWord(str(key), value_node.start_mark.line + 1, value_node.value))
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load(stream: Union[str, IO[str]]) -> tuple[Any, list[BoolWord]]:
    loader = _Loader(stream)
    try:
        return loader.get_single_data(), loader.bool_words
    finally:
        loader.dispose()


def load(stream: Union[str, IO[str]]) -> Any:
    """Parse YAML text or an open file; raises :class:`yaml.YAMLError` as ``yaml.safe_load`` does (a key written
    twice included)."""
    return _load(stream)[0]


def read_mapping(path: str, admits_bool: Optional[Callable[[str], bool]] = None) -> dict[str, Any]:
    """The mapping of keys in the YAML file ``path``; any mistake is a :class:`ConfigError` naming the file and line.

    ``admits_bool(key)`` says whether ``key`` may hold ``true``/``false``; a key that may not, written as a
    YAML 1.1 boolean word, is refused with the quoting that keeps the word.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            raw, words = _load(fh)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not valid UTF-8 (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{path}: {where}invalid YAML ({getattr(err, 'problem', None) or err})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got a YAML {type(raw).__name__}")
    for word in words if admits_bool is not None else ():
        if not admits_bool(word.key):
            raise ConfigError(bool_word_line(path, word))
    return raw


def bool_word_line(where: str, word: BoolWord) -> str:
    """The one line for a YAML 1.1 boolean word given to a key that takes no boolean."""
    value = "true" if word.word.lower() in ("yes", "on") else "false"
    line = f"line {word.line}: " if word.line else ""
    return (
        f"{where}: {line}{word.key}: {word.word} is read as {value} (a YAML 1.1 boolean); "
        f'quote it to mean the word: {word.key}: "{word.word}"'
    )


def check_override_bool_words(overrides: list[str], admits_bool: Callable[[str], bool]) -> None:
    """Refuse a command line's ``key=value`` override whose value is a YAML 1.1 boolean word for a key that takes
    no boolean (the toolkit's OmegaConf reads ``save_strategy=no`` as false, as YAML does)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and _BOOL_WORDS.match(value) and not admits_bool(key):
            raise ConfigError(bool_word_line("command line", BoolWord(key, 0, value)))
