"""The memory planner against real steps, on the offline tiny model and the shipped 7B shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from llamafactory_longpo.cli import main
from llamafactory_longpo.planner.plan import size, zero_model_states
from llamafactory_longpo.planner.step import ZeroConfig, load_run_config
from llamafactory_longpo.planner.trace import KINDS
from tests.conftest import ROOT, base_config, train_in_process

TINY = ROOT / "examples" / "tiny"


def _deeper_tiny(tmp_path: Path, tiny_model: Path, layers: int = 4, **changes: object) -> Path:
    """The tiny model's config.json with more layers (and ``changes``): the planner traces 2 and 3 and scales to
    ``layers``."""
    config = json.loads((tiny_model / "config.json").read_text())
    config.update(changes)
    config["num_hidden_layers"] = layers
    config["layer_types"] = ["full_attention"] * layers
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _yaml(tmp_path: Path, base: str, **overrides: object) -> str:
    raw = yaml.safe_load((TINY / base).read_text())
    raw.update(overrides)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize(
    ("base", "overrides"),
    [
        ("longpo_tiny.yaml", {}),  # full fine-tuning, shared prefix (two causal attention pieces), NLL over the whole row
        pytest.param(
            "solo_orpo_tiny.yaml",
            {"finetuning_type": "lora", "pref_loss": "sigmoid", "s2l_precompute_ref": False},
            marks=pytest.mark.slow,  # the quick tier checks one real step
        ),
    ],
    ids=["longpo-full", "solopo-sigmoid-lora-live-reference"],
)
def test_prediction_matches_the_real_step(tmp_path: Path, tiny_model: Path, base: str, overrides: dict) -> None:
    """Traced at 2 and 3 layers on fake tensors and scaled to 4, within 10% of the real 4-layer step's peak:
    its live tensors under the same tracker, and the CPU allocator's own count (the profiler's memory events)."""
    from llamafactory_longpo.planner.validate import cpu_check

    model = _deeper_tiny(tmp_path, tiny_model)
    run = load_run_config(_yaml(tmp_path, base, model_name_or_path=str(model), **overrides))
    check = cpu_check(run, 1024)
    assert abs(check.error) < 0.10, (check.predicted, check.measured)
    assert abs(check.allocator_error) < 0.10, (check.predicted, check.allocated)


def test_7b_report_lists_every_part(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", str(ROOT / "examples" / "longpo_qwen_128k.yaml"), "--gpus", "8", "--lengths", "8192"]) == 0
    out = capsys.readouterr().out
    assert "shipped shape Qwen2.5-7B" in out and "ZeRO-3 (offload optimizer, params)" in out
    lines = {line.strip().rsplit(None, 1)[0]: line.split()[-1] for line in out.splitlines() if line.startswith("  ")}
    for part in (*KINDS, "total", "step TFLOPs", "fits 80 GiB"):
        assert part in lines, part
    assert "not modelled:" in out


def test_a_run_that_cannot_fit_names_its_largest_part(capsys: pytest.CaptureFixture[str]) -> None:
    from llamafactory_longpo.planner.plan import estimate

    config = str(ROOT / "examples" / "solo_orpo_qwen.yaml")
    assert main(["estimate", config, "--gpus", "8", "--lengths", "8192", "--device-memory", "20"]) == 0
    out = capsys.readouterr().out
    predicted = estimate(load_run_config(config), 8192, gpus=8, device_gib=20)
    assert not predicted.fits
    assert f"8,192 tokens does not fit 20 GiB: needs {size(predicted.total)}; largest part: {predicted.largest}" in out


def test_a_bad_config_gets_the_training_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same one line as ``llamafactory-cli train`` prints (the toolkit's entry point, in-process)."""
    from llamafactory.train.tuner import run_exp

    config = _yaml(tmp_path, "solo_orpo_tiny.yaml", solopo_distance="cosine")
    assert main(["estimate", config]) == 1
    planner_err = capsys.readouterr().err.strip().splitlines()
    with pytest.raises(SystemExit):
        run_exp(yaml.safe_load(Path(config).read_text()))
    train_err = capsys.readouterr().err.strip().splitlines()
    assert len(planner_err) == 1
    message = planner_err[0].split("error: ", 1)[1]
    assert message == "solopo_distance: 'cosine' is not one of abs, square, smooth_l1"
    assert train_err[-1].endswith(f"error: {message}")


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("offload", [False, True])
def test_zero_model_states_are_deepspeeds(stage: int, offload: bool) -> None:
    """Full fine-tuning: the weights, gradients and optimizer lines add up to DeepSpeed's own estimators."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from llamafactory_longpo.planner.plan import ModelCounts

    total, largest, gpus = 7_615_616_512, 545_062_912, 8
    run = load_run_config(str(ROOT / "examples" / "solo_orpo_qwen.yaml"))
    run.zero = ZeroConfig(stage, offload, offload and stage == 3)
    ours = sum(zero_model_states(run, ModelCounts(total, total, largest, True), gpus).values())
    if stage == 2:
        theirs = estimate_zero2_model_states_mem_needs(total, gpus, cpu_offload=offload)[1]
    else:
        theirs = estimate_zero3_model_states_mem_needs(total, largest, gpus, cpu_offload=offload, cpu_offload_params=offload)[1]
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_train_start_line(tiny_model: Path, tmp_path: Path) -> None:
    from llamafactory.hparams import get_train_args

    from llamafactory_longpo.planner import train_start_line

    raw = yaml.safe_load((TINY / "solo_orpo_tiny.yaml").read_text())
    raw.update(model_name_or_path=str(tiny_model), output_dir=str(tmp_path / "out"))
    args = get_train_args(raw)[:4]
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    line = train_start_line(*args)
    # only rank 0 traces: the random generators must be where they were, or ranks part (LoRA inits differ)
    assert torch.equal(torch.rand(4), expected)
    assert line.startswith("planner: predicted peak per rank at 1,024 tokens: "), line
    # beside a DeepSpeed engine (one rank or many) nothing is traced: the line names the command
    args[2].deepspeed = str(ROOT / "examples" / "deepspeed" / "ds_z3_config.json")
    expected_line = "planner: for this run's per-rank estimate, run llamafactory-longpo estimate <config> --gpus 1"
    assert train_start_line(*args) == expected_line


def test_the_start_line_can_be_switched_off(
    tmp_path: Path, tiny_model: Path, capfd: pytest.CaptureFixture, logs: pytest.LogCaptureFixture
) -> None:
    """A training run logs the planner's line as it starts, unless ``s2l_estimate_at_start: false``."""
    lines = {}
    for on in (True, False):
        config = base_config(tiny_model, tmp_path / str(on), max_samples=2, max_steps=1, s2l_estimate_at_start=on)
        code, text = train_in_process(config, capfd, logs)
        assert code == 0, text[-2000:]
        lines[on] = [line for line in text.splitlines() if "planner: " in line]
        logs.clear()
    assert lines[True] and all("planner: predicted peak per rank at 1,536 tokens: " in line for line in lines[True])
    assert lines[False] == []


def test_memory_knobs_are_predicted(tmp_path: Path, tiny_model: Path) -> None:
    """On a model whose MLP is 16 times its hidden size, a real 4-layer LongPO step with tiled MLPs and offloaded
    checkpoints peaks well below the same step without them, and the planner (2 and 3 layers traced, scaled to 4)
    is within 10% of both; the bytes the real step's offload hooks moved are the planner's count, to the byte."""
    from llamafactory_longpo.planner.validate import cpu_check

    model = str(_deeper_tiny(tmp_path, tiny_model, intermediate_size=1024))
    knobs = {"s2l_tiled_mlp": True, "s2l_offload_activations": True}
    plain = cpu_check(load_run_config(_yaml(tmp_path, "longpo_tiny.yaml", model_name_or_path=model)), 1024, allocator=False)
    check = cpu_check(
        load_run_config(_yaml(tmp_path, "longpo_tiny.yaml", model_name_or_path=model, **knobs)), 1024, allocator=False
    )
    assert abs(plain.error) < 0.10, (plain.predicted, plain.measured)
    assert abs(check.error) < 0.10, (check.predicted, check.measured)
    assert check.measured < 0.8 * plain.measured, (check.measured, plain.measured)
    assert plain.measured_moved == plain.predicted_moved == 0
    assert check.measured_moved > 0 and check.predicted_moved == check.measured_moved


def test_sequence_parallel_flops_count_the_padded_heads() -> None:
    """Qwen2.5-7B's 28 query heads run as 32 at 8 ranks (``padded_heads``): the whole rows' FLOPs gain the 4 zero
    queries' attention, 4/28 of the attention's, and no more; at 4 ranks nothing is padded. Shared prefix on."""
    from llamafactory_longpo.planner.plan import row_lengths, trace_depth

    run = load_run_config(str(ROOT / "examples" / "longpo_qwen_128k.yaml"))
    lengths = row_lengths(run, 4096, 1, None)
    flops = {sp: trace_depth(run, 2, lengths, None, sp).flops for sp in (4, 8)}
    assert flops[4] < flops[8] < flops[4] * 32 / 28
