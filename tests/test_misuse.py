"""Misuse: every kind of bad or odd input ends in one clear line, a counted warning, or a run that works.

Training cases run the toolkit's ``run_exp`` in this process (a traceback there is an exception that
escapes it, which fails the test); each command also runs once as a real subprocess, checked for its exit
status and the absence of a traceback.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import TrainerCallback

from tests.conftest import (
    LONGPO_RUN,
    ROOT,
    VENV_BIN,
    base_config,
    cli_env,
    run_cli,
    run_command,
    start_cli,
    torchrun_env,
    train_in_process,
    write_yaml,
)

GOOD = [json.loads(line) for line in (ROOT / "data" / "solopo_demo.jsonl").read_text(encoding="utf-8").splitlines()[:4]]
LONGPO = [json.loads(line) for line in (ROOT / "data" / "longpo_demo.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
LONGPO_STAGE = {"stage": "longpo", "pref_loss": "sigmoid"}


def _dataset(folder: Path, rows: list[Any], files: dict[str, list[Any]] | None = None) -> Path:
    """``folder/d.jsonl`` (or a folder of ``files``) registered as dataset ``d``."""
    folder.mkdir(parents=True, exist_ok=True)
    if files is None:
        (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        entry = {"file_name": "d.jsonl", "formatting": "short_to_long", "ranking": True}
    else:
        (folder / "parts").mkdir()
        for name, part in files.items():
            (folder / "parts" / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        entry = {"file_name": "parts", "formatting": "short_to_long", "ranking": True}
    (folder / "dataset_info.json").write_text(json.dumps({"d": entry}), encoding="utf-8")
    return folder


def _train(
    folder: Path,
    capfd: pytest.CaptureFixture,
    logs: pytest.LogCaptureFixture,
    tiny: Path,
    callbacks: Any = None,
    **overrides: Any,
) -> tuple[int, str]:
    """One in-process ``llamafactory-cli train`` over the dataset in ``folder``: (exit status, all output)."""
    config = base_config(tiny, folder / "out", dataset="d", dataset_dir=str(folder), max_samples=4)
    config.update({"s2l_ref_cache_dir": str(folder / "ref_cache"), **overrides})
    return train_in_process(config, capfd, logs, callbacks)


def _mutate(fn: Callable[[list[Any]], Any], rows: list[Any] = GOOD) -> list[Any]:
    rows = copy.deepcopy(rows)
    fn(rows)
    return rows


def _set_turn(**values: str) -> Callable[[list[Any]], None]:
    def fn(rows: list[Any]) -> None:
        for r in rows:
            for t in r["turns"]:
                t.update({k: t[v] for k, v in values.items()})

    return fn


NAN, INF = float("nan"), float("inf")
# name -> (rows, folder files, overrides, exit status, patterns the output must hold..., pattern it must not hold)
TRAIN_CASES: dict[str, tuple[Any, ...]] = {
    # 1. values that cannot be meant, knobs without effect (a warning: one YAML often serves several stages)
    "alpha-nan": (GOOD, None, {"solopo_alpha": NAN}, 1, r"error: solopo_alpha: nan is not a finite number", None),
    "alpha-text-inf": (GOOD, None, {"solopo_alpha": "inf"}, 1, r"error: solopo_alpha: 'inf' is not a finite number", None),
    "beta-inf": (GOOD, None, {"pref_beta": INF}, 1, r"error: pref_beta: inf is not a finite number", None),
    "lambda-nan": (LONGPO, None, {**LONGPO_STAGE, "longpo_lambda": NAN}, 1, r"error: longpo_lambda: nan is not a finite", None),
    "rope-inf": (GOOD, None, {"policy_rope_theta": INF}, 1, r"error: policy_rope_theta: inf is not a finite number", None),
    "chunk-fraction": (GOOD, None, {"s2l_logits_chunk": 1.5}, 1, r"error: s2l_logits_chunk: 1\.5 must be a whole number", None),
    "short-cutoff-nan": (GOOD, None, {"short_cutoff_len": NAN}, 1, r"error: short_cutoff_len: nan is not a finite number", None),
    "no-effect-reference": (
        GOOD,
        None,
        {"solopo_long_reference": "short"},
        0,
        r"solopo_long_reference has no effect here: pref_loss orpo has no reference model",
        None,
    ),
    "no-effect-short-cutoff": (GOOD, None, {"short_cutoff_len": 4096}, 0, r"short_cutoff_len has no effect here", None),
    "no-effect-other-stage": (GOOD, None, {"longpo_lambda": 0.5}, 0, r"longpo_lambda has no effect here: stage solopo", None),
    # stage s2ld: its choices and ranges, the on-policy combination it cannot run, and its knobs read by one path only
    "s2ld-divergence": (
        GOOD,
        None,
        {"stage": "s2ld", "s2ld_divergence": "kl"},
        1,
        r"error: s2ld_divergence: 'kl' is not one of forward_kl, reverse_kl, jsd",
        None,
    ),
    "s2ld-jsd-beta-one": (
        GOOD,
        None,
        {"stage": "s2ld", "s2ld_jsd_beta": 1.0},
        1,
        r"error: s2ld_jsd_beta: 1\.0 must be > 0 and < 1",
        None,
    ),
    "s2ld-on-policy-sp": (
        GOOD,
        None,
        {"stage": "s2ld", "s2ld_on_policy": True, "sequence_parallel_size": 2},
        1,
        r"error: s2ld_on_policy: true does not run with sequence_parallel_size > 1",
        None,
    ),
    "s2ld-no-effect": (
        GOOD,
        None,
        {"stage": "s2ld", "s2ld_samples": 4, "s2ld_jsd_beta": 0.3},
        0,
        r"s2ld_samples has no effect here: s2ld_on_policy is false",
        r"s2ld_jsd_beta has no effect here: the divergence is not jsd",
        None,
    ),
    # the toolkit's reentrant, "cuda"-only use_unsloth_gc becomes the plugin's offload (a run that works, told so);
    # offloading checkpointed inputs with checkpointing off cannot be meant
    "unsloth-gc": (GOOD, None, {"use_unsloth_gc": True}, 0, r"use_unsloth_gc: .*s2l_offload_activations \(now on\)", None),
    "offload-without-checkpointing": (
        GOOD,
        None,
        {"s2l_offload_activations": True, "disable_gradient_checkpointing": True},
        1,
        r"error: s2l_offload_activations: true offloads the inputs of checkpointed layers; set disable_gradient_checkpointing",
        None,
    ),
    # 2. extra fields of mixed types never reach the loader's schema
    "mixed-extras": (
        _mutate(lambda rs: [r.update(id=i if i % 2 else f"r{i}", meta={"a": 1} if i % 2 else "x") for i, r in enumerate(rs)]),
        None,
        {},
        0,
        r"'loss'",
        None,
    ),
    "mixed-turn-extras": (
        _mutate(lambda rs: [t.update(score=i if i % 2 else "high") for i, r in enumerate(rs) for t in r["turns"]], LONGPO),
        None,
        LONGPO_STAGE,
        0,
        r"'loss'",
        None,
    ),
    # 3. nothing fits the cutoffs
    "all-overlong": (
        GOOD,
        None,
        {"cutoff_len": 64, "short_cutoff_len": 32},
        1,
        r"error: every training sample is longer than its cutoff.*or set s2l_overlong: middle",
        None,
    ),
    "all-overlong-middle": (
        GOOD,
        None,
        {"cutoff_len": 64, "short_cutoff_len": 32, "s2l_overlong": "middle"},
        1,
        r"error: every training sample is longer than its cutoff.*even with the context cut in the middle",
        r"set s2l_overlong: middle",
    ),
    # 4. suspicious data: counted warnings; an error where nothing can be learned
    "suspicious": (
        None,
        {
            "a.jsonl": [*_mutate(_set_turn(rejected="chosen"))[:1], *GOOD[1:], GOOD[1]],
            "b.jsonl": _mutate(lambda rs: rs[0].update(long_context="short"), GOOD[2:3]),
            "c.jsonl": [],
        },
        {},
        0,
        r"1 of 6 turns have chosen == rejected .*; first: \S*a\.jsonl: record 0 \(line 1\), turn 0",
        r"1 of 6 records repeat an earlier record .*; first: \S*a\.jsonl: record 4 \(line 5\)",
        r"1 turn\(s\) have a long_context shorter than their short_context .*; first: \S*b\.jsonl: record 0",
        r"1 file\(s\) hold no records; first: \S*c\.jsonl",
        None,
    ),
    # every pair identical: LongPO's NLL and SoLoPO's alignment still train, so a warning, not an error
    "all-chosen-eq-rejected": (
        _mutate(_set_turn(rejected="chosen")),
        None,
        {},
        0,
        r"(\d+) of \1 turns have chosen == rejected \(nothing to prefer; with every pair identical the preference term",
        None,
    ),
    # 5. a file where the reference cache folder should be: refused before the reference pass
    "cache-dir-is-file": (
        LONGPO,
        None,
        {**LONGPO_STAGE, "s2l_ref_cache_dir": str(ROOT / "README.md")},
        1,
        r"error: s2l_ref_cache_dir: '.*README\.md' is a file, not a folder",
        r"Reference log-probs",
    ),
    # 8. the toolkit's own errors inside a plugin stage
    "typo-key": (
        GOOD,
        None,
        {"solopo_alfa": 2.0},
        1,
        r"error: unknown key 'solopo_alfa' \(did you mean 'solopo_alpha'\?\)",
        None,
    ),
    "undefined-dataset": (GOOD, None, {"dataset": "nope"}, 1, r"error: ValueError: Undefined dataset nope", None),
    "bad-template": (GOOD, None, {"template": "nope"}, 1, r"error: ValueError: Template nope does not exist", None),
    "missing-model": (GOOD, None, {"model_name_or_path": "/nonexistent/model"}, 1, r"error: .*/nonexistent/model", None),
}


@pytest.mark.parametrize("name", list(TRAIN_CASES))
def test_training_misuse(name: str, tmp_path: Path, capfd: pytest.CaptureFixture, logs: Any, tiny_model: Path) -> None:
    rows, files, overrides, status, *expected, absent = TRAIN_CASES[name]
    code, text = _train(_dataset(tmp_path, rows, files), capfd, logs, tiny_model, **overrides)
    assert code == status, text[-3000:]
    assert "Traceback" not in text, text[text.index("Traceback") - 200 :][:3000]
    if status:
        assert len([line for line in text.splitlines() if "[llamafactory-longpo] error:" in line]) == 1, text[-3000:]
    for pattern in expected:
        assert re.search(pattern, text, re.S), text[-3000:]
    if absent:
        assert not re.search(absent, text), text[-3000:]


def test_malformed_dataset_info(tmp_path: Path, capfd: pytest.CaptureFixture, logs: Any, tiny_model: Path) -> None:
    folder = _dataset(tmp_path, GOOD)
    (folder / "dataset_info.json").write_text("{bad", encoding="utf-8")
    code, text = _train(folder, capfd, logs, tiny_model)
    assert code == 1 and "Traceback" not in text
    assert re.search(r"\[llamafactory-longpo\] error: .*(JSON|json|dataset_info)", text), text[-3000:]


class _InterruptAt(TrainerCallback):
    """Ctrl-C arriving during a step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step + 1 == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_names_the_last_checkpoint(tmp_path: Path, capfd: pytest.CaptureFixture, logs: Any, tiny_model: Path) -> None:
    code, text = _train(_dataset(tmp_path, GOOD), capfd, logs, tiny_model, callbacks=[_InterruptAt(2)], save_steps=1)
    assert code == 130 and "Traceback" not in text
    assert f"error: interrupted; the last checkpoint is {tmp_path / 'out' / 'checkpoint-1'}" in text


def test_nan_loss_stops_before_a_checkpoint(tmp_path: Path, capfd: pytest.CaptureFixture, logs: Any, tiny_model: Path) -> None:
    """A diverging run (the first step sends the weights to ~1e30, the second step's gradients are NaN)."""
    code, text = _train(
        _dataset(tmp_path, GOOD), capfd, logs, tiny_model, learning_rate=1.0e30, save_steps=1, max_steps=3, max_samples=8
    )
    out = tmp_path / "out"
    assert code == 1 and "Traceback" not in text
    assert f"step 2: the gradient is NaN or infinite; training stopped before saving it, the last checkpoint is {out}" in text
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists()
    assert not (out / "model.safetensors").exists()  # the final save never ran
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(out / "checkpoint-1" / "model.safetensors")).values())


def test_nan_guard_leaves_fp16_overflow_to_the_loss_scaler(tmp_path: Path) -> None:
    """Under fp16 an infinite gradient is routine (the scaler skips that step); elsewhere it stops the run."""
    from types import SimpleNamespace

    from llamafactory_longpo.errors import TrainingError
    from llamafactory_longpo.train.callbacks import NonFiniteGuardCallback

    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.full_like(model.weight, INF)
    state = SimpleNamespace(global_step=4)
    fp16, fp32 = (SimpleNamespace(fp16=flag, output_dir=str(tmp_path)) for flag in (True, False))
    guard = NonFiniteGuardCallback()
    guard.on_pre_optimizer_step(fp16, state, None, model=model)
    guard.on_log(fp16, state, None, logs={"grad_norm": INF})
    with pytest.raises(TrainingError, match=f"step 5: the gradient is NaN or infinite; .*no checkpoint was saved in {tmp_path}"):
        guard.on_pre_optimizer_step(fp32, state, None, model=model)
    with pytest.raises(TrainingError, match="step 4: grad_norm is NaN or infinite"):
        guard.on_log(fp32, state, None, logs={"grad_norm": NAN})


def test_output_dir_lock(tmp_path: Path, capfd: pytest.CaptureFixture, logs: Any, tiny_model: Path) -> None:
    """A second run into a held output_dir is refused; the lock dies with its holder (kill -9 included)."""
    folder = _dataset(tmp_path, GOOD)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom llamafactory_longpo.dispatch import lock_output_dir\n"
            "with lock_output_dir(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)",
            str(folder / "out"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, text = _train(folder, capfd, logs, tiny_model)
        assert code == 1 and f"error: output_dir {folder / 'out'}: another run is writing to it" in text
        assert not (folder / "out" / "trainer_log.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    code, text = _train(folder, capfd, logs, tiny_model)
    assert code == 0, text[-3000:]


def test_reference_cache_is_checked(tmp_path: Path, capfd: pytest.CaptureFixture, logs: Any, tiny_model: Path) -> None:
    """A loadable cache file of the wrong shape, dtype or with non-finite values is recomputed, never used."""
    from llamafactory_longpo.train import reference

    folder = _dataset(tmp_path, GOOD)
    code, text = _train(folder, capfd, logs, tiny_model, pref_loss="sigmoid")
    assert code == 0, text[-3000:]
    (path,) = (folder / "ref_cache").glob("*.pt")
    good = torch.load(path, weights_only=True)
    key, rows, keys = good["key"], good["rows"], tuple(good["values"])
    assert reference._load(str(path), key, rows, keys)[0] is not None
    values = good["values"]
    bad = {
        "not a cache of this data and model": [[1, 2], torch.zeros(3), {"key": None}],
        "lacks the columns": [{**good, "values": "x"}, {**good, "values": {}}],
        "is not 4 float32 values": [
            {**good, "values": {k: v[:1] for k, v in values.items()}},
            {**good, "values": {k: v.long() for k, v in values.items()}},
            {**good, "values": {k: v[:, None] for k, v in values.items()}},
        ],
        "holds NaN or infinite values": [
            {**good, "values": {k: torch.full_like(v, x) for k, v in values.items()}} for x in (NAN, INF)
        ],
    }
    for why, blobs in bad.items():
        for blob in blobs:
            torch.save(blob, path)
            assert reference._load(str(path), key, rows, keys)[0] is None
            assert why in reference._load(str(path), key, rows, keys)[1]

    torch.save({**good, "values": {k: torch.full_like(v, NAN) for k, v in values.items()}}, path)
    code, text = _train(folder, capfd, logs, tiny_model, pref_loss="sigmoid")
    assert code == 0, text[-3000:]
    assert f"reference cache {path}: column" in text and "holds NaN or infinite values; computing it again" in text
    assert torch.equal(torch.load(path, weights_only=True)["values"][keys[0]], values[keys[0]])
    entries = [json.loads(line) for line in (folder / "out" / "trainer_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(e["loss"]) for e in entries if "loss" in e) and any("loss" in e for e in entries)


def test_data_checks_in_process(tmp_path: Path) -> None:
    """The suspicious-data counts, without a training run."""
    from llamafactory_longpo.data.converter import load_files, validate_files
    from llamafactory_longpo.errors import RecordError

    folder = _dataset(tmp_path, [], {"a.jsonl": GOOD + GOOD[:1], "b.jsonl": []})
    files = sorted(str(p) for p in (folder / "parts").iterdir())
    warnings: list[str] = []
    assert validate_files(files, warn=warnings.append) == 5
    assert warnings == [
        f"short_to_long data: 1 of 5 records repeat an earlier record (they weigh twice); first: {files[0]}: record 4 (line 5)",
        f"short_to_long data: 1 file(s) hold no records; first: {files[1]}",
    ]
    with pytest.raises(RecordError, match="no file holds a record"):
        validate_files([files[1], files[1]])
    rows = _mutate(lambda rs: [r.update(id=i if i % 2 else f"r{i}") for i, r in enumerate(rs)])
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    loaded = load_files([str(tmp_path / "ids.jsonl")], {})
    assert loaded.column_names == ["system", "long_context", "turns"] and len(loaded) == 4


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


MUSIQUE = ROOT / "data" / "musique_sample.jsonl"


def _build_yaml(tmp: Path, **values: Any) -> str:
    config = {"input": str(MUSIQUE), "output": str(tmp / "out.jsonl"), "model": {"model_name_or_path": "x"}, **values}
    return _write(tmp / "build.yaml", yaml.safe_dump(config))


# helper command mistakes: name -> (argv builder, expected one-line message)
HELPER_CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "missing-config": (lambda t: ["build", "solopo", str(t / "nope.yaml")], "nope.yaml: cannot read the file (No such file"),
    "yaml-list": (
        lambda t: ["build", "longpo", _write(t / "l.yaml", "- a\n")],
        "l.yaml: expected a mapping of keys, got a YAML list",
    ),
    "yaml-unparsable": (lambda t: ["build", "solopo", _write(t / "b.yaml", "input: [x\n")], "b.yaml: line 2: invalid YAML"),
    "num-samples-text": (
        lambda t: ["build", "solopo", _build_yaml(t, num_samples="many")],
        "num_samples: 'many' is not an integer",
    ),
    "missing-input": (
        lambda t: ["build", "solopo", _build_yaml(t, input=str(t / "none.jsonl"))],
        "none.jsonl: cannot read the input (No such file or directory)",
    ),
    "empty-input": (
        lambda t: ["build", "solopo", _build_yaml(t, input=_write(t / "e.jsonl", ""))],
        "e.jsonl: no usable input line (the file is empty)",
    ),
    "tiny-onto-file": (lambda t: ["make-tiny-model", _write(t / "f", "x")], "f: exists and is not a folder"),
    "demo-bad-info": (
        lambda t: ["make-demo-data", str(Path(_write(t / "demo" / "dataset_info.json", "{bad")).parent)],
        "dataset_info.json: line 1: invalid JSON",
    ),
    "eval-unknown-task": (
        lambda t: ["eval", "ruler", _write(t / "r.yaml", yaml.safe_dump({"model": {}, "output_dir": str(t), "tasks": ["nope"]}))],
        "tasks: 'nope' is not one of",
    ),
    "eval-lengths-text": (
        lambda t: ["eval", "ruler", _write(t / "r.yaml", yaml.safe_dump({"model": {}, "output_dir": str(t), "lengths": "long"}))],
        "lengths: 'long' is not a list",
    ),
    "evolve-yaml-list": (lambda t: ["evolve", _write(t / "l.yaml", "- a\n")], "l.yaml: expected a mapping of keys"),
}


@pytest.mark.parametrize("name", list(HELPER_CASES))
def test_helper_misuse(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llamafactory_longpo.cli import main

    argv, expected = HELPER_CASES[name]
    assert main(argv(tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llamafactory-longpo: error: ") and expected in err[0], err


def test_builder_resume_files_are_checked(tmp_path: Path) -> None:
    from llamafactory_longpo.builders.output import ResumableWriter
    from llamafactory_longpo.errors import RecordError

    out = tmp_path / "out.jsonl"
    _write(tmp_path / "out.jsonl.progress.jsonl", '{"key": "a", "status": "kept"}\ngarbage\n')
    with pytest.raises(RecordError, match=r"progress\.jsonl: line 2: not a line this build wrote"):
        ResumableWriter(str(out))
    (tmp_path / "out.jsonl.progress.jsonl").unlink()
    _write(out, '{"id": "a"}\n[1]\n')
    with pytest.raises(RecordError, match=r"out\.jsonl: line 2: not a line this build wrote \(wrong fields\)"):
        ResumableWriter(str(out))


def test_builder_ctrl_c_names_the_records(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamafactory_longpo import cli
    from llamafactory_longpo.builders import solopo

    config = _build_yaml(tmp_path)
    _write(tmp_path / "out.jsonl", '{"id": "a"}\n{"id": "b"}\n')

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(solopo, "build_solopo", interrupted)
    try:
        assert cli.main(["build", "solopo", config]) == 130
    except KeyboardInterrupt:  # would end the whole pytest session
        pytest.fail("Ctrl-C escaped the command")
    err = capsys.readouterr().err.strip()
    assert err == (
        f"llamafactory-longpo: interrupted; 2 finished record(s) are in {tmp_path / 'out.jsonl'}; "
        "run the same command again to resume"
    )


# one real subprocess per command: exit status 1, one error line, no traceback
COMMAND_CASES: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    "llamafactory-cli train": (
        lambda t, tiny: [
            str(VENV_BIN / "llamafactory-cli"),
            "train",
            str(write_yaml(t / "c.yaml", base_config(tiny, t / "out", solopo_alfa=1.0))),
        ],
        "unknown key 'solopo_alfa' (did you mean 'solopo_alpha'?)",
    ),
    **{
        f"llamafactory-longpo {name}": (
            lambda t, tiny, name=name: [str(VENV_BIN / "llamafactory-longpo"), *HELPER_CASES[name][0](t)],
            HELPER_CASES[name][1],
        )
        for name in ("missing-config", "tiny-onto-file", "demo-bad-info", "eval-unknown-task", "evolve-yaml-list")
    },
}


@pytest.mark.parametrize("name", list(COMMAND_CASES))
def test_command_misuse(name: str, tmp_path: Path, tiny_model: Path) -> None:
    argv, expected = COMMAND_CASES[name]
    proc = run_command(argv(tmp_path, tiny_model), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], proc.stdout[-3000:]
    assert errors[0].startswith(("llamafactory-longpo: error: ", "[llamafactory-longpo] error: "))


def _bootstrap_imports(env: dict[str, str]) -> list[str]:
    """Modules the ``.pth`` bootstrap imports at start-up (from ``-X importtime``'s tree)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], env=env, capture_output=True, text=True, check=True, cwd="/"
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:") and line.count("|") == 2]
    for i, line in enumerate(lines):
        name = line.split("|")[2]
        if name.strip() == "llamafactory_longpo._bootstrap":
            depth = len(name) - len(name.lstrip())
            inner = []
            for prior in reversed(lines[:i]):  # -X importtime lists a module's own imports just before it, indented deeper
                prior_name = prior.split("|")[2]
                if len(prior_name) - len(prior_name.lstrip()) <= depth:
                    break
                inner.append(prior_name.strip())
            return inner
    raise AssertionError(f"the bootstrap did not run:\n{proc.stderr[-2000:]}")


def test_startup_cost() -> None:
    """The bootstrap imports nothing the interpreter has not loaded already (-X importtime lists every module a
    process imports, with its time): that, not a timed assertion, is what keeps its cost near zero (measured:
    about 1.5 ms, against 28 ms when it pulled in importlib.abc)."""
    assert _bootstrap_imports(cli_env(PYTHONPATH=str(ROOT))) == ["llamafactory_longpo"]


def test_pth_checks_the_switch_first(tmp_path: Path) -> None:
    (tmp_path / "llamafactory_longpo.pth").write_text((ROOT / "llamafactory_longpo.pth").read_text())
    code = f"import site, sys; site.addsitedir({str(tmp_path)!r}); print(sorted(m for m in sys.modules if 'longpo' in m))"
    on = subprocess.run([sys.executable, "-S", "-c", code], env=cli_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    off = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env=cli_env(PYTHONPATH=str(ROOT), LLAMAFACTORY_LONGPO_DISABLE="1"),
        capture_output=True,
        text=True,
    )
    assert on.stdout.strip() == "['llamafactory_longpo', 'llamafactory_longpo._bootstrap']"
    assert off.stdout.strip() == "[]"


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: a refused command must leave them as they were."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _previous_run(out: Path) -> dict[str, bytes]:
    """An output folder holding an earlier run's log and model, and its snapshot."""
    _write(out / "trainer_log.jsonl", '{"current_steps": 1, "loss": 1.0}\n')
    _write(out / "model.safetensors", "weights")
    return _snapshot(out)


# a YAML mistake -> (its text, given the command's valid config as text; the one line's pattern)
YAML_MISTAKES: dict[str, tuple[Callable[[str], str], str]] = {
    "syntax": (lambda good: good + "seed: [1\n", r": line \d+: invalid YAML \("),
    "missing": (lambda good: "", r": cannot read the file \(No such file or directory\)"),
    "list": (lambda good: "- " + good.replace("\n", "\n  "), r": expected a mapping of keys, got a YAML list"),
    "duplicate": (
        lambda good: good + "seed: 1\nseed: 2\n",
        r": line \d+: invalid YAML \(duplicate key 'seed' \(first on line \d+\)\)",
    ),
}


def _word_mistake(key: str) -> tuple[Callable[[str], str], str]:
    """A YAML 1.1 boolean word given to a string-valued ``key``."""
    return (
        lambda good: good + f"{key}: off\n",
        rf": line \d+: {key}: off is read as false \(a YAML 1\.1 boolean\); .*{key}: \"off\"",
    )


def _train_config(t: Path, tiny: Path) -> str:
    return yaml.safe_dump(base_config(tiny, t / "out"))


def _build_config(t: Path, tiny: Path) -> str:
    return yaml.safe_dump(
        {"input": str(MUSIQUE), "output": str(t / "out" / "o.jsonl"), "model": {"model_name_or_path": str(tiny)}}
    )


def _kv_config(t: Path, tiny: Path) -> str:
    return yaml.safe_dump({"models": {"base": str(tiny)}, "output_dir": str(t / "out"), "items": 2})


# command -> (argv given the config path, its valid config, a string-valued key for the boolean-word mistake)
YAML_COMMANDS: dict[str, tuple[Callable[[str], list[str]], Callable[[Path, Path], str], str]] = {
    "train": (lambda c: [str(VENV_BIN / "llamafactory-cli"), "train", c], _train_config, "save_strategy"),
    "estimate": (lambda c: [str(VENV_BIN / "llamafactory-longpo"), "estimate", c], _train_config, "lr_scheduler_type"),
    "build": (lambda c: [str(VENV_BIN / "llamafactory-longpo"), "build", "solopo", c], _build_config, "dataset_name"),
    "eval": (lambda c: [str(VENV_BIN / "llamafactory-longpo"), "eval", "kv", c], _kv_config, "template"),
}
_SLOW_YAML = {("estimate", "syntax"), ("estimate", "missing"), ("estimate", "list")}  # each loads the toolkit: 7 s


@pytest.mark.parametrize(
    ("command", "mistake"),
    [
        pytest.param(c, m, marks=[pytest.mark.slow] if (c, m) in _SLOW_YAML else [])
        for c in YAML_COMMANDS
        for m in [*YAML_MISTAKES, "bool-word"]
    ],
)
def test_yaml_mistakes(command: str, mistake: str, tmp_path: Path, tiny_model: Path) -> None:
    """A YAML mistake is one line naming the file and line, exit status 1, in every command; nothing is written."""
    argv, good, word_key = YAML_COMMANDS[command]
    make, expected = YAML_MISTAKES[mistake] if mistake != "bool-word" else _word_mistake(word_key)
    config = tmp_path / ("nope.yaml" if mistake == "missing" else "c.yaml")
    if mistake != "missing":
        _write(config, make(good(tmp_path, tiny_model)))
    before = _previous_run(tmp_path / "out")
    proc = run_command(argv(str(config)), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(re.escape(str(config)) + expected, errors[0]), proc.stdout[-3000:]
    assert _snapshot(tmp_path / "out") == before


def test_yaml_mistake_under_torchrun(tmp_path: Path, tiny_model: Path) -> None:
    """Two ranks through torchrun: the launcher finds the mistake, prints its line once, and starts no worker."""
    config = _write(tmp_path / "c.yaml", _train_config(tmp_path, tiny_model) + "seed: 1\nseed: 2\n")
    before = _previous_run(tmp_path / "out")
    proc = run_cli(["train", config], cwd=tmp_path, **torchrun_env(tmp_path / "norms.jsonl"))
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert proc.stdout.count("error:") == 1 and "duplicate key 'seed'" in proc.stdout, proc.stdout[-3000:]
    assert "ChildFailedError" not in proc.stdout and _snapshot(tmp_path / "out") == before


def _without_tokenizer(tiny: Path, folder: Path) -> Path:
    """A model folder as many hub exports are: weights and config only."""
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny / name).read_bytes())
    return folder


# command -> (argv given the folder of the test and the model; the file of an earlier result it must keep)
TOKENIZERLESS_COMMANDS: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    "train": (
        lambda t, m: [str(VENV_BIN / "llamafactory-cli"), "train", str(write_yaml(t / "c.yaml", base_config(m, t / "out")))],
        "trainer_log.jsonl",
    ),
    "eval kv": (
        lambda t, m: [
            str(VENV_BIN / "llamafactory-longpo"),
            *("eval", "kv", _write(t / "c.yaml", yaml.safe_dump({"models": {"base": str(m)}, "output_dir": str(t / "out")}))),
        ],
        "kv_eval.json",
    ),
    "eval ruler": (
        lambda t, m: [
            str(VENV_BIN / "llamafactory-longpo"),
            *(
                "eval",
                "ruler",
                _write(t / "c.yaml", yaml.safe_dump({"model": {"model_name_or_path": str(m)}, "output_dir": str(t / "out")})),
            ),
        ],
        "scores.json",
    ),
    "build": (
        lambda t, m: [
            str(VENV_BIN / "llamafactory-longpo"),
            *(
                "build",
                "solopo",
                _write(
                    t / "c.yaml",
                    yaml.safe_dump(
                        {"input": str(MUSIQUE), "output": str(t / "out" / "o.jsonl"), "model": {"model_name_or_path": str(m)}}
                    ),
                ),
            ),
        ],
        "o.jsonl",
    ),
}


@pytest.mark.parametrize("command", list(TOKENIZERLESS_COMMANDS))
def test_model_without_tokenizer(command: str, tmp_path: Path, tiny_model: Path) -> None:
    """Refused in one line naming the folder and what it lacks, before anything is loaded or written."""
    argv, kept = TOKENIZERLESS_COMMANDS[command]
    model = _without_tokenizer(tiny_model, tmp_path / "export")
    _write(tmp_path / "out" / kept, '{"earlier": "result"}\n')
    before = _snapshot(tmp_path / "out")
    proc = run_command(argv(tmp_path, model), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"{model} lacks a tokenizer (none of tokenizer.json, " in errors[0], proc.stdout[-3000:]
    assert _snapshot(tmp_path / "out") == before


def test_missing_model_under_torchrun(tmp_path: Path, tiny_model: Path) -> None:
    """The launcher finds a model path that does not exist: one line, no worker started."""
    config = write_yaml(tmp_path / "c.yaml", base_config(tmp_path / "no-such-model", tmp_path / "out"))
    proc = run_cli(["train", str(config)], cwd=tmp_path, **torchrun_env(tmp_path / "norms.jsonl"))
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert errors == [f"[llamafactory-longpo] error: model_name_or_path: {tmp_path / 'no-such-model'} does not exist"], (
        proc.stdout[-3000:]
    )
    assert "ChildFailedError" not in proc.stdout and not (tmp_path / "out").exists()


def test_stock_stage_hears_nothing_from_the_plugin(tmp_path: Path, tiny_model: Path) -> None:
    """``stage: sft`` with a stock dataset and a cutoff_len below short_cutoff_len's default: the plugin is silent."""
    data = tmp_path / "data"
    _write(
        data / "a.jsonl", "".join(json.dumps({"instruction": f"say {i}", "input": "", "output": "hi"}) + "\n" for i in range(4))
    )
    _write(data / "dataset_info.json", json.dumps({"a": {"file_name": "a.jsonl"}}))
    config = base_config(tiny_model, tmp_path / "out", stage="sft", dataset="a", dataset_dir=str(data), cutoff_len=1024)
    for key in ("pref_loss", "short_cutoff_len"):
        config.pop(key)
    config.update(max_steps=1, save_strategy="no", plot_loss=False)
    proc = run_cli(["train", str(write_yaml(tmp_path / "sft.yaml", config))], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert not re.search(r"longpo|short_cutoff_len|s2l_", proc.stdout), proc.stdout[-3000:]


def _trained_model(folder: Path) -> Path:
    _write(folder / "model.safetensors", "trained weights")
    _write(folder / "config.json", "{}")
    return folder


# helper command writing over work -> (argv given the test folder, the folder it must leave unchanged, the one line)
OVERWRITE_CASES: dict[str, tuple[Callable[[Path], list[str]], str, str]] = {
    "tiny-onto-trained-model": (
        lambda t: ["make-tiny-model", str(_trained_model(t / "m"))],
        "m",
        r"m: not empty \(holds config\.json, model\.safetensors\); .*add --force",
    ),
    "tiny-onto-other-files": (
        lambda t: ["make-tiny-model", str(Path(_write(t / "m" / "notes.txt", "mine")).parent), "--layers", "1"],
        "m",
        r"m: not empty \(holds notes\.txt\)",
    ),
    "demo-onto-edited-data": (
        lambda t: ["make-demo-data", str(Path(_write(t / "m" / "data" / "solopo_demo.jsonl", "{}\n")).parent.parent)],
        "m",
        r"solopo_demo\.jsonl: differs from the demo's data; .*add --force",
    ),
    "tiny-zero-width": (
        lambda t: ["make-tiny-model", str(t / "m"), "--hidden-size", "0"],
        "",
        r"--hidden-size: 0 must be between 2 and",
    ),
    "tiny-heads-not-dividing": (
        lambda t: ["make-tiny-model", str(t / "m"), "--heads", "3"],
        "",
        r"--hidden-size: 64 must be --heads \(3\) times an even head size",
    ),
    "tiny-kv-heads": (
        lambda t: ["make-tiny-model", str(t / "m"), "--kv-heads", "3"],
        "",
        r"--kv-heads: 3 must divide --heads \(4\)",
    ),
    "tiny-small-tokenizer": (
        lambda t: ["make-tiny-model", str(t / "m"), "--tokenizer-vocab", "-5"],
        "",
        r"--tokenizer-vocab: -5 must be between 259 and",
    ),
}


@pytest.mark.parametrize("name", list(OVERWRITE_CASES))
def test_helpers_keep_work(name: str, tmp_path: Path) -> None:
    """A helper refuses to write over a folder that holds something (``--force`` allows it), and impossible sizes,
    in one line, before writing anything."""
    argv, kept, expected = OVERWRITE_CASES[name]
    args = argv(tmp_path)
    before = _snapshot(tmp_path)
    proc = run_command([str(VENV_BIN / "llamafactory-longpo"), *args], cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and re.search(r"^llamafactory-longpo: error: .*" + expected, lines[0]), lines
    assert _snapshot(tmp_path) == before and (kept or not (tmp_path / "m").exists())


# a value no one could mean -> (argv given the test folder and the tiny model, the one line's pattern)
RANGE_CASES: dict[str, tuple[Callable[[Path, Path], list[str]], str]] = {
    "train-alpha-overflow": (
        lambda t, m: [
            str(VENV_BIN / "llamafactory-cli"),
            "train",
            str(write_yaml(t / "c.yaml", base_config(m, t / "out", solopo_alpha=1e30))),
        ],
        r"\[llamafactory-longpo\] error: solopo_alpha: 1e\+30 must be >= 0 and <= 100$",
    ),
    "train-chunk-huge": (
        lambda t, m: [
            str(VENV_BIN / "llamafactory-cli"),
            "train",
            str(write_yaml(t / "c.yaml", base_config(m, t / "out", s2l_logits_chunk=2**40))),
        ],
        r"error: s2l_logits_chunk: 1099511627776 must be >= 1 and <= 1,048,576$",
    ),
    "estimate-device-memory": (
        lambda t, m: [
            str(VENV_BIN / "llamafactory-longpo"),
            "estimate",
            str(ROOT / "examples/tiny/solo_orpo_tiny.yaml"),
            "--device-memory",
            "-5",
        ],
        r"error: --device-memory: -5\.0 must be > 0 and <= 4,096$",
    ),
    "build-no-samples": (
        lambda t, m: [str(VENV_BIN / "llamafactory-longpo"), "build", "solopo", _build_yaml(t, num_samples=0)],
        r"build\.yaml: num_samples: 0 must be >= 1 and <= 1,024$",
    ),
    "build-negative-temperature": (
        lambda t, m: [str(VENV_BIN / "llamafactory-longpo"), "build", "longpo", _build_yaml(t, answer_temperature=-1.0)],
        r"build\.yaml: answer_temperature: -1\.0 must be >= 0 and <= 10$",
    ),
    "eval-depth-past-the-end": (
        lambda t, m: [
            str(VENV_BIN / "llamafactory-longpo"),
            *(
                "eval",
                "ruler",
                _write(t / "r.yaml", yaml.safe_dump({"model": {}, "output_dir": str(t / "out"), "depths": [0.5, 2.0]})),
            ),
        ],
        r"r\.yaml: depths: 2\.0 must be >= 0 and <= 1$",
    ),
}


@pytest.mark.parametrize("name", list(RANGE_CASES))
def test_values_out_of_range(name: str, tmp_path: Path, tiny_model: Path) -> None:
    argv, expected = RANGE_CASES[name]
    before = _previous_run(tmp_path / "out")
    proc = run_command(argv(tmp_path, tiny_model), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(expected, errors[0]), proc.stdout[-3000:]
    assert _snapshot(tmp_path / "out") == before


def _train_on(tmp_path: Path, tiny: Path, rows: list[Any], **overrides: Any) -> subprocess.CompletedProcess:
    """``llamafactory-cli train`` (one step) over ``rows`` as dataset ``d``."""
    folder = _dataset(tmp_path / "data", rows)
    config = base_config(tiny, tmp_path / "out", dataset="d", dataset_dir=str(folder), max_steps=1, plot_loss=False)
    config.update(s2l_ref_cache_dir=str(tmp_path / "ref_cache"), save_strategy="no", **overrides)
    return run_cli(["train", str(write_yaml(tmp_path / "c.yaml", config))], cwd=tmp_path)


@pytest.mark.slow
def test_record_text_with_a_lone_surrogate(tmp_path: Path, tiny_model: Path) -> None:
    """JSON's ``"\\ud800"`` decodes to a character no UTF-8 text holds: one line naming file, record and field."""
    before = _previous_run(tmp_path / "out")
    proc = _train_on(tmp_path, tiny_model, _mutate(lambda rs: rs[1]["turns"][0].update(chosen="ok \ud83d then")))
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    expected = "d.jsonl: record 1 (line 2): field 'turns[0].chosen' holds a lone UTF-16 surrogate (\\ud83d at character 3)"
    assert len(errors) == 1 and expected in errors[0], proc.stdout[-3000:]
    assert _snapshot(tmp_path / "out") == before


@pytest.mark.slow
def test_record_text_with_nul_is_counted(tmp_path: Path, tiny_model: Path) -> None:
    proc = _train_on(
        tmp_path, tiny_model, _mutate(lambda rs: [r.update(long_context=r["long_context"] + "\x00") for r in rs[:2]])
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.count("hold NUL characters") == 1, proc.stdout[-3000:]
    assert re.search(r"2 of 4 records hold NUL characters \(\\u0000; .*first: \S*d\.jsonl: record 0 \(line 1\)", proc.stdout)


def test_unknown_attention_kernel_under_torchrun(tmp_path: Path, tiny_model: Path) -> None:
    """A ``flash_attn`` the toolkit does not have, with sequence parallelism over the 2 ranks: the launcher's line,
    once, before any worker loads the model."""
    config = base_config(tiny_model, tmp_path / "out", flash_attn="fa4", sequence_parallel_size=2)
    before = _previous_run(tmp_path / "out")
    proc = run_cli(
        ["train", str(write_yaml(tmp_path / "c.yaml", config))], cwd=tmp_path, **torchrun_env(tmp_path / "norms.jsonl")
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert errors == ["[llamafactory-longpo] error: flash_attn: 'fa4' is not one of auto, disabled, sdpa, fa2, fa3"], proc.stdout[
        -3000:
    ]
    assert "ChildFailedError" not in proc.stdout and _snapshot(tmp_path / "out") == before


def _checkpoint(folder: Path, tiny: Path, files: dict[str, str | None]) -> Path:
    """A checkpoint folder: the tiny model's weights and config, a trainer state, then ``files`` (None: removed)."""
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny / name).read_bytes())
    (folder / "trainer_state.json").write_text('{"global_step": 4}')
    for name, text in files.items():
        if text is None:
            (folder / name).unlink()
        else:
            (folder / name).write_text(text)
    return folder


def _other_shape(tiny: Path) -> str:
    config = json.loads((tiny / "config.json").read_text())
    return json.dumps({**config, "hidden_size": config["hidden_size"] // 2})


# a checkpoint that cannot be resumed from -> (overrides given the output folder and the model; the line's pattern)
RESUME_CASES: dict[str, tuple[Callable[[Path, Path], dict[str, Any]], str]] = {
    "missing": (lambda out, m: {"resume_from_checkpoint": str(out / "checkpoint-9")}, r"checkpoint-9 does not exist$"),
    "garbage-weights": (
        lambda out, m: {"resume_from_checkpoint": str(_checkpoint(out / "checkpoint-4", m, {"model.safetensors": "garbage"}))},
        r"checkpoint-4 is damaged \(model\.safetensors is not a safetensors file\)$",
    ),
    "other-shape": (
        lambda out, m: {"resume_from_checkpoint": str(_checkpoint(out / "checkpoint-4", m, {"config.json": _other_shape(m)}))},
        r"checkpoint-4 holds a model of another shape \(hidden_size 32, the model's 64\)$",
    ),
    "torn-newest-auto": (
        lambda out, m: {"overwrite_output_dir": False, "_": _checkpoint(out / "checkpoint-4", m, {"trainer_state.json": None})},
        r"output_dir: its newest checkpoint \S*checkpoint-4 is incomplete \(no trainer_state\.json: its save was cut short\), "
        r"and no other can be resumed from; remove it, or set overwrite_output_dir: true",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_resume_target_is_checked_first(name: str, tmp_path: Path, tiny_model: Path) -> None:
    """With ``overwrite_output_dir: true`` a refused run deleted the earlier log first; now nothing changes."""
    out = tmp_path / "out"
    _previous_run(out)
    make, expected = RESUME_CASES[name]
    overrides = make(out, tiny_model)
    overrides.pop("_", None)
    before = _snapshot(out)
    proc = run_cli(["train", str(write_yaml(tmp_path / "c.yaml", base_config(tiny_model, out, **overrides)))], cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and re.search(expected, errors[0]), proc.stdout[-3000:]
    assert _snapshot(out) == before


@pytest.mark.slow
def test_refused_while_starting_keeps_the_log(tmp_path: Path, tiny_model: Path) -> None:
    """A run refused after the trainer is built (the optimizer refuses a negative learning rate) keeps the log."""
    out = tmp_path / "out"
    before = _previous_run(out)
    proc = run_cli(
        ["train", str(write_yaml(tmp_path / "c.yaml", base_config(tiny_model, out, learning_rate=-1.0)))], cwd=tmp_path
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert _snapshot(out) == before


@pytest.mark.slow
def test_sigterm_says_where_the_run_stopped(tmp_path: Path, tiny_model: Path) -> None:
    """What a scheduler sends: one line with the step reached, the last checkpoint and how to resume; exit 143."""
    import os
    import signal
    import time

    out = tmp_path / "out"
    config = base_config(tiny_model, out, max_steps=400, save_steps=2, plot_loss=False)
    proc = start_cli(["train", str(write_yaml(tmp_path / "c.yaml", config))], tmp_path)
    deadline = time.time() + 300
    while not (out / "checkpoint-2" / "trainer_state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, text[-3000:]
    pattern = r"error: terminated \(SIGTERM\) at step (\d+); the last checkpoint is (\S+); "
    found = re.search(pattern + r"to resume, run again with resume_from_checkpoint: \2$", errors[0])
    assert found and int(found.group(1)) >= 2 and Path(found.group(2)).name.startswith("checkpoint-"), errors[0]


def _file_size_limit(limit: int) -> Callable[[], None]:
    """In the child before it runs: files larger than ``limit`` bytes cannot be written, and a write past it fails
    with EFBIG instead of killing the process (SIGXFSZ ignored, as a shell's ``ulimit -f`` under a scheduler does)."""
    import resource
    import signal

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_files


@pytest.mark.slow  # trains to its first save: 12 s
def test_failed_save_leaves_no_torn_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    """A save that cannot be written, simulated without root by a 1 MiB file-size limit (RLIMIT_FSIZE: the tiny
    model's 0.6 MiB weights fit, its 1.2 MiB of Adam moments do not; a full disk fails the same writes with
    ENOSPC): one line naming the checkpoint and the limit, and no checkpoint folder left behind."""
    out = tmp_path / "out"
    config = base_config(tiny_model, out, max_steps=2, save_steps=1, plot_loss=False)
    proc = start_cli(["train", str(write_yaml(tmp_path / "c.yaml", config))], tmp_path, preexec_fn=_file_size_limit(1 << 20))
    text = proc.communicate(timeout=600)[0]
    assert proc.returncode == 1 and "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if "error:" in line]
    pattern = r"error: saving checkpoint \S+checkpoint-1 failed: .+ free on its disk, files limited to 1\.0 MiB \(ulimit -f\); "
    assert len(errors) == 1 and re.search(pattern + r"no checkpoint was saved in \S+out$", errors[0]), text[-3000:]
    assert [p.name for p in out.iterdir() if "checkpoint" in p.name] == [], errors[0]


@pytest.mark.parametrize("ranks", [1, 2])
def test_too_little_disk_for_one_checkpoint(ranks: int, tmp_path: Path, tiny_model: Path) -> None:
    """A model whose weights take half the free space (a sparse file: it takes no disk itself) cannot be
    checkpointed with AdamW's two moments: the run is refused before anything is loaded or written (with 2
    ranks, by the launcher before torchrun starts them)."""
    import shutil

    model = tmp_path / "big"
    shutil.copytree(tiny_model, model)
    weights = shutil.disk_usage(tmp_path).free // 2
    with open(model / "model.safetensors", "r+b") as fh:
        fh.truncate(weights)
    out = tmp_path / "out"
    before = _previous_run(out)
    env = torchrun_env(tmp_path / "norms.jsonl") if ranks > 1 else {}
    proc = run_cli(["train", str(write_yaml(tmp_path / "c.yaml", base_config(model, out)))], cwd=tmp_path, **env)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout and "ChildFailedError" not in proc.stdout, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    pattern = (
        rf"error: output_dir: {re.escape(str(out))} is on a disk with [\d.]+ GiB free, and one checkpoint of this run "
        r"needs at least [\d.]+ GiB \(the weights [\d.]+ GiB and AdamW's two moments [\d.]+ GiB\); free space"
    )
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stdout[-3000:]
    assert _snapshot(out) == before


@pytest.mark.slow  # one training run to its first checkpoint, then two refused runs: 25 s
def test_resume_from_another_run_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    """A checkpoint written by a solopo run, resumed by a longpo run on another dataset (named, then found by
    auto-resume): one line naming what differs and the knob, nothing changed."""
    out = tmp_path / "out"
    config = base_config(tiny_model, out, max_steps=1, save_steps=1, plot_loss=False)
    first = run_cli(["train", str(write_yaml(tmp_path / "c.yaml", config))], cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:]
    before = _snapshot(out)
    differs = r"was written by a run with stage solopo \(this run: longpo\), pref_loss orpo \(this run: sigmoid\), "
    differs += r"dataset solopo_demo \(this run: longpo_demo\); .*set s2l_resume_other_run: true to resume anyway, "
    cases = {
        r"resume_from_checkpoint: \S+checkpoint-1 " + differs + "or model_name_or_path": {
            "resume_from_checkpoint": str(out / "checkpoint-1")
        },
        r"output_dir: its checkpoint \S+checkpoint-1 " + differs + "or overwrite_output_dir": {"overwrite_output_dir": False},
    }
    for expected, overrides in cases.items():
        other = base_config(tiny_model, out, **{**LONGPO_RUN, **overrides})
        proc = run_cli(["train", str(write_yaml(tmp_path / "c.yaml", other))], cwd=tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
        errors = [line for line in proc.stdout.splitlines() if "error:" in line]
        assert len(errors) == 1 and re.search(expected, errors[0]), proc.stdout[-3000:]
        assert _snapshot(out) == before


@pytest.mark.slow  # one estimate at 2M tokens: 11 s
def test_estimate_at_two_million_tokens() -> None:
    """At 2,097,152 tokens the batch's token ids outgrow the 4M elements the trace used to compute for real; what
    is scored was then decided from a fake tensor (DataDependentOutputException). Now the estimate is made."""
    proc = run_command(
        [
            str(VENV_BIN / "llamafactory-longpo"),
            "estimate",
            str(ROOT / "examples/tiny/solo_orpo_tiny.yaml"),
            "--lengths",
            "2097152",
        ],
        cwd=ROOT,  # the example's model path is relative to the repository
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stdout and "error:" not in proc.stdout, proc.stdout[-3000:]
    assert re.search(r"per rank \(GiB\) +2,097,152\n", proc.stdout) and re.search(r"\n  total +[\d.]+\n", proc.stdout), (
        proc.stdout
    )


def test_disabled_plugin_stage_is_one_line(tmp_path: Path, tiny_model: Path) -> None:
    """``LLAMAFACTORY_LONGPO_DISABLE=1`` with ``stage: solopo`` was the toolkit's traceback about keys it does not
    know. ``llamafactory-cli train`` as its script runs it, with the repository's ``.pth`` in a site folder of its
    own (the installed copy may be older): one line naming the switch, before the toolkit is imported."""
    import llamafactory

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "llamafactory_longpo.pth").write_text((ROOT / "llamafactory_longpo.pth").read_text())
    out = tmp_path / "out"
    before = _previous_run(out)
    config = write_yaml(tmp_path / "c.yaml", base_config(tiny_model, out))
    code = (
        f"import site, sys; sys.argv = ['llamafactory-cli', 'train', {str(config)!r}]; site.addsitedir({str(site_dir)!r}); "
        f"site.addsitedir({str(Path(llamafactory.__file__).parents[1])!r}); from llamafactory.cli import main; sys.exit(main())"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=tmp_path,
        env=cli_env(PYTHONPATH=str(ROOT), LLAMAFACTORY_LONGPO_DISABLE="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert proc.stdout.splitlines() == [
        "[llamafactory-longpo] error: stage solopo comes from the llamafactory-longpo plugin, which "
        "LLAMAFACTORY_LONGPO_DISABLE=1 turns off; unset LLAMAFACTORY_LONGPO_DISABLE to run it"
    ], proc.stdout[-3000:]
    assert _snapshot(out) == before
