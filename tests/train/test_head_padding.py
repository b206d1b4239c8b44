"""Ulysses at any ``sequence_parallel_size``: the padded head layout (:class:`HeadPadding`) against unpadded attention.

The all-to-all itself is DeepSpeed's (its equality with one process is ``tests/e2e/test_sequence_parallel.py``); here
each rank's share of the padded heads, a contiguous block as the all-to-all deals them, runs in turn on one process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

from llamafactory_longpo.train.sequence_parallel import HeadPadding, padded_attention, padded_heads


@pytest.mark.parametrize(
    "q, kv, size, expected",
    [
        (28, 4, 8, (32, 8)),  # Qwen2.5-7B at 8 ranks: 4 zero queries, KV heads twice
        (32, 8, 8, (32, 8)),  # Llama-3.1-8B: as DeepSpeed takes it
        (32, 8, 16, (32, 16)),  # ... at 16: only the KV replication DeepSpeed itself would do
        (64, 8, 16, (64, 16)),  # Qwen2.5-72B
        (6, 2, 4, (8, 4)),
        (9, 3, 2, (10, 10)),  # the end-to-end test's model: one zero query, KV heads 3 times and one extra replica
        (4, 2, 2, (4, 2)),  # the tiny model at 2 ranks: nothing moves
        (40, 40, 16, (48, 48)),  # MHA (Llama-2-13B): extra replicas, not each head twice
        (40, 8, 16, (48, 16)),
    ],
)
def test_padded_counts(q: int, kv: int, size: int, expected: tuple[int, int]) -> None:
    assert padded_heads(q, kv, size) == expected


@pytest.mark.parametrize("q, kv", [(28, 4), (6, 2), (12, 12), (40, 8), (14, 2), (8, 1), (32, 8)])
@pytest.mark.parametrize("size", [2, 3, 4, 6, 8, 16])
def test_layout_keeps_every_query_with_its_kv_head(q: int, kv: int, size: int) -> None:
    padding = HeadPadding(q, kv, size)
    q_padded, kv_used = padding.counts
    assert q_padded % size == 0 and kv_used % size == 0 and q_padded >= q and kv_used >= kv
    real = [h for h in padding.query_index if h < q]
    assert sorted(real) == list(range(q))  # every query head exactly once
    for slot, head in enumerate(padding.query_index):
        if head < q:  # its padded KV head replicates the KV head it belongs to
            assert padding.kv_index[slot // padding.slots_per_kv] == head // (q // kv)
    assert [padding.query_index[slot] for slot in padding.output_index] == list(range(q))


def _eager(module: SimpleNamespace, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> tuple:
    return eager_attention_forward(module, q, k, v, mask, scaling=q.size(-1) ** -0.5)


def _ranks(size: int) -> object:
    """Attention on each rank's contiguous block of the heads in turn, concatenated: what Ulysses hands each rank
    (the module's ``num_key_value_groups``, which eager reads to repeat the KV heads, is the padded layout's)."""

    def run(module: SimpleNamespace, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *a, **kw) -> tuple:
        outs = [_eager(module, *parts, mask)[0] for parts in zip(q.chunk(size, 1), k.chunk(size, 1), v.chunk(size, 1))]
        return torch.cat(outs, dim=2), None

    return run


@pytest.mark.parametrize("q_heads, kv_heads, size", [(6, 2, 4), (9, 3, 2), (28, 4, 8), (12, 12, 8), (14, 2, 3), (4, 2, 4)])
def test_padded_attention_equals_unpadded(q_heads: int, kv_heads: int, size: int) -> None:
    """Forward and the gradients of Q, K and V, float64: the zero queries' outputs are dropped, so exact."""
    torch.manual_seed(0)
    batch, length, dim = 2, 5, 4
    q = torch.randn(batch, q_heads, length, dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64, requires_grad=True)
    mask = torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    weight = torch.randn(batch, length, q_heads, dim, dtype=torch.float64)
    groups = q_heads // kv_heads
    module = SimpleNamespace(num_key_value_groups=groups, training=False)

    want, _ = _eager(module, q, k, v, mask)
    (want * weight).sum().backward()
    want_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None

    padding = HeadPadding(q_heads, kv_heads, size)
    got, _ = padded_attention(_ranks(size), padding)(module, q, k, v, mask)
    (got * weight).sum().backward()
    assert module.num_key_value_groups == groups  # put back after the call
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for t, grad in zip((q, k, v), want_grads):
        torch.testing.assert_close(t.grad, grad, rtol=1e-12, atol=1e-12)
