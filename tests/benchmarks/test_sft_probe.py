"""The SFT probe (benchmarks/sft_probe.py): the answer's names get the right roles under the replication's
own tokenizer, and a two-step run prints accuracy and the per-role losses (no value asserted: two steps
teach nothing)."""

from __future__ import annotations

import math
import random
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from llamafactory_longpo.eval import kv_hops as kv
from llamafactory_longpo.tiny import train_tokenizer
from tests.conftest import ROOT, benchmark_module, run_command


@pytest.fixture
def sft_probe(monkeypatch: pytest.MonkeyPatch):
    return benchmark_module(monkeypatch, "sft_probe")


def test_name_roles_mark_the_two_lookups_and_the_copies(sft_probe):
    tokenizer = train_tokenizer(kv.tokenizer_corpus(0), 1024)
    item = kv.make_item("t", random.Random(3))
    roles = sft_probe.name_roles(tokenizer, item)
    tokens = tokenizer(item.response, add_special_tokens=False)["input_ids"]
    names = {i: tokenizer.decode([tokens[i]]).strip() for i in roles}
    # "Pair A B. Pair B C. Final answer: C": A copy, B hop 1, B copy, C hop 2, C copy
    assert [roles[i] for i in sorted(roles)] == ["copy", "hop 1", "copy", "hop 2", "copy"]
    assert [names[i] for i in sorted(names)] == [item.chain[0], item.chain[1], item.chain[1], item.chain[2], item.chain[2]]


class _Oracle(torch.nn.Module):
    """A STUB standing in for a trained model (what is under test is the probe's bookkeeping, not a model):
    its logits put all mass on the true next token, and it "generates" each held-out item's own answer."""

    def __init__(self, tokenizer, items: list) -> None:
        super().__init__()
        self.vocab = len(tokenizer)
        self.answers = iter([tokenizer(it.response, add_special_tokens=False)["input_ids"] for it in items])

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.full((*input_ids.shape, self.vocab), -30.0)
        logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 30.0)
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        answers = [next(self.answers) for _ in range(input_ids.size(0))]
        width = max(map(len, answers))
        tail = torch.tensor([a + [0] * (width - len(a)) for a in answers])
        return torch.cat([input_ids, tail], dim=1)


def test_probe_scores_a_perfect_model_perfectly(sft_probe):
    tokenizer = train_tokenizer(kv.tokenizer_corpus(0), 1024)
    items = kv.make_items("t", 30, 5, facts_per_paragraph=2)
    accuracy, roles = sft_probe.probe(_Oracle(tokenizer, items), tokenizer, items)
    assert accuracy == 1.0
    assert set(roles) == {"copy", "hop 1", "hop 2"} and all(loss < 1e-6 for loss in roles.values())


def test_probe_runs_and_reports(tmp_path):
    args = ["--steps", "2", "--every", "2", "--hidden", "32", "--eval-items", "4"]
    proc = run_command([sys.executable, str(ROOT / "benchmarks" / "sft_probe.py"), *args], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("[probe] step 2 ")]
    assert line and "short accuracy" in line[0] and "lookup hop 1" in line[0] and "lookup hop 2" in line[0] and "copy" in line[0]
    # two steps at the start of warm-up: every name's loss is still that of a near-uniform guess over the vocabulary
    vocab = (len(train_tokenizer(kv.tokenizer_corpus(0), 1024)) + 63) // 64 * 64  # the model builder's rounding
    losses = [float(x) for x in re.findall(r"(?:hop \d|copy) (\d+\.\d+)", line[0])]
    assert len(losses) == 3 and all(abs(loss - math.log(vocab)) < 0.3 for loss in losses), line[0]
    # and the accuracy by length of both tasks (1x/2x/4x/8x), each a whole percentage of 4 questions
    by_length = [x for x in proc.stdout.splitlines() if x.startswith("[probe] step 2 by length (4 questions")]
    assert by_length and re.search(r"single \d+/\d+/\d+/\d+; two-hop \d+/\d+/\d+/\d+$", by_length[0]), by_length
