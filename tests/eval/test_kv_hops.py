"""The key-value task's design (``kv_hops``), on which the start model's results depend: pair facts, filler
long contexts holding no fact, the hop facts' paragraphs in random order, and LongPO documents whose chunks
are whole items."""

from __future__ import annotations

import random

from transformers import AutoTokenizer

from llamafactory_longpo.builders.longpo import chunk_document
from llamafactory_longpo.eval import kv_hops as kv
from llamafactory_longpo.text.world import FILLER
from tests.conftest import ROOT


def test_long_contexts_add_filler_only_and_hop_facts_move_between_paragraphs() -> None:
    rng = random.Random(0)
    second_hop_first = 0
    for i in range(200):
        it = kv.make_item(f"t{i}", rng, facts_per_paragraph=2, other_paragraphs=6)
        assert all(p in FILLER for p in it.others)
        long = kv.long_context(it, 4, rng)
        assert kv.context_facts(long) == kv.context_facts(it.short_context)  # the filler holds no fact
        facts = [dict(kv.context_facts(p)) for p in it.supporting]
        first = 0 if facts[0].get(it.chain[0]) == it.chain[1] else 1  # the paragraph with the first hop's fact
        assert facts[first].get(it.chain[0]) == it.chain[1] and facts[1 - first].get(it.chain[1]) == it.chain[2]
        second_hop_first += facts[0].get(it.chain[1]) == it.chain[2]
    # the second hop's fact is in either paragraph (a fixed position would be a shortcut), about half the time
    assert 70 <= second_hop_first <= 130


def test_answers_quote_pair_facts() -> None:
    it = kv.make_item("t", random.Random(1), facts_per_paragraph=2)
    a, b, c = it.chain
    assert it.response == f"Pair {a} {b}. Pair {b} {c}. Final answer: {c}"
    assert {(a, b), (b, c)} <= set(kv.context_facts(it.short_context))


def test_document_chunks_are_whole_items() -> None:
    """What the LongPO builder's chunker (about one short context per chunk) makes of a document: each item's
    evidence is one chunk; the filler paragraphs are chunks of their own."""
    tok = AutoTokenizer.from_pretrained(ROOT / "examples" / "demo_model")
    short = len(tok.encode(kv.make_item("s", random.Random(2), facts_per_paragraph=2).short_context))
    rng = random.Random(3)
    for i in range(20):
        text, items = kv.make_document(f"d{i}", rng, 4, facts_per_paragraph=2, other_paragraphs=2)
        chunks = chunk_document(tok, text, int(0.75 * short), int(1.25 * short))
        assert [c for c in chunks if kv.context_facts(c)] == [it.short_context for it in items]
        filler = [c for c in chunks if not kv.context_facts(c)]
        assert filler  # each item's filler paragraph is longer than a chunk: it is cut into chunks of its own
        for c in filler:
            for sentence in FILLER:
                c = c.replace(sentence, "")
            assert not c.strip(), c  # filler only
