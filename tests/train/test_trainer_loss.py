"""The trainer's loss on the tiny model equals the loss recomputed from plain full-logits forwards.

The independent side runs ``model(...).logits`` over whole sequences (no response slicing, no
chunking), gathers log-probs itself and applies the papers' formulas with Python floats
(tests/spec_formulas.py). Both sides run in float64, so the comparison is tight on any machine. The one
float32 input is the cached reference (computed before training, at the training dtype): it is checked
against the independent float64 reference within a float32 bound, then replaced by it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests import spec_formulas as spec
from tests.conftest import LONGPO_RUN, base_config
from tests.tolerances import EPS32

IGNORE = -100
# a float32 sum of ~40 token log-probs, each from a 2-layer float32 forward, against the same in float64
REFERENCE_BOUND = 64 * EPS32


def build(tmp_path: Path, tiny: Path, **overrides):
    from llamafactory.hparams import get_train_args

    from llamafactory_longpo.train.workflow import build_trainer

    overrides.setdefault("s2l_ref_cache_dir", str(tmp_path / "ref_cache"))
    overrides.setdefault("disable_shuffling", True)
    overrides.setdefault("max_samples", 4)
    config = base_config(tiny, tmp_path / "out", **overrides)
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(config)
    model_args.use_reentrant_gc = False
    trainer = build_trainer(model_args, data_args, training_args, finetuning_args, callbacks=[])
    # move the policy away from the (identical) reference so rewards are not trivially zero
    torch.manual_seed(1)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


def in_float64(trainer, batch: dict, independent_refs: dict[str, list[float]]) -> None:
    """Move the policy (and a live reference) to float64; swap the cached float32 reference columns for the
    independent float64 values after checking they agree within :data:`REFERENCE_BOUND`."""
    trainer.model.double()
    if trainer.ref_model is not None:
        trainer.ref_model.double()
    for key, values in independent_refs.items():
        if key in batch:
            assert batch[key].tolist() == pytest.approx(values, rel=REFERENCE_BOUND), key
            batch[key] = torch.tensor(values, dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(tiny_model: Path):
    """The frozen initial model, loaded on its own (what every reference log-prob must come from)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).double().eval()


def plain_logps(model, ids, mask, labels) -> tuple[list[float], list[int]]:
    """Full-vocabulary logits over whole rows; summed label log-probs per row."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    logp = logits[:, :-1].log_softmax(-1)
    tgt = labels[:, 1:]
    valid = tgt != IGNORE
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    return tok.sum(-1).tolist(), valid.sum(-1).tolist()


def plain_nll(model, ids, mask, labels, scope: str) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    logp = logits[:, :-1].log_softmax(-1)
    if scope == "full":
        valid = (mask[:, 1:] * mask[:, :-1]).bool()
        tgt = ids[:, 1:]
    else:
        tgt = labels[:, 1:]
        valid = tgt != IGNORE
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return float(-(tok * valid).sum() / valid.sum())


SOLOPO = [
    dict(pref_loss="sigmoid", solopo_alpha=3.0),
    dict(pref_loss="sigmoid", solopo_alpha=3.0, s2l_precompute_ref=False, s2l_response_logits=False),
    dict(pref_loss="sigmoid", solopo_alpha=1.0, solopo_align="both", s2l_logits_chunk=7),
    dict(pref_loss="sigmoid", solopo_alpha=1.0, solopo_long_reference="short", solopo_distance="square"),
    dict(pref_loss="simpo", solopo_alpha=1.0, pref_beta=2.0, simpo_gamma=0.5),
    dict(pref_loss="orpo", solopo_alpha=1.0, solopo_distance="smooth_l1"),
    dict(pref_loss="orpo", solopo_alpha=0.5, solopo_align="both"),
]


@pytest.mark.parametrize("overrides", SOLOPO, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_solopo_trainer_loss_matches_plain_forwards(tmp_path: Path, tiny_model: Path, reference, overrides: dict) -> None:
    trainer, batch = build(tmp_path, tiny_model, stage="solopo", **overrides)
    fa = trainer.finetuning_args
    n = batch["input_ids"].size(0) // 2
    refs: dict[str, list[float]] = {}
    if fa.pref_loss == "sigmoid":
        r_s, _ = plain_logps(reference, batch["input_ids"], batch["attention_mask"], batch["labels"])
        r_l, _ = plain_logps(reference, batch["long_input_ids"], batch["long_attention_mask"], batch["long_labels"])
        refs = {"ref_sc": r_s[:n], "ref_sr": r_s[n:], "ref_lc": r_l[:n], "ref_lr": r_l[n:]}
    columns = dict(
        zip(["ref_chosen_logps", "ref_rejected_logps", "ref_long_chosen_logps", "ref_long_rejected_logps"], refs.values())
    )
    in_float64(trainer, batch, columns)
    model = trainer.model
    loss = trainer.compute_loss(model, batch).item()

    s_lp, s_len = plain_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    l_lp, l_len = plain_logps(model, batch["long_input_ids"], batch["long_attention_mask"], batch["long_labels"])
    both = fa.solopo_align == "both"
    samples = []
    for i in range(n):
        s = {"sc": s_lp[i], "sr": s_lp[n + i], "lc": l_lp[i], "n_sc": s_len[i], "n_sr": s_len[n + i], "n_lc": l_len[i]}
        if both:
            s.update(lr=l_lp[n + i], n_lr=l_len[n + i])
        s.update({k: v[i] for k, v in refs.items() if v})
        samples.append(s)
    expected = (
        sum(
            spec.solopo_sample(
                s,
                pref_loss=fa.pref_loss,
                beta=fa.pref_beta,
                alpha=fa.solopo_alpha,
                gamma=fa.simpo_gamma,
                dist=fa.solopo_distance,
                long_reference=fa.solopo_long_reference,
                align_both=both,
            )
            for s in samples
        )
        / n
    )
    assert loss == pytest.approx(expected, rel=1e-9, abs=1e-12)


LONGPO = [
    dict(longpo_nll_scope="full"),
    dict(longpo_nll_scope="response"),
    dict(longpo_nll_scope="full", s2l_shared_prefix=False, s2l_logits_chunk=5),
    dict(longpo_nll_scope="full", s2l_precompute_ref=False, s2l_response_logits=False),
]


@pytest.mark.parametrize("knobs", LONGPO, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_longpo_trainer_loss_matches_plain_forwards(tmp_path: Path, tiny_model: Path, reference, knobs: dict) -> None:
    scope = knobs["longpo_nll_scope"]
    trainer, batch = build(
        tmp_path,
        tiny_model,
        **LONGPO_RUN,
        pref_beta=0.5,
        longpo_lambda=0.7,
        **knobs,
    )
    fa = trainer.finetuning_args
    n = batch["input_ids"].size(0) // 2
    # the short reference rows of the same samples (the batch drops them when log-probs are precomputed)
    rows = [{k: v for k, v in trainer.train_dataset[i].items() if not k.endswith("_logps")} for i in range(n)]
    ref_batch = dataclasses.replace(trainer.data_collator, plan=trainer.plan.live())(rows)  # with the reference rows
    assert torch.equal(ref_batch["input_ids"], batch["input_ids"])  # same samples as the training batch
    r_rows, _ = plain_logps(reference, ref_batch["ref_input_ids"], ref_batch["ref_attention_mask"], ref_batch["ref_labels"])
    owner = ref_batch["ref_sample"].tolist()
    half = len(owner) // 2
    r_w, r_l = [0.0] * n, [0.0] * n
    for j, o in enumerate(owner):
        (r_w if j < half else r_l)[o] += r_rows[j]
    in_float64(trainer, batch, {"ref_chosen_logps": r_w, "ref_rejected_logps": r_l})
    model = trainer.model
    loss = trainer.compute_loss(model, batch).item()
    p_lp, _ = plain_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    nll = plain_nll(model, batch["input_ids"][:n], batch["attention_mask"][:n], batch["labels"][:n], scope)
    expected = spec.longpo_batch(
        p_lp[:n], p_lp[n:], r_w, r_l, nll, beta=fa.pref_beta, lam=fa.longpo_lambda, nll_weight=fa.longpo_nll_weight
    )
    assert loss == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert len(owner) > 2 * n  # multi-turn records: several reference rows per sample
