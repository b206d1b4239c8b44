"""Answer extraction and sub-EM scoring (SQuAD-style normalization), shared by builders and evaluation."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_FINAL = re.compile(r"final answer\s*[:：]\s*(.+)", re.IGNORECASE)
_PUNCT = set(string.punctuation) | {"‘", "’", "“", "”", "—", "–"}


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, squeeze whitespace (the standard QA normalization)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def extract_final_answer(response: str) -> str:
    """The text after the last ``Final answer:`` line, else the last non-empty line."""
    matches = _FINAL.findall(response)
    if matches:
        return matches[-1].strip()
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def sub_em(prediction: str, answers: Iterable[str]) -> bool:
    """Sub-exact-match: some normalized gold answer occurs in the normalized prediction."""
    pred = normalize_answer(prediction)
    if not pred:
        return False
    return any(gold and gold in pred for gold in (normalize_answer(a) for a in answers))
