"""``llamafactory-cli train`` as a real subprocess for every stage the data feeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import base_config, run_cli, write_yaml

CASES = {
    "solopo-sigmoid": dict(stage="solopo", pref_loss="sigmoid", solopo_alpha=3.0),
    "solopo-simpo": dict(stage="solopo", pref_loss="simpo", pref_beta=2.0),
    "solopo-orpo": dict(stage="solopo", pref_loss="orpo", solopo_align="both"),
    "longpo": dict(stage="longpo", pref_loss="sigmoid", dataset="longpo_demo", cutoff_len=2048, policy_rope_theta=1.0e6),
    # LoRA: the reference is the policy with its adapters disabled (live here), at the original RoPE base
    "longpo-lora-live-reference": dict(
        stage="longpo",
        pref_loss="sigmoid",
        dataset="longpo_demo",
        cutoff_len=2048,
        finetuning_type="lora",
        s2l_precompute_ref=False,
        policy_rope_theta=1.0e6,
    ),
    # self-distillation off-policy under LoRA: the teacher is the policy with its adapters disabled
    "s2ld-lora-jsd-nll": dict(
        stage="s2ld", finetuning_type="lora", s2ld_divergence="jsd", s2ld_jsd_beta=0.3, s2ld_nll_weight=0.5
    ),
    # on-policy, full fine-tuning (a frozen teacher copy): sampled at steps 1 and 3, step 2 reuses step 1's samples
    "s2ld-on-policy": dict(
        stage="s2ld", s2ld_on_policy=True, s2ld_samples=2, s2ld_max_new_tokens=6, s2ld_sample_every=2, max_steps=3, max_samples=6
    ),
    "dpo-long-view": dict(stage="dpo", pref_loss="sigmoid"),
    "sft-long-view": dict(stage="sft", dataset="longpo_demo", cutoff_len=2048),
}
METRICS = {
    "solopo": {
        "loss",
        "po_loss",
        "align_loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/long_chosen",
        "rewards/distance",
        "rewards/accuracies",
    },
    "longpo": {"loss", "pref_loss", "nll_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies"},
    "s2ld": {"loss", "s2ld/divergence", "s2ld/nll", "s2ld/teacher_nll"},
    "dpo": {"loss", "rewards/chosen", "rewards/accuracies"},
    "sft": {"loss"},
}


# the quick tier (-m "not slow") trains one plugin stage through the CLI; the full suite trains every case
QUICK = {"longpo"}


@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_train_subprocess(tmp_path: Path, tiny_model: Path, name: str) -> None:
    overrides = dict(CASES[name])
    stage = overrides["stage"]
    if stage == "sft":
        overrides["pref_loss"] = "sigmoid"  # ignored by sft, kept to show the file is the same config
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "cfg.yaml", base_config(tiny_model, out, **{"max_samples": 4, **overrides}))
    proc = run_cli(["train", str(cfg)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert METRICS[stage] <= set(history[0]), sorted(history[0])
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    step_logs = [entry for entry in logs if "loss" in entry]
    assert step_logs, logs
    if stage in ("solopo", "longpo", "s2ld"):  # the toolkit writes only its fixed keys for its own stages
        assert METRICS[stage] <= set(step_logs[0]), sorted(step_logs[0])
    if stage in ("solopo", "longpo"):
        assert (out / "training_loss.png").exists() and (out / "training_rewards.png").exists()
    if stage == "s2ld":
        assert (out / "training_loss.png").exists() and (out / "training_s2ld_divergence.png").exists()
        assert all(math.isfinite(e["loss"]) and e["s2ld/divergence"] >= 0 for e in step_logs), step_logs
    if overrides.get("s2ld_on_policy"):  # the frozen teacher scores the same samples at steps 1 and 2, new ones at 3
        teacher = [e["s2ld/teacher_nll"] for e in step_logs]
        assert len(teacher) == 3 and teacher[0] == teacher[1] != teacher[2], teacher
    # the result loads and runs as a plain transformers model
    import torch
    from transformers import AutoModelForCausalLM

    if overrides.get("finetuning_type") == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    else:
        model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    if name == "longpo":  # the policy's RoPE base was raised and saved with the model
        assert model.config.rope_parameters["rope_theta"] == pytest.approx(1.0e6)
