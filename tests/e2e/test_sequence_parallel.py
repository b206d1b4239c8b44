"""Ulysses sequence parallelism on CPU (torchrun ranks, gloo, DeepSpeed's UlyssesSPAttentionHF):
``sequence_parallel_size: 2`` gives the same losses, log-probs and gradients as ONE process on the same
batches, also on a model with 9 query and 3 KV heads, which 2 does not divide (padded heads); and every setting
it cannot run stops before training with its one-line message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, base_config, run_cli, torchrun_env, write_yaml

pytestmark = pytest.mark.slow  # multi-minute end-to-end runs (CI runs them; -m 'not slow' skips them)

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install '.[deepspeed]')")

CASES = {
    # SoLo-ORPO: short pair + long chosen, no reference
    "solopo-orpo": dict(stage="solopo", pref_loss="orpo", solopo_alpha=2.0),
    # SoLo-DPO on LoRA with a LIVE reference (adapters disabled) instead of the cache: reference passes sharded too
    "solopo-dpo-lora-live": dict(
        stage="solopo", pref_loss="sigmoid", finetuning_type="lora", lora_rank=4, s2l_precompute_ref=False, learning_rate=1.0e-2
    ),
    # LongPO: cached short reference, long pair, full-document NLL
    "longpo": dict(stage="longpo", pref_loss="sigmoid", dataset="longpo_demo", cutoff_len=2048),
    # self-distillation: the frozen teacher copy's short rows are sharded and gathered, the student's long rows sharded
    "s2ld-jsd-nll": dict(stage="s2ld", s2ld_divergence="jsd", s2ld_nll_weight=0.5, learning_rate=1.0e-2),
    # the same under DeepSpeed ZeRO-3 (SP run only), with small head chunks: the ranks' chunk counts differ
    "longpo-zero3": dict(stage="longpo", pref_loss="sigmoid", dataset="longpo_demo", cutoff_len=2048),
}
# a model with 9 query heads and 3 KV heads at SP 2: one zero query, each KV head 3 times and one extra replica
# (10/10 heads, HeadPadding), so each rank's queries meet KV heads of two groups
HEADS9 = {"solopo-orpo-heads9": "solopo-orpo", "longpo-heads9": "longpo"}
# offloaded checkpoints and tiled MLPs in the SP run only: it must still equal the plain single process
MEMORY_KNOBS = {"s2l_offload_activations": True, "s2l_tiled_mlp": True}
SP_ONLY = {
    "longpo-zero3": {
        "deepspeed": str(ROOT / "examples" / "deepspeed" / "ds_z3_config.json"),
        "s2l_logits_chunk": 64,
        **MEMORY_KNOBS,
    },
    "solopo-dpo-lora-live": MEMORY_KNOBS,
}
_ONE_PROCESS: dict[str, tuple[list[dict], list[dict]]] = {}  # same config, same single-process result: run it once


@pytest.fixture(scope="module")
def tiny_heads9(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llamafactory_longpo.tiny import make_tiny_model

    return Path(make_tiny_model(str(tmp_path_factory.mktemp("tiny_heads9")), hidden_size=72, num_heads=9, num_kv_heads=3))


def _train(tmp: Path, tiny: Path, case: str, sp: int) -> tuple[list[dict], list[dict]]:
    out = tmp / f"sp{sp}"
    extra = {"sequence_parallel_size": sp, "ddp_backend": "gloo", **SP_ONLY.get(case, {})} if sp > 1 else {}
    cfg = write_yaml(
        tmp / f"{out.name}.yaml",
        base_config(
            tiny,
            out,
            per_device_train_batch_size=2,
            max_samples=4,
            max_steps=2,
            disable_shuffling=True,
            s2l_ref_cache_dir=str(tmp / f"cache_{out.name}"),
            **CASES[HEADS9.get(case, case)],
            **extra,
        ),
    )
    grads = tmp / f"grads_{out.name}"
    env = torchrun_env(grads, nproc=sp) if sp > 1 else {"LLAMAFACTORY_LONGPO_GRAD_NORM_FILE": str(grads)}
    proc = run_cli(["train", str(cfg)], cwd=tmp, **env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    history = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    steps = [json.loads(line) for line in Path(f"{grads}.rank0").read_text().splitlines()]
    return history, steps


@pytest.mark.parametrize("case", [*CASES, *HEADS9])
def test_sequence_parallel_equals_one_process(
    tmp_path: Path, tiny_model: Path, case: str, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue("tiny_heads9") if case in HEADS9 else tiny_model
    key = json.dumps([CASES[HEADS9.get(case, case)], str(model)], sort_keys=True)
    if key not in _ONE_PROCESS:
        _ONE_PROCESS[key] = _train(tmp_path, model, case, sp=1)
    one_hist, one_grads = _ONE_PROCESS[key]
    sp_hist, sp_grads = _train(tmp_path, model, case, sp=2)
    assert len(one_hist) == len(sp_hist) == 2  # 4 samples / batch 2: both runs see the same two batches
    for a, b in zip(one_hist, sp_hist):
        keys = [k for k in a if k == "loss" or k.startswith(("logps/", "rewards/", "po_", "align_", "pref_", "nll_", "s2ld/"))]
        assert keys and set(keys) <= set(b)
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), k
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    if case in SP_ONLY:  # ZeRO-3 partitions the gradients: each rank holds a shard, so tensors are not comparable
        return
    assert len(one_grads) == len(sp_grads) == 2
    for a, b in zip(one_grads, sp_grads):
        assert a["params"].keys() == b["params"].keys()
        for name, (norm, total) in a["params"].items():
            assert b["params"][name][0] == pytest.approx(norm, rel=1e-5, abs=1e-7), name
            assert b["params"][name][1] == pytest.approx(total, rel=1e-4, abs=1e-6), name


def test_sequence_parallel_resumes_where_it_stopped(tmp_path: Path, tiny_model: Path) -> None:
    """SP 2, stopped at step 4 (mid second epoch) and resumed from its checkpoint: the resumed steps equal an
    uninterrupted run's (same batches from the group sampler, restored optimizer; constant lr, because a
    shorter first run would otherwise decay it on another schedule). Fails on torch's "cpu:0" load error
    without ``accept_indexed_cpu_locations``."""
    common = dict(
        CASES["solopo-orpo"],
        per_device_train_batch_size=2,
        max_samples=6,
        num_train_epochs=2.0,  # 3 batches per epoch
        save_steps=4,
        lr_scheduler_type="constant",
        sequence_parallel_size=2,
        ddp_backend="gloo",
        s2l_ref_cache_dir=str(tmp_path / "cache"),
    )

    def train(out: Path, **overrides: object) -> list[dict]:
        cfg = write_yaml(tmp_path / f"{out.name}.yaml", base_config(tiny_model, out, **{**common, **overrides}))
        proc = run_cli(["train", str(cfg)], cwd=tmp_path, **torchrun_env(tmp_path / f"grads_{out.name}"))
        assert proc.returncode == 0, proc.stdout[-4000:]
        return [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]

    whole = train(tmp_path / "whole")
    part = tmp_path / "part"
    train(part, max_steps=4)
    resumed = train(part, overwrite_output_dir=False, resume_from_checkpoint=str(part / "checkpoint-4"))
    assert [h["step"] for h in whole] == [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_checks_name_each_problem() -> None:
    """Only what Ulysses cannot run is refused: head counts no longer are (Qwen2.5-7B's 28/4 heads at 8 ranks pad)."""
    from llamafactory_longpo.errors import ConfigError
    from llamafactory_longpo.train.sequence_parallel import check_sequence_parallel

    for size in (4, 7, 8):
        check_sequence_parallel(size, "sdpa", size * 2)
    cases = [
        ((2, "sdpa", 3), "does not divide the world size 3"),
        ((4, "eager", 8), "needs flash_attn: sdpa or fa2 or fa3 (the model runs 'eager' attention"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            check_sequence_parallel(*args)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({}, "sequence_parallel_size: 2 does not divide the world size 1"),
        ({"stage": "dpo", "pref_loss": "sigmoid", "dataset": "solopo_demo"}, "stage 'dpo' has no sequence parallelism here"),
        ({"s2l_response_logits": False}, "sequence_parallel_size > 1 needs s2l_response_logits: true"),
    ],
)
def test_cli_errors_before_training(tmp_path: Path, tiny_model: Path, overrides: dict, message: str) -> None:
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "cfg.yaml", base_config(tiny_model, out, sequence_parallel_size=2, max_steps=1, **overrides))
    proc = run_cli(["train", str(cfg)], cwd=tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stdout.splitlines() if line.startswith("[llamafactory-longpo] error:")]
    assert len(errors) == 1 and message in errors[0], proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    assert not (out / "trainer_state.json").exists()


def test_group_sampler_deals_one_batch_per_group() -> None:
    """Through accelerate's own sharding (what the toolkit's data loader does): world 4, SP 2 -> the two ranks
    of a group get the same batches, the two groups different ones, every sample once per epoch, new order
    each epoch."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from llamafactory_longpo.train.sequence_parallel import GroupBatchSampler

    sampler = GroupBatchSampler(num_samples=12, batch_size=3, copies=2, shuffle=True, seed=7)

    def epoch(e: int) -> list[list[list[int]]]:
        sampler.set_epoch(e)
        return [list(BatchSamplerShard(BatchSampler(sampler, 3, False), num_processes=4, process_index=r)) for r in range(4)]

    first = epoch(0)
    assert first[0] == first[1] and first[2] == first[3] and first[0] != first[2]
    assert len(first[0]) == 2  # 12 samples / (2 groups x batch 3)
    assert sorted(i for batch in first[0] + first[2] for i in batch) == list(range(12))
    assert epoch(1)[0] != first[0]
    ordered = GroupBatchSampler(num_samples=5, batch_size=2, copies=2, shuffle=False, seed=0)
    assert list(ordered) == [0, 1, 0, 1, 2, 3, 2, 3, 4, 0, 4, 0]  # last batch completed from the start, never split
