"""Two ranks on CPU (FORCE_TORCHRUN=1, gloo). Plain DDP: the ranks hold the same gradient at every step.
DeepSpeed ZeRO-3 (the toolkit's integration): each plugin stage trains, full and LoRA, with the cached or a
live reference, and its first-step loss and gradient norm equal the DDP run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, base_config, run_cli, torchrun_env, write_yaml

pytestmark = pytest.mark.slow  # multi-minute end-to-end runs (CI runs them; -m 'not slow' skips them)

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install '.[deepspeed]')")

STAGES = {
    # cached reference (SoLo-DPO), small head chunks: the two ranks' samples need different numbers of LM-head
    # calls, which ZeRO-3 must not see (each call gathers the head's weight over all ranks; unequal counts hang).
    # LongPO full fine-tuning with the cache runs on ZeRO-3 in test_sequence_parallel.
    "solopo-dpo-cached-small-chunks": dict(stage="solopo", pref_loss="sigmoid", solopo_alpha=2.0, s2l_logits_chunk=16),
    # LoRA with the reference LIVE (adapters disabled on the partitioned policy), no cache; small head chunks
    # again, but the frozen head is gathered once per pass, so the ranks' unequal call counts need no lockstep
    "longpo-lora-live": dict(
        stage="longpo",
        pref_loss="sigmoid",
        dataset="longpo_demo",
        cutoff_len=2048,
        finetuning_type="lora",
        lora_rank=4,
        s2l_precompute_ref=False,
        s2l_logits_chunk=16,
    ),
    # self-distillation, full fine-tuning: the teacher copy is a ZeRO-3 inference engine, its head gathered once per
    # pass; the student's trainable head runs in lockstep chunks of 4 tokens (the ranks' responses differ in length)
    "s2ld-full-small-chunks": dict(stage="s2ld", s2ld_divergence="reverse_kl", s2ld_nll_weight=0.5, s2l_logits_chunk=4),
    # full fine-tuning with a live reference copy (the toolkit prepares it as a ZeRO-3 inference engine)
    "solopo-dpo-full-live": dict(stage="solopo", pref_loss="sigmoid", solopo_alpha=2.0, s2l_precompute_ref=False),
}


# the ZeRO-3 run only: offloaded checkpoints and tiled MLPs (the ranks' rows need different tile counts, which ZeRO-3
# must not see: every tile gathers the MLP's weights; under LoRA those are frozen and recomputed in backward)
Z3_ONLY = {"longpo-lora-live": {"s2l_offload_activations": True, "s2l_tiled_mlp": True}}


def _first_step(tmp: Path, tiny: Path, name: str, zero3: bool) -> dict:
    out = tmp / ("z3" if zero3 else "ddp")
    extra = {"deepspeed": str(ROOT / "examples" / "deepspeed" / "ds_z3_config.json"), **Z3_ONLY.get(name, {})} if zero3 else {}
    cfg = write_yaml(
        tmp / f"{out.name}.yaml",
        base_config(
            tiny,
            out,
            per_device_train_batch_size=1,
            max_samples=4,
            max_steps=1 if zero3 else 2,
            ddp_backend="gloo",
            disable_shuffling=True,
            s2l_ref_cache_dir=str(tmp / f"cache_{out.name}"),
            **STAGES[name],
            **extra,
        ),
    )
    grads = tmp / f"grads_{out.name}"
    proc = run_cli(["train", str(cfg)], cwd=tmp, **torchrun_env(grads))
    assert proc.returncode == 0, proc.stdout[-4000:]
    if not zero3:
        # plain DDP: after the all-reduce both ranks hold the same gradient at every step. Two forwards per step
        # with reentrant checkpointing (the toolkit's default) silently break this; the plugin forces non-reentrant.
        ranks = [[json.loads(line) for line in Path(f"{grads}.rank{r}").read_text().splitlines()] for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 2
        for a, b in zip(*ranks):
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return history[0]


@pytest.mark.parametrize("name", list(STAGES))
def test_zero3_matches_data_parallel(tmp_path: Path, tiny_model: Path, name: str) -> None:
    ddp = _first_step(tmp_path, tiny_model, name, zero3=False)
    zero3 = _first_step(tmp_path, tiny_model, name, zero3=True)
    assert zero3["loss"] == pytest.approx(ddp["loss"], rel=1e-5, abs=1e-6)
    assert zero3["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-3)


def test_nan_gradient_stops_a_zero3_run_before_its_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    """DeepSpeed keeps gradients out of ``param.grad``: the guard reads the engine's global gradient norm, at
    every step, not only at logging steps (here every 10th, after the checkpoint of step 2)."""
    out = tmp_path / "out"
    cfg = write_yaml(
        tmp_path / "cfg.yaml",
        base_config(
            tiny_model,
            out,
            deepspeed=str(ROOT / "examples" / "deepspeed" / "ds_z3_config.json"),
            learning_rate=1.0e30,  # step 1 sends the weights to ~1e30; step 2's gradients are NaN
            max_steps=3,
            save_steps=1,
            logging_steps=10,
            max_samples=8,
            ddp_backend="gloo",
            s2l_ref_cache_dir=str(tmp_path / "cache"),
        ),
    )
    proc = run_cli(["train", str(cfg)], cwd=tmp_path, **torchrun_env(tmp_path / "grads", nproc=1))
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert "step 2: the gradient is NaN or infinite; training stopped before saving it" in proc.stdout, proc.stdout[-4000:]
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
