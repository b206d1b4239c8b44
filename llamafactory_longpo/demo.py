"""Demo data written for this project: a small fictional world, rendered as short-to-long records.

The world itself (people, cities, companies and their paragraphs) is :mod:`llamafactory_longpo.text.world`.
Deterministic for a seed, so ``data/*.jsonl`` can be regenerated and checked. SoLoPO records are
multi-hop questions over short evidence (2-3 supporting paragraphs) whose long context hides that
evidence among distractor paragraphs about other entities; LongPO records are long "gazetteer"
documents with several turns, each asking about one chunk of the document.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from .errors import ConfigError
from .text.world import COUNTRIES, World, city_paragraph, company_paragraph, make_world, person_paragraph

SYSTEM = "You are a careful assistant. Answer from the given context and end with 'Final answer: ...'."


def solopo_records(w: World, rng: random.Random, n: int = 64, min_ratio: float = 4.0) -> list[dict[str, Any]]:
    """Two-hop ("where was the founder born") and three-hop ("in which country") questions."""
    records = []
    for i, c in enumerate(w.companies[:n]):
        founder = c["founder"]
        three_hop = i % 2 == 1
        support = [company_paragraph(w, c, rng), person_paragraph(w, founder, rng)]
        if three_hop:
            support.append(city_paragraph(w, founder["city"], rng))
            question = f"In which country was the founder of the {c['name']} born?"
            answer = w.cities[founder["city"]]
            wrong = rng.choice([x for x in COUNTRIES if x != answer])
            chosen = (
                f"The {c['name']} was founded by {founder['name']}. {founder['name']} was born in "
                f"{founder['city']}, which is a city in {answer}. Final answer: {answer}"
            )
            rejected = (
                f"The {c['name']} had its headquarters in {c['hq']}, so its founder was probably born in "
                f"{wrong}. Final answer: {wrong}"
            )
        else:
            question = f"In which city was the founder of the {c['name']} born?"
            answer = founder["city"]
            wrong = c["hq"] if c["hq"] != answer else rng.choice([x for x in sorted(w.cities) if x != answer])
            chosen = (
                f"The {c['name']} was founded by {founder['name']}, and {founder['name']} was born in "
                f"{answer}. Final answer: {answer}"
            )
            rejected = f"The {c['name']} was based in {wrong}, so the founder was born there. Final answer: {wrong}"
        short = "\n\n".join(support)
        distractors: list[str] = []
        others = [x for x in w.companies if x is not c]
        while len("\n\n".join(support + distractors)) < min_ratio * len(short) * 1.15:
            o = rng.choice(others)
            kind = rng.randrange(3)
            distractors.append(
                company_paragraph(w, o, rng)
                if kind == 0
                else person_paragraph(w, o["founder"], rng)
                if kind == 1
                else city_paragraph(w, o["hq"], rng)
            )
        paragraphs = distractors[:]
        for s in support:
            paragraphs.insert(rng.randint(0, len(paragraphs)), s)
        records.append(
            {
                "system": SYSTEM,
                "long_context": "\n\n".join(paragraphs),
                "turns": [{"short_context": short, "instruction": question, "chosen": chosen, "rejected": rejected}],
            }
        )
    return records


def longpo_records(w: World, rng: random.Random, n: int = 32, max_turns: int = 3) -> list[dict[str, Any]]:
    """Gazetteer documents of one country; each turn asks about one chunk (self-instruct style)."""
    records = []
    for i in range(n):
        country = COUNTRIES[i % len(COUNTRIES)]
        cities = [c for c in sorted(w.cities) if w.cities[c] == country] or sorted(w.cities)[:3]
        comps = [c for c in w.companies if c["hq"] in cities] or w.companies[i : i + 4]
        rng.shuffle(comps)
        chunks = []
        for c in comps[: 4 + i % 3]:
            chunk = "\n\n".join([company_paragraph(w, c, rng), person_paragraph(w, c["founder"], rng)])
            chunks.append((c, chunk))
        while len(chunks) < 4:
            c = rng.choice(w.companies)
            chunks.append((c, "\n\n".join([company_paragraph(w, c, rng), person_paragraph(w, c["founder"], rng)])))
        doc_intro = f"A gazetteer of {country}: its cities, firms and the people who founded them."
        turns = []
        for c, chunk in rng.sample(chunks, min(max_turns, 2 + i % 2)):
            kind = rng.randrange(3)
            f = c["founder"]
            if kind == 0:
                q, good = (
                    f"Who founded the {c['name']} and in which year?",
                    f"The {c['name']} was founded by {f['name']} in {c['year']}.",
                )
                bad = f"The {c['name']} was founded by {rng.choice(w.people)['name']} around {c['year'] - rng.randint(5, 30)}."
            elif kind == 1:
                q, good = (
                    f"Where did the founder of the {c['name']} grow up, and when were they born?",
                    f"{f['name']} was born in {f['city']} in {f['year']}.",
                )
                bad = f"The text does not say where the founder of the {c['name']} was born."
            else:
                q, good = (
                    f"Summarize what the passage says about the {c['name']}.",
                    (
                        f"The {c['name']} was founded in {c['year']} by {f['name']}, who was born in {f['city']} in "
                        f"{f['year']}; the firm had its headquarters in {c['hq']}."
                    ),
                )
                bad = "The passage describes a company and some history of the region."
            turns.append({"short_context": chunk, "instruction": q, "chosen": good, "rejected": bad})
        records.append(
            {
                "long_context": doc_intro + "\n\n" + "\n\n".join(ch for _, ch in chunks),
                "turns": turns,
            }
        )
    return records


def corpus(seed: int = 0) -> list[str]:
    """Texts for training the tiny model's tokenizer (the demo world in every phrasing it uses)."""
    recs = build(seed)
    texts = [SYSTEM]
    for rec in recs["solopo_demo"] + recs["longpo_demo"]:
        texts.append(rec["long_context"])
        for t in rec["turns"]:
            texts += [t["short_context"], t["instruction"], t["chosen"], t["rejected"]]
    return texts


def build(seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(seed)
    w = make_world(rng)
    return {"solopo_demo": solopo_records(w, rng), "longpo_demo": longpo_records(w, rng)}


DATASET_INFO = {
    "solopo_demo": {
        "file_name": "data/solopo_demo.jsonl",
        "formatting": "short_to_long",
        "ranking": True,
        "columns": {"system": "system", "long_context": "long_context", "turns": "turns"},
    },
    "longpo_demo": {"file_name": "data/longpo_demo.jsonl", "formatting": "short_to_long", "ranking": True},
}


def write(root: str, seed: int = 0, force: bool = False) -> dict[str, str]:
    """Write ``root/data/*.jsonl`` and merge their entries into ``root/dataset_info.json``.

    The entries are merged, never clobbering other datasets registered in the same file. A data file that
    differs from the demo's (edited, or built with another seed) is kept unless ``force``.
    """
    records = {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs) for name, recs in build(seed).items()}
    for name, text in records.items():
        path = os.path.join(root, DATASET_INFO[name]["file_name"])
        if not force and os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as fh:
                if fh.read() != text:
                    raise ConfigError(f"{path}: differs from the demo's data; move it away, or add --force to write over it")
    info_path = os.path.join(root, "dataset_info.json")
    info: dict[str, Any] = {}
    if os.path.exists(info_path):  # checked before anything is written
        with open(info_path, encoding="utf-8") as fh:
            try:
                info = json.load(fh)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{info_path}: line {err.lineno}: invalid JSON ({err.msg}); fix or remove the file") from None
        if not isinstance(info, dict):
            raise ConfigError(f"{info_path}: expected a JSON object of datasets, got {type(info).__name__}")
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    paths = {}
    for name, text in records.items():
        path = os.path.join(root, DATASET_INFO[name]["file_name"])
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        paths[name] = path
    info.update(DATASET_INFO)
    with open(info_path, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
    return paths
