"""The unified short-to-long record: parsing, validation and chat views.

A record is one long context and its turns, each with a short context and a chosen/rejected pair.

Imports nothing from LLaMA-Factory so builders, evaluation and tests can use it alone. Every error
names the file, the record (and its line for JSONL) and the field, in one line.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import RecordError

RECORD_FIELDS: tuple[str, ...] = ("system", "long_context", "turns")
TURN_FIELDS: tuple[str, ...] = ("short_context", "instruction", "chosen", "rejected")
ALL_FIELDS: tuple[str, ...] = RECORD_FIELDS + TURN_FIELDS
DEFAULT_JOINER = "\n\n"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Turn:
    short_context: str
    instruction: str
    chosen: str
    rejected: str


@dataclass
class Record:
    long_context: str
    turns: list[Turn]
    system: Optional[str] = None
    # where it came from, for messages
    source: str = field(default="<memory>", compare=False)
    index: int = field(default=0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"long_context": self.long_context, "turns": [vars(t).copy() for t in self.turns]}
        if self.system:
            out = {"system": self.system, **out}
        return out


def _where(source: str, index: int, line: Optional[int]) -> str:
    return f"{source}: record {index}" + (f" (line {line})" if line is not None else "")


def parse_record(
    raw: Any,
    *,
    source: str = "<memory>",
    index: int = 0,
    line: Optional[int] = None,
    columns: Optional[Mapping[str, str]] = None,
) -> Record:
    """Validate one raw record and return it in canonical form.

    ``columns`` maps canonical names (``long_context``, ``turns``, ``short_context``...) to the names
    used in the file, the way ``dataset_info.json`` renames columns.
    """
    cols = {name: (columns or {}).get(name, name) for name in ALL_FIELDS}
    where = _where(source, index, line)

    def fail(fld: str, reason: str) -> RecordError:
        return RecordError(f"{where}: field '{fld}' {reason}")

    if not isinstance(raw, Mapping):
        raise RecordError(f"{where}: expected a JSON object, got {type(raw).__name__}")

    def text(obj: Mapping[str, Any], name: str, label: str, required: bool = True) -> Optional[str]:
        key = cols[name]
        if key not in obj or obj[key] is None:
            if required:
                hint = _misnamed_hint(obj, key)
                raise fail(label, "is missing" + hint)
            return None
        value = obj[key]
        if not isinstance(value, str):
            raise fail(label, f"must be a string, got {type(value).__name__}")
        if required and not value.strip():
            raise fail(label, "is empty")
        lone = _SURROGATE.search(value)
        if lone:  # JSON's "\ud800" escapes decode to one; no tokenizer, Arrow nor UTF-8 file can hold it
            raise fail(
                label,
                f"holds a lone UTF-16 surrogate (\\u{ord(lone.group()):04x} at character {lone.start()}), which is not text",
            )
        return value

    system = text(raw, "system", cols["system"], required=False)
    long_context = text(raw, "long_context", cols["long_context"])
    turns_raw = raw.get(cols["turns"])
    if turns_raw is None:
        raise fail(cols["turns"], "is missing" + _misnamed_hint(raw, cols["turns"]))
    if not isinstance(turns_raw, list):
        raise fail(cols["turns"], f"must be a list, got {type(turns_raw).__name__}")
    if not turns_raw:
        raise fail(cols["turns"], "is empty (a record needs at least one turn)")
    turns = []
    for t, turn in enumerate(turns_raw):
        if not isinstance(turn, Mapping):
            raise fail(f"{cols['turns']}[{t}]", f"must be an object, got {type(turn).__name__}")
        values = [text(turn, name, f"{cols['turns']}[{t}].{cols[name]}") for name in TURN_FIELDS]
        turns.append(Turn(*values))  # type: ignore[arg-type]
    return Record(long_context=long_context, turns=turns, system=system or None, source=source, index=index)


def _misnamed_hint(obj: Mapping[str, Any], key: str) -> str:
    """Suggest the closest present key, since a misnamed field is the common mistake."""
    import difflib

    close = difflib.get_close_matches(key, [str(k) for k in obj.keys()], n=1, cutoff=0.6)
    return f" (found '{close[0]}'; rename it or map it under \"columns\" in dataset_info.json)" if close else ""


def iter_raw_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, Optional[int], Any]]:
    """Yield ``(record_index, line_number_or_None, raw_object)`` from a JSON array or JSONL file.

    Raises :class:`RecordError` on a non-UTF-8 file or a line that is not JSON.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise RecordError(f"{path}: line {line}: not valid UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
    text = text.lstrip("\ufeff")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
        for i, item in enumerate(items):
            yield i, None, item
        return
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: record {index} (line {lineno}): invalid JSON ({err.msg})") from None
        yield index, lineno, item
        index += 1


def load_records(path: str | os.PathLike[str], columns: Optional[Mapping[str, str]] = None) -> list[Record]:
    """Read and validate every record of a file; the first bad record raises :class:`RecordError`."""
    return [
        parse_record(raw, source=os.fspath(path), index=i, line=line, columns=columns) for i, line, raw in iter_raw_records(path)
    ]


# ----------------------------------------------------------------------------------------------
# Chat views. Messages use LLaMA-Factory's internal shape {"role", "content"}.
# ----------------------------------------------------------------------------------------------
def user_message(context: str, instruction: str, joiner: str = DEFAULT_JOINER) -> dict[str, str]:
    return {"role": "user", "content": f"{context}{joiner}{instruction}"}


def assistant_message(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def short_prompt(record: Record, turn: int, joiner: str = DEFAULT_JOINER) -> list[dict[str, str]]:
    """Short view of one turn: ``[user(short_context_i, instruction_i)]``."""
    t = record.turns[turn]
    return [user_message(t.short_context, t.instruction, joiner)]


def long_conversation(
    record: Record, side: str, upto: Optional[int] = None, joiner: str = DEFAULT_JOINER
) -> list[dict[str, str]]:
    """Long multi-turn view: turn 1 carries the long context, later turns only the instruction.

    ``side`` is ``"chosen"`` or ``"rejected"``: which response fills the assistant turns. With
    ``upto=i`` the conversation stops at the user message of turn ``i`` (a prompt for that turn).
    """
    messages: list[dict[str, str]] = []
    last = len(record.turns) if upto is None else upto + 1
    for i, t in enumerate(record.turns[:last]):
        content = f"{record.long_context}{joiner}{t.instruction}" if i == 0 else t.instruction
        messages.append({"role": "user", "content": content})
        if upto is None or i < upto:
            messages.append(assistant_message(getattr(t, side)))
    return messages
