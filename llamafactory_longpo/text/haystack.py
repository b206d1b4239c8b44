"""RULER-style haystacks: evidence paragraphs hidden among distractors, at a token-exact length.

A library function, shared by the SoLoPO builder and the evaluation tasks. Lengths are measured with
the model's tokenizer on the final text; distractors are added whole while they fit and the last one
is cut at a token boundary, so the haystack lands on the target (within a few tokens of boundary
merges, re-measured and trimmed). Evidence depth is controllable (0 = start, 1 = end) and everything is
deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

SEPARATOR = "\n\n"


@dataclass
class Haystack:
    text: str
    tokens: int
    evidence_offsets: list[int]  # character offset of each evidence paragraph in ``text``
    depths: list[float]  # relative position of each evidence paragraph (0 = start, 1 = end)


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def build_haystack(
    tokenizer: Any,
    evidence: Sequence[str],
    distractors: Iterable[str],
    target_tokens: int,
    *,
    depth: Union[None, float, Sequence[float]] = None,
    seed: int = 0,
) -> Haystack:
    """Hide ``evidence`` among ``distractors`` in a text of ``target_tokens`` tokens.

    ``depth``: ``None`` places each evidence paragraph at a random position; a float puts all of them
    around that relative depth (in order); a sequence gives one depth per evidence paragraph.
    Raises ``ValueError`` when the evidence alone is longer than the target.
    """
    rng = random.Random(seed)
    evidence = list(evidence)
    evidence_tokens = _count(tokenizer, SEPARATOR.join(evidence))
    if evidence_tokens > target_tokens:
        raise ValueError(f"target length {target_tokens} is shorter than the evidence ({evidence_tokens} tokens)")

    # distractors whole while they fit, then the last one cut to fill the gap
    budget = target_tokens - evidence_tokens
    filler: list[str] = []
    used = 0
    sep_tokens = _count(tokenizer, SEPARATOR) or 1
    for paragraph in distractors:
        n = _count(tokenizer, paragraph) + sep_tokens
        if used + n <= budget:
            filler.append(paragraph)
            used += n
            continue
        room = budget - used - sep_tokens
        if room > 0:
            ids = tokenizer.encode(paragraph, add_special_tokens=False)[:room]
            filler.append(tokenizer.decode(ids).strip())
        break

    # where the evidence goes among the filler paragraphs
    slots = len(filler) + 1
    if depth is None:
        positions = sorted(rng.randrange(slots) for _ in evidence)
    else:
        depths = [float(depth)] * len(evidence) if isinstance(depth, (int, float)) else [float(d) for d in depth]
        if len(depths) != len(evidence):
            raise ValueError(f"depth: {len(depths)} values for {len(evidence)} evidence paragraphs")
        positions = [min(slots - 1, max(0, round(d * (slots - 1)))) for d in depths]
    order = sorted(range(len(evidence)), key=lambda i: (positions[i], i))
    paragraphs: list[tuple[str, Optional[int]]] = [(p, None) for p in filler]
    for shift, i in enumerate(order):
        paragraphs.insert(positions[i] + shift, (evidence[i], i))

    text = SEPARATOR.join(p for p, _ in paragraphs)
    text, tokens = _fit(tokenizer, text, target_tokens, protected=[e for e in evidence])
    offsets = [0] * len(evidence)
    for p, i in paragraphs:
        if i is not None:
            offsets[i] = text.find(p)
    depths_out = [o / max(1, len(text)) for o in offsets]
    return Haystack(text=text, tokens=tokens, evidence_offsets=offsets, depths=depths_out)


def _fit(tokenizer: Any, text: str, target: int, protected: list[str]) -> tuple[str, int]:
    """Trim tokens at boundaries that merged differently, without touching the evidence."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= target:
        return text, len(ids)
    # cut from the end unless an evidence paragraph ends the text; then cut right before it
    for cut in range(len(ids) - target, len(ids) - target + 16):
        candidate = tokenizer.decode(ids[: len(ids) - cut])
        if all(e in candidate for e in protected):
            n = _count(tokenizer, candidate)
            if n <= target:
                return candidate, n
    return text, len(ids)  # within a handful of tokens; keep the evidence whole
