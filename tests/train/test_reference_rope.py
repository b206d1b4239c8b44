"""``policy_rope_theta`` changes the policy only: the reference log-probs never see the raised RoPE base.

LongPO trains the policy with a raised ``rope_theta`` (1e7 in the paper) against the frozen initial model,
so step 1's reference log-probs must be the same with and without the knob on every reference path, while
the policy's own log-probs move. A near-uniform random model hides RoPE (its attention barely depends on
positions), so the model here has sharpened query and key projections.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import base_config

SHARPEN = 40.0  # query and key weights scaled by this: attention logits grow by its square


@pytest.fixture(scope="module")
def sharp_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharp")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(SHARPEN)
            layer.self_attn.k_proj.weight.mul_(SHARPEN)
    model.save_pretrained(out)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    return out


def step_one_logps(tmp_path: Path, model: Path, name: str, **overrides) -> dict[str, float]:
    """The policy's and the reference's step-1 log-probs of one LongPO batch."""
    from llamafactory.hparams import get_train_args

    from llamafactory_longpo.train.workflow import build_trainer

    config = base_config(
        model,
        tmp_path / f"out_{name}",
        stage="longpo",
        pref_loss="sigmoid",
        dataset="longpo_demo",
        cutoff_len=2048,
        max_samples=2,
        disable_shuffling=True,
        s2l_ref_cache_dir=str(tmp_path / f"cache_{name}"),  # never shared: a cache hit would hide the bug
        **overrides,
    )
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(config)
    trainer = build_trainer(model_args, data_args, training_args, finetuning_args, callbacks=[])
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        _, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    return {k: metrics[k] for k in ("logps/chosen", "logps/rejected", "logps/ref_chosen", "logps/ref_rejected")}


PATHS = {
    "full-cached": {},
    "full-live-copy": dict(s2l_precompute_ref=False),
    "lora-cached": dict(finetuning_type="lora", lora_target="all"),
    "lora-adapters-disabled": dict(finetuning_type="lora", lora_target="all", s2l_precompute_ref=False),
    "explicit-ref-model": "ref_model",
}


@pytest.mark.parametrize("path", list(PATHS))
def test_reference_keeps_its_rope_base(tmp_path: Path, sharp_model: Path, path: str) -> None:
    knobs = PATHS[path] if path != "explicit-ref-model" else dict(ref_model=str(sharp_model))
    plain = step_one_logps(tmp_path, sharp_model, "plain", **knobs)
    raised = step_one_logps(tmp_path, sharp_model, "raised", policy_rope_theta=1.0e7, **knobs)
    for key in ("logps/ref_chosen", "logps/ref_rejected"):
        assert raised[key] == plain[key], f"{path}: the reference moved with the policy's RoPE base ({key})"
    # the model is sharp enough for the base to matter: the policy's log-probs move by far more than float32
    # noise (about 1e-4 on these sums of ~40 token log-probs; the move is about 0.1)
    for key in ("logps/chosen", "logps/rejected"):
        assert abs(raised[key] - plain[key]) > 1e-2, f"{path}: {key} {plain[key]} -> {raised[key]}"
