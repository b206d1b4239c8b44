"""Sub-EM scoring and the haystack builder (token-exact lengths, evidence depth, determinism)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llamafactory_longpo import demo
from llamafactory_longpo.text.haystack import build_haystack
from llamafactory_longpo.text.scoring import extract_final_answer, normalize_answer, sub_em


@pytest.mark.parametrize(
    "pred,answers,ok",
    [
        ("The Eiffel Tower.", ["eiffel tower"], True),  # case, article, punctuation
        ("It was founded by an ACME Co!", ["Acme co"], True),
        ("Answer: Paris, France", ["Lyon", "paris"], True),  # aliases
        ("The answer is Lyonnais", ["Lyon"], True),  # sub-EM: containment
        ("Berlin", ["Paris", "City of Light"], False),
        ("", ["x"], False),
        ("the a an", ["the"], False),  # an answer that normalizes to nothing never matches
    ],
)
def test_sub_em(pred: str, answers: list[str], ok: bool) -> None:
    assert sub_em(pred, answers) is ok


def test_normalize_and_extract() -> None:
    assert normalize_answer("  The  Quick, brown   FOX's ") == "quick brown foxs"
    assert extract_final_answer("Step 1...\nFinal answer: Quessa\n") == "Quessa"
    assert extract_final_answer("final answer: A\nmore\nFinal Answer: B") == "B"
    assert extract_final_answer("no marker\nlast line") == "last line"


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


def _paragraphs() -> list[str]:
    return [p for t in demo.corpus() for p in t.split("\n\n") if len(p) > 60]


@pytest.mark.parametrize("target", [300, 1000, 2500])
def test_haystack_length_and_evidence(tokenizer, target: int) -> None:
    paras = _paragraphs()
    evidence = ["ZEBRA FACT: the code word is tangerine.", "SECOND FACT: the vault is in Marwick."]
    hay = build_haystack(tokenizer, evidence, paras, target, seed=3)
    n = len(tokenizer.encode(hay.text, add_special_tokens=False))
    assert n == hay.tokens
    assert abs(n - target) <= 0.05 * target
    for e, off in zip(evidence, hay.evidence_offsets):
        assert hay.text[off : off + len(e)] == e
    assert build_haystack(tokenizer, evidence, paras, target, seed=3).text == hay.text  # deterministic
    assert build_haystack(tokenizer, evidence, paras, target, seed=4).text != hay.text


def test_haystack_depth_control(tokenizer) -> None:
    paras = _paragraphs()
    depths = []
    for d in (0.0, 0.25, 0.5, 0.75, 1.0):
        hay = build_haystack(tokenizer, ["NEEDLE: the answer is 42."], paras, 1500, depth=d, seed=0)
        depths.append(hay.depths[0])
    assert depths == sorted(depths) and depths[0] < 0.05 and depths[-1] > 0.9
    two = build_haystack(tokenizer, ["FIRST NEEDLE.", "SECOND NEEDLE."], paras, 1500, depth=[0.9, 0.1], seed=0)
    assert two.depths[0] > 0.8 and two.depths[1] < 0.2


def test_haystack_target_shorter_than_evidence(tokenizer) -> None:
    with pytest.raises(ValueError, match="shorter than the evidence"):
        build_haystack(tokenizer, ["word " * 200], _paragraphs(), 50)
