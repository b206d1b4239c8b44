"""The start model's initialisation (``replicate_small.induction_init``): layer 0's first head group attends to
the previous token, and mimetic heads match like tokens, as its documentation says; the start-model results
in BENCHMARKS.md depend on it. No training."""

from __future__ import annotations

import torch
from transformers import Qwen2ForCausalLM

from tests.conftest import benchmark_module


def _heads(model: Qwen2ForCausalLM) -> tuple[int, int]:
    config = model.config
    return config.hidden_size // config.num_attention_heads, config.num_attention_heads // config.num_key_value_heads


def test_previous_token_heads_read_the_token_before(monkeypatch, tiny_model) -> None:
    script = benchmark_module(monkeypatch, "replicate_small")
    model = Qwen2ForCausalLM.from_pretrained(str(tiny_model), attn_implementation="eager")
    ids = torch.randint(5, 200, (1, 300), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids, output_attentions=True).attentions[0][0]
    script.induction_init(model, mimetic=0.0, margin=10.0)
    after = model(input_ids=ids, output_attentions=True).attentions[0][0]  # heads x queries x keys
    previous = (torch.arange(1, 300), torch.arange(0, 299))
    _, group = _heads(model)
    for head in range(group):  # the first key/value head's query heads: nearly all weight on the token before
        assert after[head][previous].min() > 0.99
        assert before[head][previous].mean() < 0.5
    assert after[group][previous].mean() < 0.5  # the other group is left as it was
    assert torch.equal(after[group], before[group])


def test_mimetic_heads_tie_keys_to_queries(monkeypatch, tiny_model) -> None:
    script = benchmark_module(monkeypatch, "replicate_small")
    plain = Qwen2ForCausalLM.from_pretrained(str(tiny_model)).model.layers[1].self_attn
    model = Qwen2ForCausalLM.from_pretrained(str(tiny_model))
    script.induction_init(model, mimetic=3.0, margin=0.0)
    dim, group = _heads(model)
    attn = model.model.layers[1].self_attn
    for h in range(model.config.num_key_value_heads):
        q, k = slice(h * group * dim, (h * group + 1) * dim), slice(h * dim, (h + 1) * dim)
        assert torch.equal(attn.q_proj.weight[q], 3.0 * plain.q_proj.weight[q])
        assert torch.equal(attn.k_proj.weight[k], attn.q_proj.weight[q])
        assert torch.equal(attn.v_proj.weight[k], 3.0 * plain.v_proj.weight[k])
        assert torch.equal(attn.o_proj.weight[:, q], attn.v_proj.weight[k].T)
    # the other query heads of a group keep their own weights (the heads stay diverse)
    assert group > 1 and torch.equal(attn.q_proj.weight[dim : 2 * dim], plain.q_proj.weight[dim : 2 * dim])


def test_the_task_model_is_written_with_it(monkeypatch, tmp_path) -> None:
    """``make_task_model`` writes the initialised weights (``make_tiny_model``'s ``init`` hook), not the random ones."""
    script = benchmark_module(monkeypatch, "replicate_small")
    script.make_task_model(tmp_path, script.SMALLEST)
    model = Qwen2ForCausalLM.from_pretrained(str(tmp_path))
    dim, _ = _heads(model)
    attn = model.model.layers[0].self_attn
    assert not attn.k_proj.weight[:dim].any() and attn.k_proj.bias[:dim].abs().max() > 1  # the previous-token key
