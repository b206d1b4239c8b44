"""A synthetic multi-hop key-value task: the small-scale replication's (``benchmarks/replicate_small.py``)
and the demo's (``llamafactory_longpo.eval.kv_eval``).

A context holds pair facts "Pair Bako Rilu." (the key of Bako is Rilu) over 48 made-up names. The question
asks to follow the keys from a start name a stated number of times ("Follow the keys from Bako two times.");
the answer is a short chain of thought that quotes the facts it follows, then the answer line: ``Pair Bako
Rilu. Pair Rilu Tesa. Final answer: Tesa`` (so the builders' and the evaluation's ``Final answer:`` parsing
applies). Every name is a key at most once in a context, so the chain is unambiguous; facts are random per
item, so the task can only be solved by reading the context.

An item's evidence is two paragraphs of ``facts_per_paragraph`` facts each (one hop fact per paragraph, in
random order, the rest distractor facts): that is the SHORT context. Its ``others`` are filler paragraphs,
one sentence of needle-free prose each (:data:`llamafactory_longpo.text.world.FILLER`); a long context is the
evidence hidden among them (the project's haystack builder), as in passkey and needle-in-a-haystack
retrieval. So a long context holds the same facts as the short one, farther apart and farther from the
question: what changes with length is only the distance the model must read over, the setting in which the
LongPO and SoLoPO papers' base models retrieve well but reason worse.

Why this form, measured on a 2-layer model trained from scratch (BENCHMARKS.md, "Short-to-long at laptop scale"): with the value
right after its key, looking a key up is what an induction head does (find the earlier occurrence of the
current token, copy the token after it; Olsson et al. 2022), which a 2-layer model can learn; with "The key
of Bako is Rilu." it never learned the lookup. With the hop facts always in the same evidence paragraph, or
with long contexts made of more facts, it learned positional shortcuts instead.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from ..text.world import FILLER

SYSTEM = "Answer from the facts."
HOP_WORDS = {1: "one time", 2: "two times", 3: "three times", 4: "four times"}
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def make_names(n: int = 160, seed: int = 0) -> list[str]:
    """``n`` distinct two-syllable names (Bako, Rilu, ...), the same for a seed."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    pairs = [(a + b).capitalize() for a in syllables for b in syllables]
    random.Random(seed).shuffle(pairs)
    return sorted(pairs[:n])


NAMES = make_names(48)  # fewer names than 160 halve the steps the start model needs to learn them


def fact(key: str, value: str) -> str:
    return f"Pair {key} {value}."


def question(start: str, hops: int) -> str:
    return f"Follow the keys from {start} {HOP_WORDS[hops]}."


def answer_text(chain: list[str]) -> str:
    """The chain of thought and final line the model is trained to write."""
    steps = " ".join(fact(chain[i], chain[i + 1]) for i in range(len(chain) - 1))
    return f"{steps} Final answer: {chain[-1]}"


@dataclass
class Item:
    key: str
    question: str
    answer: str
    chain: list[str]
    supporting: list[str]  # the short context's paragraphs (the evidence)
    others: list[str] = field(default_factory=list)  # filler paragraphs for long contexts

    @property
    def short_context(self) -> str:
        return "\n\n".join(self.supporting)

    @property
    def response(self) -> str:
        return answer_text(self.chain)

    def musique(self) -> dict[str, Any]:
        """The item as a MuSiQue-format record (the SoLoPO builder's input format)."""
        paragraphs = [{"idx": i, "title": "", "paragraph_text": p, "is_supporting": True} for i, p in enumerate(self.supporting)]
        paragraphs += [
            {"idx": len(paragraphs) + i, "title": "", "paragraph_text": p, "is_supporting": False}
            for i, p in enumerate(self.others)
        ]
        return {
            "id": self.key,
            "paragraphs": paragraphs,
            "question": self.question,
            "answer": self.answer,
            "answer_aliases": [],
            "answerable": True,
        }


def _paragraph(facts: list[str], rng: random.Random) -> str:
    facts = facts[:]
    rng.shuffle(facts)
    return " ".join(facts)


def make_item(
    key: str,
    rng: random.Random,
    *,
    hops: int = 2,
    facts_per_paragraph: int = 6,
    other_paragraphs: int = 0,
    names: list[str] = NAMES,
    used_keys: set[str] | None = None,
) -> Item:
    """One item; ``used_keys`` (updated) are names that may not be keys here (several items in one document)."""
    taken = set(used_keys or ())
    free = [n for n in names if n not in taken]
    chain = rng.sample(free, hops + 1)
    keys = set(chain[:-1])  # the chain's keys; its last name may also be a distractor key (it is never followed)
    hop_facts = [fact(chain[i], chain[i + 1]) for i in range(hops)]
    n_paragraphs = max(2, hops)
    n_distract = n_paragraphs * facts_per_paragraph - hops
    pool = [n for n in free if n not in keys]
    if n_distract > len(pool):
        raise ValueError(f"{n_distract} distractor keys needed, {len(pool)} names free: use more names or shorter contexts")
    distract_keys = rng.sample(pool, n_distract)
    distract = [fact(k, rng.choice(names)) for k in distract_keys]
    # one hop fact per evidence paragraph (as MuSiQue's two supporting paragraphs), the paragraphs in random
    # order: the second hop's fact is not always in the second one, a position a model can learn instead
    groups: list[list[str]] = [[] for _ in range(n_paragraphs)]
    for i, f in enumerate(hop_facts):
        groups[i % n_paragraphs].append(f)
    it = iter(distract)
    for g in groups:
        while len(g) < facts_per_paragraph:
            g.append(next(it))
    rng.shuffle(groups)
    supporting = [_paragraph(g, rng) for g in groups]
    others = [rng.choice(FILLER) for _ in range(other_paragraphs)]
    if used_keys is not None:
        used_keys.update(keys | set(distract_keys))
    return Item(key=key, question=question(chain[0], hops), answer=chain[-1], chain=chain, supporting=supporting, others=others)


def context_facts(context: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of every fact in a context, in order (filler sentences are skipped)."""
    sentences = [f for p in context.split("\n\n") for f in p.split(". ") if f]
    return [tuple(f.rstrip(".").split(" ")[1:]) for f in sentences if f.startswith("Pair ")]  # type: ignore[misc]


def single_question(key: str) -> str:
    return f"What is the key of {key}?"


def single_answer(key: str, value: str) -> str:
    """The one-lookup answer, with the ``Final answer:`` line the scoring reads."""
    return f"{fact(key, value)} Final answer: {value}"


def recall_question(item: Item, rng: random.Random, n_keys: int = 6, context: str | None = None) -> tuple[str, str]:
    """An auxiliary single-hop question over ``context`` (default: the item's short context): the keys of
    ``n_keys`` names keyed in it ("What are the keys of Bako, Rilu and Tesa?"), answered by quoting the facts;
    with one name, "What is the key of Bako?" and a ``Final answer:`` line (the task's single-hop question).
    Used in the SFT mix: each answer is ``n_keys`` retrievals, so the lookup is learned faster than from
    two-hop questions alone."""
    pairs = context_facts(item.short_context if context is None else context)
    picked = rng.sample(pairs, min(n_keys, len(pairs)))
    if len(picked) == 1:
        return single_question(picked[0][0]), single_answer(*picked[0])
    names = [k for k, _ in picked]
    listed = ", ".join(names[:-1]) + f" and {names[-1]}"
    return f"What are the keys of {listed}?", " ".join(fact(k, v) for k, v in picked)


def long_context(item: Item, mult: int, rng: random.Random) -> str:
    """The item's two evidence paragraphs hidden, in order, among ``2 * (mult - 1)`` of its own filler
    paragraphs (about ``mult`` x the short context; paragraph-level, for training data: the evaluation uses
    the project's token-exact haystack builder)."""
    others = item.others[: 2 * (mult - 1)]
    if len(others) < 2 * (mult - 1):
        raise ValueError(f"{mult}x needs {2 * (mult - 1)} filler paragraphs, the item has {len(item.others)}")
    slots = sorted(rng.randrange(len(others) + 1) for _ in item.supporting)
    paragraphs = list(others)
    for shift, (slot, paragraph) in enumerate(zip(slots, item.supporting)):
        paragraphs.insert(slot + shift, paragraph)
    return "\n\n".join(paragraphs)


def sft_example(
    rng: random.Random,
    *,
    hops: int,
    max_facts: int,
    min_facts: int = 1,
    recall_share: float = 0.5,
    recall_keys: int = 6,
    recall_mults: tuple[int, ...] = (1,),
    key: str = "sft",
) -> tuple[str, str, str]:
    """One example of the SFT mix, as (context, question, answer).

    With probability ``recall_share``: a recall question (:func:`recall_question`, 1 to ``recall_keys``
    names) over a context of ``m`` x the short length, ``m`` drawn from ``recall_mults`` (the names asked
    for are anywhere in it); this is how a start model learns to READ long inputs. Otherwise the
    multi-hop question over a SHORT context whose paragraphs have ``min_facts`` to ``max_facts`` facts
    (small ones make the lookup easy to find): reasoning is taught at the short length only, the
    papers' setting of a model that reads long inputs but reasons worse over them."""
    if rng.random() < recall_share:
        mult = rng.choice(recall_mults)
        item = make_item(key, rng, hops=hops, facts_per_paragraph=max_facts, other_paragraphs=2 * (mult - 1))
        context = item.short_context if mult == 1 else long_context(item, mult, rng)
        question, answer = recall_question(item, rng, n_keys=rng.randint(1, recall_keys), context=context)
        return context, question, answer
    item = make_item(key, rng, hops=hops, facts_per_paragraph=rng.randint(min_facts, max_facts))
    return item.short_context, item.question, item.response


def make_items(prefix: str, n: int, seed: int, **kwargs: Any) -> list[Item]:
    rng = random.Random(seed)
    return [make_item(f"{prefix}{i}", rng, **kwargs) for i in range(n)]


def make_document(key: str, rng: random.Random, chunks: int, **kwargs: Any) -> tuple[str, list[Item]]:
    """A long document of ``chunks`` items (keys unique over the whole document), and the items. Each item's
    two evidence paragraphs are followed by one paragraph of its filler sentences (``other_paragraphs`` of
    ``kwargs``, joined): longer than a short context, so a chunker that groups paragraphs into about one short
    context's length cuts each item's evidence out whole (the LongPO builder's chunks)."""
    used: set[str] = set()
    items = [make_item(f"{key}-{i}", rng, used_keys=used, **kwargs) for i in range(chunks)]
    return "\n\n".join(f"{it.short_context}\n\n{' '.join(it.others)}" for it in items), items


def tokenizer_corpus(seed: int = 0, n: int = 400) -> list[str]:
    """Texts for training the task model's tokenizer: every phrasing the task, the template and the system use."""
    texts = [SYSTEM, "system\nuser\nassistant\n"]
    for it in make_items("tok", n, seed, other_paragraphs=2):
        texts += [it.short_context, *it.others, it.question, it.response, *recall_question(it, random.Random(0))]
        texts += [*recall_question(it, random.Random(0), n_keys=1)]
    for hops in HOP_WORDS:
        texts.append(question(NAMES[0], hops))
    return texts


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
