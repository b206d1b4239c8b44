"""The start-model variants (benchmarks/sft_probe_variants.py) change the task and the model as their
documentation says; the BENCHMARKS numbers depend on it. No training: each variant is applied in this process
and undone afterwards."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2ForCausalLM

from llamafactory_longpo.eval import kv_hops as kv
from llamafactory_longpo.text.world import FILLER
from tests.conftest import benchmark_module


@pytest.fixture
def variants(monkeypatch: pytest.MonkeyPatch):
    """The script as a module; whatever it replaces in kv_hops or on the model class is restored afterwards."""
    for name in ("make_item", "fact", "context_facts", "NAMES"):
        monkeypatch.setattr(kv, name, getattr(kv, name))
    monkeypatch.setattr(Qwen2ForCausalLM, "from_pretrained", Qwen2ForCausalLM.from_pretrained)
    return benchmark_module(monkeypatch, "sft_probe_variants")


def test_pair_facts_filler_names_and_shuffled_evidence(variants) -> None:
    variants.use_pair_facts()
    variants.use_items("filler", 48, shuffle_evidence=True, pair_facts=True)
    rng = random.Random(0)
    items = [kv.make_item(f"t{i}", rng, hops=2, facts_per_paragraph=2, other_paragraphs=6) for i in range(60)]
    second_hop_first = 0
    for it in items:
        assert all(p in FILLER for p in it.others)
        assert set(it.chain) <= set(kv.make_names(48))
        assert it.response.startswith(f"Pair {it.chain[0]} {it.chain[1]}. Pair {it.chain[1]} {it.chain[2]}.")
        long = kv.long_context(it, 4, rng)
        assert kv.context_facts(long) == kv.context_facts(it.short_context)  # the filler holds no fact
        assert (it.chain[1], it.chain[2]) in kv.context_facts(it.short_context)
        second_hop_first += f"Pair {it.chain[1]} {it.chain[2]}." in it.supporting[0]
    assert 10 < second_hop_first < 50  # the second hop's paragraph comes first in about half the items


def test_other_relations_and_key_facts_only(variants) -> None:
    variants.use_items("relations-disjoint", 160, shuffle_evidence=False, pair_facts=False)
    it = kv.make_item("t", random.Random(1), hops=2, facts_per_paragraph=2, other_paragraphs=8)
    others = [f for p in it.others for f in p.split(". ")]
    assert len(others) == 16 and not any(f.startswith("The key of") for f in others)
    assert not any(f" of {name} is" in p for p in it.others for name in it.chain)  # disjoint keys
    assert kv.context_facts(kv.long_context(it, 5, random.Random(2))) == kv.context_facts(it.short_context)


def test_drill_restates_every_fact_once(variants, monkeypatch: pytest.MonkeyPatch) -> None:
    variants.use_items("filler", 48, shuffle_evidence=False, pair_facts=False)
    probe = benchmark_module(monkeypatch, "sft_probe")
    monkeypatch.setattr(probe, "sft_example", probe.sft_example)
    variants.use_restatements(probe, 1.0, shuffled=True)
    in_order = 0
    for seed in range(8):
        context, question, answer = probe.sft_example(probe.FULL, random.Random(seed))
        assert question == "Quote every key."
        quoted = [tuple(f.removeprefix("The key of ").rstrip(".").split(" is ")) for f in answer.split(". ")]
        assert sorted(quoted) == sorted(kv.context_facts(context))
        in_order += quoted == kv.context_facts(context)
    assert in_order < 8  # shuffled, not the context's order


def test_mimetic_init_ties_keys_to_queries(variants, tiny_model) -> None:
    plain = Qwen2ForCausalLM.from_pretrained(str(tiny_model)).model.layers[0].self_attn
    variants.use_mimetic_init(3.0)
    model = Qwen2ForCausalLM.from_pretrained(str(tiny_model))
    config = model.config
    dim = config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    attn = model.model.layers[0].self_attn
    for h in range(config.num_key_value_heads):
        q, k = slice(h * group * dim, (h * group + 1) * dim), slice(h * dim, (h + 1) * dim)
        assert torch.equal(attn.q_proj.weight[q], 3.0 * plain.q_proj.weight[q])
        assert torch.equal(attn.k_proj.weight[k], attn.q_proj.weight[q])
        assert torch.equal(attn.v_proj.weight[k], 3.0 * plain.v_proj.weight[k])
        assert torch.equal(attn.o_proj.weight[:, q], attn.v_proj.weight[k].T)
    # the other query heads of a group keep their own weights (the heads stay diverse)
    assert group > 1 and torch.equal(attn.q_proj.weight[dim : 2 * dim], plain.q_proj.weight[dim : 2 * dim])
