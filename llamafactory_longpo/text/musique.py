"""MuSiQue-format records (question, answer, paragraphs with ``is_supporting``): the SoLoPO builder's input and the
evaluation's QA-in-haystack task."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import RecordError
from .jsonl import read_inputs


@dataclass
class MusiqueItem:
    key: str
    question: str
    answers: list[str]
    supporting: list[str]
    others: list[str]


def _paragraph(p: dict[str, Any]) -> str:
    title = (p.get("title") or "").strip()
    text = p["paragraph_text"].strip()
    return f"{title}\n{text}" if title else text


def parse_musique_line(line: str, lineno: int, path: str) -> Optional[MusiqueItem]:
    """One MuSiQue line; ``None`` for an unanswerable question; :class:`RecordError` if malformed."""
    where = f"{path}: line {lineno}"
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as err:
        raise RecordError(f"{where}: invalid JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: expected a JSON object")
    if raw.get("answerable") is False:
        return None
    for name in ("question", "answer"):
        if not isinstance(raw.get(name), str) or not raw[name].strip():
            raise RecordError(f"{where}: field '{name}' is missing or empty")
    paragraphs = raw.get("paragraphs")
    if not isinstance(paragraphs, list) or not paragraphs:
        raise RecordError(f"{where}: field 'paragraphs' is missing or empty")
    for i, p in enumerate(paragraphs):
        if not isinstance(p, dict) or not isinstance(p.get("paragraph_text"), str) or not p["paragraph_text"].strip():
            raise RecordError(f"{where}: field 'paragraphs[{i}].paragraph_text' is missing or empty")
    supporting = [_paragraph(p) for p in paragraphs if p.get("is_supporting")]
    if not supporting:
        raise RecordError(f"{where}: no paragraph has 'is_supporting': true")
    aliases = raw.get("answer_aliases") or []
    return MusiqueItem(
        key=str(raw.get("id", f"line{lineno}")),
        question=raw["question"].strip(),
        answers=[raw["answer"], *[a for a in aliases if isinstance(a, str)]],
        supporting=supporting,
        others=[_paragraph(p) for p in paragraphs if not p.get("is_supporting")],
    )


def read_musique(path: str, strict: bool, log: Any = print) -> tuple[list[MusiqueItem], dict[str, int]]:
    """All usable items, and counts of what was skipped (bad lines are reported with their number)."""

    def parse(line: str, lineno: int) -> MusiqueItem | str:
        return parse_musique_line(line, lineno, path) or "unanswerable"

    return read_inputs(path, parse, strict=strict, log=log, tag="build solopo")
