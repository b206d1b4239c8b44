"""Two processes on CPU (FORCE_TORCHRUN=1, gloo): the stages run in torchrun workers and stay in sync."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import base_config, run_cli, torchrun_env, write_yaml


@pytest.mark.parametrize("stage", ["solopo", "longpo"])
def test_two_ranks_same_gradient_norm(tmp_path: Path, tiny_model: Path, stage: str) -> None:
    extra = (
        {"dataset": "longpo_demo", "pref_loss": "sigmoid", "cutoff_len": 2048} if stage == "longpo" else {"pref_loss": "sigmoid"}
    )
    out = tmp_path / "out"
    # gradient checkpointing stays on (the toolkit's default): the plugin must make it non-reentrant
    cfg = write_yaml(
        tmp_path / "cfg.yaml",
        base_config(tiny_model, out, stage=stage, per_device_train_batch_size=1, max_samples=6, ddp_backend="gloo", **extra),
    )
    grads = tmp_path / "grads"
    proc = run_cli(["train", str(cfg)], cwd=tmp_path, **torchrun_env(grads))
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = [[json.loads(line) for line in Path(f"{grads}.rank{r}").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 6 samples / (2 ranks x 1)
    for a, b in zip(*ranks):
        assert a["step"] == b["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    assert (out / "trainer_log.jsonl").exists()
