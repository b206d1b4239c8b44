"""Each optimization is exact: same loss and same gradients as the straightforward path, and the
reference cache is keyed on data and model (stale caches are rebuilt, never read)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from llamafactory_longpo.train.tiling import decoder_mlps
from tests.conftest import LONGPO_RUN
from tests.tolerances import assert_within_eps32
from tests.train.test_trainer_loss import build, in_float64

PLAIN = dict(s2l_response_logits=False, s2l_shared_prefix=False, s2l_precompute_ref=False)


def loss_and_grads(trainer, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


CASES = {
    "longpo-full-nll": dict(stage="longpo", pref_loss="sigmoid", dataset="longpo_demo", cutoff_len=2048, longpo_lambda=0.5),
    "longpo-response-nll": dict(
        stage="longpo",
        pref_loss="sigmoid",
        dataset="longpo_demo",
        cutoff_len=2048,
        longpo_nll_scope="response",
        per_device_train_batch_size=1,
    ),
    "solo-dpo-both": dict(stage="solopo", pref_loss="sigmoid", solopo_align="both"),
    "solo-orpo": dict(stage="solopo", pref_loss="orpo"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_optimized_equals_straightforward(tmp_path: Path, tiny_model: Path, name: str) -> None:
    """In float64; the cached reference (float32, made before training) is checked against the live float64
    reference of the plain path, then replaced by it, so both sides see the same reference values."""
    fast, fast_batch = build(tmp_path / "fast", tiny_model, s2l_logits_chunk=64, **CASES[name])
    slow, slow_batch = build(tmp_path / "slow", tiny_model, **PLAIN, **CASES[name])
    assert torch.equal(fast_batch["input_ids"], slow_batch["input_ids"])
    in_float64(slow, slow_batch, {})
    live = {k: v.tolist() for k, v in slow.compute_reference_values(slow.model, slow_batch).items()}
    assert set(live) == {k for k in fast_batch if k.endswith("_logps")}  # none for ORPO
    in_float64(fast, fast_batch, live)
    loss_fast, grads_fast = loss_and_grads(fast, fast_batch)
    loss_slow, grads_slow = loss_and_grads(slow, slow_batch)
    assert_within_eps32(torch.tensor(loss_fast), torch.tensor(loss_slow), "loss")
    assert grads_fast.keys() == grads_slow.keys() and grads_fast
    for key in grads_fast:
        assert_within_eps32(grads_fast[key], grads_slow[key], key)


def test_reference_cache_hit_stale_and_corrupt(tmp_path: Path, tiny_model: Path) -> None:
    cache = tmp_path / "cache"
    common = dict(LONGPO_RUN, s2l_ref_cache_dir=str(cache))
    first, batch1 = build(tmp_path / "a", tiny_model, **common)
    path, status = first.reference_cache["train"]
    assert status == "miss" and Path(path).exists()
    again, batch2 = build(tmp_path / "b", tiny_model, **common)
    assert again.reference_cache["train"] == (path, "hit")
    assert torch.equal(batch1["ref_chosen_logps"], batch2["ref_chosen_logps"])

    # other data: another key, computed afresh
    other_data, _ = build(tmp_path / "c", tiny_model, **dict(common, max_samples=3))
    assert other_data.reference_cache["train"][1] == "miss" and other_data.reference_cache["train"][0] != path

    # another reference model (changed weights): another key
    model2 = tmp_path / "model2"
    shutil.copytree(tiny_model, model2)
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model2)
    with torch.no_grad():
        m.model.norm.weight.mul_(1.5)
    m.save_pretrained(model2)
    other_model, batch3 = build(tmp_path / "d", model2, **common)
    assert other_model.reference_cache["train"][1] == "miss" and other_model.reference_cache["train"][0] != path
    assert not torch.allclose(batch3["ref_chosen_logps"], batch1["ref_chosen_logps"])

    # a corrupt file under the right name is recomputed, not read
    Path(path).write_bytes(b"not a cache")
    rebuilt, batch4 = build(tmp_path / "e", tiny_model, **common)
    assert rebuilt.reference_cache["train"] == (path, "miss")
    assert torch.equal(batch4["ref_chosen_logps"], batch1["ref_chosen_logps"])


def test_reference_columns_for_each_eval_dataset(tmp_path: Path, tiny_model: Path) -> None:
    """``eval_on_each_dataset``: the eval set is a dict, and every member gets its own reference columns."""
    trainer, batch = build(
        tmp_path,
        tiny_model,
        **LONGPO_RUN,
        eval_dataset="longpo_demo",
        eval_on_each_dataset=True,
        eval_strategy="steps",
        per_device_eval_batch_size=2,
    )
    assert isinstance(trainer.eval_dataset, dict) and list(trainer.eval_dataset) == ["longpo_demo"]
    assert trainer.reference_cache.keys() == {"train", "eval longpo_demo"}
    member = trainer.eval_dataset["longpo_demo"]
    assert member["ref_chosen_logps"] == trainer.train_dataset["ref_chosen_logps"]  # same rows, same reference
    metrics = trainer.evaluate()
    # every metric under the member's own name (the toolkit's DPO log would write eval_logps/...)
    assert math.isfinite(metrics["eval_longpo_demo_loss"]) and "eval_longpo_demo_logps/ref_chosen" in metrics
    assert not [k for k in metrics if k.startswith("eval_") and not k.startswith("eval_longpo_demo_")]


def test_filler_head_calls_are_exact_zeros() -> None:
    """Extra head calls (ZeRO-3 lockstep, empty sequence-parallel slices) change no value and no gradient."""
    from llamafactory_longpo.train.logps import per_row_sums

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 32, bias=False)
    hidden = torch.randn(2, 10, 8, requires_grad=True)
    rows, pos = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([3, 4, 5, 6, 7])
    targets = torch.randint(0, 32, (5,))
    results = []
    for min_chunks in (0, 5):
        head.zero_grad()
        hidden.grad = None
        sums, counts = per_row_sums(head, hidden, rows, pos, targets, 2, chunk_size=2, min_chunks=min_chunks)
        (sums * torch.tensor([1.0, -2.0])).sum().backward()
        results.append((sums.detach(), counts, head.weight.grad.clone(), hidden.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # an empty slice still reaches the head and the hidden states (zero gradients, but a path for backward)
    head.zero_grad()
    hidden.grad = None
    empty = torch.zeros(0, dtype=torch.long)
    sums, _ = per_row_sums(head, hidden, empty, empty, empty, 2, min_chunks=1)
    sums.sum().backward()
    assert head.weight.grad is not None and hidden.grad is not None
    assert not head.weight.grad.any() and not hidden.grad.any()


MEMORY_CASES = {
    "solo-orpo": dict(stage="solopo", pref_loss="orpo"),
    # LoRA with a live reference: the policy with its adapters disabled runs beside the tiled, offloaded policy
    "solo-dpo-lora-live": dict(
        stage="solopo", pref_loss="sigmoid", finetuning_type="lora", lora_rank=4, s2l_precompute_ref=False
    ),
    "longpo-shared-prefix": dict(LONGPO_RUN, s2l_logits_chunk=64),
}


def _counted(trainer, batch, ledger):
    """Loss, gradients, ``ledger`` and the number of MLP down-projection calls the step made (each tile is one)."""
    calls = []
    hooks = [m.down_proj.register_forward_hook(lambda *_: calls.append(1)) for m in decoder_mlps(trainer.model)]
    try:
        return (*loss_and_grads(trainer, batch), ledger, len(calls))
    finally:
        for hook in hooks:
            hook.remove()


def _knobbed(trainer, batch, offload: bool, tiled: bool):
    """Loss and gradients with the knobs switched on the trainer's own model (as the wiring installs them)."""
    from llamafactory_longpo.train.offload import OffloadLedger, install_offload
    from llamafactory_longpo.train.tiling import install_tiled_mlp

    ledger, undo = OffloadLedger(), []
    if tiled:
        undo.append(install_tiled_mlp(trainer.model))
    if offload:
        undo.append(install_offload(trainer.model, ledger))
    try:
        return _counted(trainer, batch, ledger)
    finally:
        for step in undo:
            step()


@pytest.mark.parametrize("name", list(MEMORY_CASES))
def test_memory_knobs_change_no_loss_and_no_gradient(tmp_path: Path, tiny_model: Path, name: str) -> None:
    """Offloaded checkpoints and tiled MLPs, alone (switched on the same model) and together (from the YAML
    keys, through the run's wiring), give the loss and every gradient of the run without them (float64; the
    tiles sum a weight's gradient in another order). The offload hooks must have moved every layer input down
    and up once, and the MLPs must have run in more than one tile."""
    from llamafactory_longpo.train.tiling import tile_count

    plain, batch = build(tmp_path / "plain", tiny_model, **MEMORY_CASES[name])
    assert plain.model.is_gradient_checkpointing and plain.model.training
    assert tile_count(batch["input_ids"].shape[-1], plain.model.config.hidden_size) > 1
    in_float64(plain, batch, {})
    loss, grads, _, plain_calls = _counted(plain, batch, None)
    both, both_batch = build(
        tmp_path / "both", tiny_model, **MEMORY_CASES[name], s2l_offload_activations=True, s2l_tiled_mlp=True
    )
    assert all(torch.equal(both_batch[k], batch[k]) for k in batch if isinstance(batch[k], torch.Tensor))
    in_float64(both, both_batch, {})
    runs = {
        "offload": _knobbed(plain, batch, offload=True, tiled=False),
        "tiled": _knobbed(plain, batch, offload=False, tiled=True),
        "both": _counted(both, both_batch, both.wiring.offloaded),
    }
    assert [m for m in both.model.modules() if "forward" in vars(m)]  # the wiring tiled the MLPs
    both.wiring.undo()
    assert not [m for m in both.model.modules() if "forward" in vars(m)]
    for knobs, (got_loss, got, ledger, calls) in runs.items():
        assert_within_eps32(torch.tensor(got_loss), torch.tensor(loss), f"{knobs}: loss")
        assert got.keys() == grads.keys() and got
        for key in got:
            assert_within_eps32(got[key], grads[key], f"{knobs}: {key}")
        assert (ledger.down == ledger.up > 0) if knobs != "tiled" else ledger.down == 0, knobs
        # tiled, every MLP call is several down-projection calls; offloaded alone, the same calls as the plain run
        assert calls > plain_calls if knobs != "offload" else calls == plain_calls, (knobs, calls, plain_calls)
