"""A run killed mid-training resumes from its last checkpoint and finishes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, base_config, cli_env, run_cli, write_yaml

pytestmark = pytest.mark.slow  # multi-minute end-to-end runs (CI runs them; -m 'not slow' skips them)


def test_kill_and_resume(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "out"
    config = base_config(
        tiny_model,
        out,
        stage="longpo",
        pref_loss="sigmoid",
        dataset="longpo_demo",
        cutoff_len=2048,
        max_samples=32,
        per_device_train_batch_size=1,
        save_steps=2,
        num_train_epochs=1.0,
    )
    cfg = write_yaml(tmp_path / "cfg.yaml", config)
    proc = subprocess.Popen(
        [str(VENV_BIN / "llamafactory-cli"), "train", str(cfg)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpt = out / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    import os

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists(), "the run ended before its second checkpoint"
    assert not (out / "train_results.json").exists(), "the run finished before it could be killed"

    # the same YAML, without overwriting: LLaMA-Factory picks up the last checkpoint
    config.update(overwrite_output_dir=False, resume_from_checkpoint=None)
    write_yaml(cfg, config)
    done = run_cli(["train", str(cfg)], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "Resuming training from" in done.stdout
    results = json.loads((out / "train_results.json").read_text())
    assert results["epoch"] == 1.0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 32
