"""LongPO's shared prefix: exact on every attention kernel, and no ``T x T`` tensor anywhere.

Exactness runs in float64: the packed pass must give the two-row pass's loss and every gradient, within
the float32-derived bound of tests/tolerances.py (observed: up to 2 eps32 with eager's float32 softmax,
0.1 eps32 with SDPA). flash-attn cannot be installed on a CPU
machine, so its kernel is replaced by a torch stand-in (the ONLY mock here), which also checks the call
contract the real ``flash_attn_varlen_func`` relies on: packed ``[tokens, heads, dim]`` inputs, int32
``cu_seqlens`` from 0 to the token count, the longest sequence as ``max_seqlen``, and ``causal=True``, which
flash-attn aligns bottom-right when a sequence has fewer queries than keys.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from tests.conftest import LONGPO_RUN
from tests.tolerances import assert_within_eps32
from tests.train.test_trainer_loss import build

LONGPO = dict(LONGPO_RUN, per_device_train_batch_size=3)


@pytest.fixture(autouse=True)
def attention_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrappers a test installs (transformers' attention and mask registries are process-wide) go with it."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for registry in (ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS):
        monkeypatch.setattr(registry, "_local_mapping", dict(registry._local_mapping))
        monkeypatch.setattr(type(registry), "_global_mapping", dict(type(registry)._global_mapping))


@pytest.fixture(scope="module")
def model_and_batch(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny policy (moved off its init) in float64, and a batch of three multi-turn LongPO pairs."""
    trainer, batch = build(tmp_path_factory.mktemp("sp"), tiny_model, max_samples=3, **LONGPO)
    n = batch["input_ids"].size(0) // 2
    assert n == 3 and (batch["ref_chosen_logps"].numel() == n)
    return trainer.model.double(), batch


def flash_stand_in(calls: list[dict]):
    """A torch ``flash_attn_varlen_func``: per sequence, causal attention aligned bottom-right."""

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert q.dim() == k.dim() == v.dim() == 3 and k.shape == v.shape and q.size(1) % k.size(1) == 0
        for cu, total, longest in ((cu_q, q.size(0), max_q), (cu_k, k.size(0), max_k)):
            assert cu.dtype == torch.int32 and int(cu[0]) == 0 and int(cu[-1]) == total
            assert int((cu[1:] - cu[:-1]).min()) > 0 and int((cu[1:] - cu[:-1]).max()) == longest
        assert causal and dropout_p == 0.0 and cu_q.numel() == cu_k.numel()
        calls.append({"cu_q": cu_q.tolist(), "cu_k": cu_k.tolist()})
        outs = []
        for i in range(cu_q.numel() - 1):
            qi = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)  # [heads, lq, dim]
            ki = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1).repeat_interleave(q.size(1) // k.size(1), 0)
            vi = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1).repeat_interleave(q.size(1) // k.size(1), 0)
            lq, lk = qi.size(1), ki.size(1)
            assert lq <= lk
            scores = qi @ ki.transpose(1, 2) * softmax_scale
            visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)  # bottom-right
            outs.append((scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vi).transpose(0, 1))
        return torch.cat(outs)

    return flash_attn_varlen_func


def policy_loss_and_grads(model, batch, shared: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LongPO's loss (fixed reference values) through the packed or the two-row pass, and every gradient."""
    from llamafactory_longpo.losses import longpo_loss
    from llamafactory_longpo.train.logps import sequence_logps
    from llamafactory_longpo.train.shared_prefix import shared_prefix_logps

    n = batch["input_ids"].size(0) // 2
    head = model.get_output_embeddings()
    model.zero_grad()
    if shared:
        rows = [tuple(batch[k][s] for k in ("input_ids", "attention_mask", "labels")) for s in (slice(0, n), slice(n, None))]
        out = shared_prefix_logps(model, head, *rows, nll_scope="full", chunk_size=64)
    else:
        out = sequence_logps(
            model, head, batch["input_ids"], batch["attention_mask"], batch["labels"], nll_rows=n, nll_scope="full"
        )
    ref = batch["ref_chosen_logps"].double(), batch["ref_rejected_logps"].double()
    loss = longpo_loss(out["logps"][:n], out["logps"][n:], *ref, out["nll"], beta=0.5, lam=0.7, nll_weight=1.0).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return torch.stack([loss.detach(), *out["logps"].detach()]), grads


@pytest.mark.parametrize("kernel", ["sdpa", "eager", "flash_attention_2"])
def test_shared_prefix_equals_two_rows_on_every_kernel(model_and_batch, kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:

    from llamafactory_longpo.train.shared_prefix import install_shared_prefix_attention

    model, batch = model_and_batch
    model.set_attn_implementation("sdpa")
    expected, expected_grads = policy_loss_and_grads(model, batch, shared=False)

    calls: list[dict] = []
    if kernel == "flash_attention_2":  # mocked: flash-attn is a CUDA kernel (see the module docstring)
        monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_stand_in(calls)))
        model.config._attn_implementation = kernel  # set_attn_implementation would look for the CUDA package
    else:
        model.set_attn_implementation(kernel)
    install_shared_prefix_attention(model)
    got, grads = policy_loss_and_grads(model, batch, shared=True)
    model.set_attn_implementation("sdpa")

    assert_within_eps32(got, expected, "loss and log-probs")
    assert grads.keys() == expected_grads.keys() and len(grads) > 10
    for name in grads:
        assert_within_eps32(grads[name], expected_grads[name], name)
    if kernel == "flash_attention_2":
        # one call per layer and forward (gradient checkpointing replays each once): two pieces per pair, the
        # rejected piece's keys longer than its queries (by the shared prefix)
        assert len(calls) % model.config.num_hidden_layers == 0 and all(c == calls[0] for c in calls)
        q_lens = [b - a for a, b in zip(calls[0]["cu_q"], calls[0]["cu_q"][1:])]
        k_lens = [b - a for a, b in zip(calls[0]["cu_k"], calls[0]["cu_k"][1:])]
        assert len(q_lens) == 6 and q_lens[0::2] == k_lens[0::2]
        assert all(k > q for q, k in zip(q_lens[1::2], k_lens[1::2]))


def test_flash_pieces_get_half_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 query in a bf16 model (fp32 LoRA weights, upcast norms) reaches flash-attention in bf16, as on
    transformers' own flash path: flash-attn has no float32 kernel."""
    from llamafactory_longpo.train.shared_prefix import PrefixLayout, shared_prefix_attention

    seen: list[torch.dtype] = []
    stand_in = flash_stand_in([])

    def recording(q, k, v, *args, **kwargs):
        seen.extend({q.dtype, k.dtype, v.dtype})
        return stand_in(q, k, v, *args, **kwargs)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=recording))
    module = torch.nn.Linear(8, 8).to(torch.bfloat16)
    module.config = types.SimpleNamespace()
    layout = PrefixLayout(((3, 2, 2),))
    q, k, v = (torch.randn(1, 2, 7, 4) for _ in range(3))
    shared_prefix_attention(module, q, k, v, layout, "fa2", scaling=0.5)
    assert seen == [torch.bfloat16]
    seen.clear()
    shared_prefix_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, "fa2", scaling=0.5)
    assert seen == [torch.bfloat16]


def test_pack_layout_and_targets() -> None:
    """Positions restart at the prefix length for the rejected suffix; every target sits where its token is."""
    from llamafactory_longpo.train.shared_prefix import pack_shared_prefix

    ids_c = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 1, 2, 0, 0]])
    ids_r = torch.tensor([[5, 6, 7, 3, 0, 0], [5, 6, 4, 4, 4, 4]])
    mask_c, mask_r = (ids_c != 0).long(), (ids_r != 0).long()
    labels_c = torch.where(torch.arange(6) >= 3, ids_c, -100).masked_fill(mask_c == 0, -100)
    labels_r = torch.where(torch.arange(6) >= 3, ids_r, -100).masked_fill(mask_r == 0, -100)
    packed = pack_shared_prefix((ids_c, mask_c, labels_c), (ids_r, mask_r, labels_r))
    assert packed["layout"].rows == ((3, 2, 1), (2, 2, 4))
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 0, 0], [5, 6, 1, 2, 4, 4, 4, 4]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 0], [0, 1, 2, 3, 2, 3, 4, 5]]
    ignore = -100
    # row 0: chosen labels 8, 9 predicted from positions 2, 3; rejected label 3 from the prefix's last position
    assert packed["chosen"][0].tolist() == [ignore, ignore, 8, 9, ignore, ignore, ignore, ignore]
    assert packed["rejected"][0].tolist() == [ignore, ignore, 3, ignore, ignore, ignore, ignore, ignore]
    assert packed["full"][0].tolist() == [6, 7, 8, 9, ignore, ignore, ignore, ignore]
    # row 1: rejected labels at original positions 3, 4, 5 (packed 5, 6, 7) are predicted from packed 4, 5, 6
    assert packed["rejected"][1].tolist() == [ignore, ignore, ignore, ignore, 4, 4, 4, ignore]


def test_no_quadratic_tensor(model_and_batch) -> None:
    """At T = 6000 packed tokens no operation of the forward allocates T^2 / 2 bytes (the first version's bool mask
    alone was T^2 bytes per pair). Allocation sizes come from torch's profiler, which records them on CPU."""
    from torch.profiler import ProfilerActivity, profile

    from llamafactory_longpo.train.shared_prefix import install_shared_prefix_attention, shared_prefix_logps

    model, _ = model_and_batch
    model.set_attn_implementation("sdpa")
    install_shared_prefix_attention(model)
    torch.manual_seed(0)
    doc, answer, width = 5960, 20, 6000
    document = torch.randint(10, 1000, (1, doc))
    chosen, rejected = (torch.cat([document, torch.randint(10, 1000, (1, answer))], 1) for _ in range(2))
    labels = [torch.where(torch.arange(doc + answer) >= doc, x, -100) for x in (chosen, rejected)]
    mask = torch.ones_like(chosen)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = shared_prefix_logps(
            model, model.get_output_embeddings(), (chosen, mask, labels[0]), (rejected, mask, labels[1]), chunk_size=256
        )
    assert out["lengths"].tolist() == [answer, answer] and packed_width(chosen, rejected) == width
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < width * width // 2, largest


def packed_width(chosen: torch.Tensor, rejected: torch.Tensor) -> int:
    from llamafactory_longpo.train.shared_prefix import pack_shared_prefix

    mask = torch.ones_like(chosen)
    return pack_shared_prefix((chosen, mask, chosen), (rejected, mask, rejected))["input_ids"].size(1)
