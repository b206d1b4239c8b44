"""RULER-style synthetic long-context tasks, built by the project (no download).

Every sample is a haystack of a token-exact length (the model's tokenizer) with its evidence at a
requested depth, a question, and the gold answers. Same seed, same samples.

Tasks: ``niah_single`` (one key-value needle), ``niah_multikey`` (several needles, one asked),
``niah_multivalue`` (one key with several values, all asked), ``variable_tracking`` (a chain of
assignments with a stated number of hops), ``qa_haystack`` (MuSiQue-format question over its
supporting paragraphs hidden in a haystack), ``doc_qa_single`` / ``doc_qa_multi`` (NIAH-Plus style:
the answer is in one document, or needs two documents, among many).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..errors import ConfigError
from ..text import world
from ..text.haystack import build_haystack

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "qa_haystack", "doc_qa_single", "doc_qa_multi")


@dataclass
class Sample:
    task: str
    length: int
    depth: float
    context: str
    question: str
    answers: list[str]
    match: str = "any"  # "any": one answer suffices (sub-EM); "all": recall over the answers
    tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def filler_paragraphs(rng: random.Random) -> list[str]:
    """Distractor text: a fictional world's paragraphs, shuffled (plain prose, no needles)."""
    paras = sorted(set(world.paragraphs()))
    rng.shuffle(paras)
    return paras


def _key(rng: random.Random) -> str:
    return "-".join("".join(rng.choices(string.ascii_lowercase, k=5)) for _ in range(2))


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 9_999_999))


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def niah_single(tok: Any, length: int, depth: float, rng: random.Random, **_: Any) -> Sample:
    key, value = _key(rng), _number(rng)
    hay = build_haystack(tok, [_needle(key, value)], filler_paragraphs(rng), length, depth=depth, seed=rng.randrange(2**31))
    return Sample(
        "niah_single",
        length,
        depth,
        hay.text,
        f"What is the special magic number for {key}?",
        [value],
        tokens=hay.tokens,
        meta={"needle_depths": hay.depths},
    )


def niah_multikey(tok: Any, length: int, depth: float, rng: random.Random, num_keys: int = 4, **_: Any) -> Sample:
    keys = [_key(rng) for _ in range(num_keys)]
    values = [_number(rng) for _ in keys]
    asked = rng.randrange(num_keys)
    depths = [depth if i == asked else rng.random() for i in range(num_keys)]
    hay = build_haystack(
        tok,
        [_needle(k, v) for k, v in zip(keys, values)],
        filler_paragraphs(rng),
        length,
        depth=depths,
        seed=rng.randrange(2**31),
    )
    return Sample(
        "niah_multikey",
        length,
        depth,
        hay.text,
        f"What is the special magic number for {keys[asked]}?",
        [values[asked]],
        tokens=hay.tokens,
        meta={"needle_depths": hay.depths, "asked": asked},
    )


def niah_multivalue(tok: Any, length: int, depth: float, rng: random.Random, num_values: int = 3, **_: Any) -> Sample:
    key = _key(rng)
    values = [_number(rng) for _ in range(num_values)]
    spread = [min(1.0, max(0.0, depth + (i - (num_values - 1) / 2) * 0.05)) for i in range(num_values)]
    hay = build_haystack(
        tok, [_needle(key, v) for v in values], filler_paragraphs(rng), length, depth=spread, seed=rng.randrange(2**31)
    )
    return Sample(
        "niah_multivalue",
        length,
        depth,
        hay.text,
        f"What are all the special magic numbers for {key}? List every one.",
        values,
        match="all",
        tokens=hay.tokens,
        meta={"needle_depths": hay.depths},
    )


def variable_tracking(tok: Any, length: int, depth: float, rng: random.Random, hops: int = 4, **_: Any) -> Sample:
    names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(hops + 1)]
    value = str(rng.randrange(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    spread = [min(1.0, max(0.0, depth + (i - hops / 2) * 0.04)) for i in range(hops + 1)]
    hay = build_haystack(tok, chain, filler_paragraphs(rng), length, depth=spread, seed=rng.randrange(2**31))
    return Sample(
        "variable_tracking",
        length,
        depth,
        hay.text,
        f"Find all variables that are assigned the value {value} in the text above. List them.",
        names,
        match="all",
        tokens=hay.tokens,
        meta={"hops": hops, "chain": chain},
    )


def qa_haystack(tok: Any, length: int, depth: float, rng: random.Random, records: Optional[list[Any]] = None, **_: Any) -> Sample:
    if not records:
        raise ConfigError("qa_haystack needs MuSiQue-format records (eval config: musique)")
    item = rng.choice(records)
    others = [p for r in records if r is not item for p in r.supporting + r.others]
    rng.shuffle(others)
    hay = build_haystack(
        tok,
        item.supporting,
        item.others + others + filler_paragraphs(rng),
        length,
        depth=[depth] * len(item.supporting),
        seed=rng.randrange(2**31),
    )
    return Sample(
        "qa_haystack",
        length,
        depth,
        hay.text,
        f"Answer the question briefly. Question: {item.question}",
        item.answers,
        tokens=hay.tokens,
        meta={"id": item.key},
    )


def _documents(rng: random.Random) -> tuple[world.World, list[tuple[str, str, dict[str, Any]]]]:
    """A fictional world's documents: (title, text, company) per company."""
    w = world.make_world(random.Random(rng.randrange(2**31)))
    docs = []
    for c in w.companies:
        text = f"{world.company_paragraph(w, c, rng)}\n{world.person_paragraph(w, c['founder'], rng)}"
        docs.append((c["name"], text, c))
    return w, docs


def _doc(title: str, text: str, i: int) -> str:
    return f"Document {i}: {title}\n{text}"


def doc_qa_single(tok: Any, length: int, depth: float, rng: random.Random, **_: Any) -> Sample:
    _, docs = _documents(rng)
    target = rng.randrange(len(docs))
    title, text, company = docs[target]
    rest = [_doc(t, x, i) for i, (t, x, _) in enumerate(docs) if i != target]
    hay = build_haystack(tok, [_doc(title, text, target)], rest, length, depth=depth, seed=rng.randrange(2**31))
    return Sample(
        "doc_qa_single",
        length,
        depth,
        hay.text,
        f"In which year was the {title} founded?",
        [str(company["year"])],
        tokens=hay.tokens,
    )


def doc_qa_multi(tok: Any, length: int, depth: float, rng: random.Random, **_: Any) -> Sample:
    w, docs = _documents(rng)
    target = rng.randrange(len(docs))
    title, _, company = docs[target]
    founder = company["founder"]
    company_doc = _doc(title, world.company_paragraph(w, company, rng), target)
    person_doc = _doc(founder["name"], world.person_paragraph(w, founder, rng), len(docs))
    rest = [_doc(t, x, i) for i, (t, x, c) in enumerate(docs) if c["founder"] is not founder]
    hay = build_haystack(tok, [company_doc, person_doc], rest, length, depth=[depth, rng.random()], seed=rng.randrange(2**31))
    return Sample(
        "doc_qa_multi",
        length,
        depth,
        hay.text,
        f"In which city was the founder of the {title} born?",
        [founder["city"]],
        tokens=hay.tokens,
    )


GENERATORS: dict[str, Callable[..., Sample]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "variable_tracking": variable_tracking,
    "qa_haystack": qa_haystack,
    "doc_qa_single": doc_qa_single,
    "doc_qa_multi": doc_qa_multi,
}


def make_samples(
    tok: Any, tasks: list[str], lengths: list[int], depths: list[float], per_cell: int, seed: int, **options: Any
) -> list[Sample]:
    """Every (task, length, depth) cell, ``per_cell`` samples each; deterministic for a seed."""
    out = []
    for task in tasks:
        if task not in GENERATORS:
            raise ConfigError(f"tasks: {task!r} is not one of {', '.join(TASKS)}")
        for length in lengths:
            for depth in depths:
                for i in range(per_cell):
                    rng = random.Random(json.dumps([seed, task, length, depth, i]))
                    out.append(GENERATORS[task](tok, length, depth, rng, **options))
    return out


def score(sample: Sample, prediction: str) -> float:
    """Sub-EM for single-answer tasks; recall of the answers for list tasks (substring, normalized)."""
    from ..text.scoring import normalize_answer, sub_em

    if sample.match == "any":
        return float(sub_em(prediction, sample.answers))
    pred = normalize_answer(prediction)
    return sum(normalize_answer(a) in pred for a in sample.answers) / len(sample.answers)
