"""Bad input: one clear line naming file, record and field; exit status 1; no output written.

The cases run the toolkit's ``run_exp`` in this process; one of them also runs as a real ``llamafactory-cli``
subprocess, for the exit status and the absence of a traceback as a user sees them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, base_config, run_cli, torchrun_env, train_in_process, write_yaml

GOOD = [json.loads(line) for line in (ROOT / "data" / "solopo_demo.jsonl").read_text(encoding="utf-8").splitlines()[:3]]


def _dataset(tmp_path: Path, rows: list | bytes, formatting: str = "short_to_long") -> Path:
    data = tmp_path / "d.jsonl"
    if isinstance(rows, bytes):
        data.write_bytes(rows)
    else:
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    entry = {"file_name": "d.jsonl", "formatting": formatting, "ranking": formatting == "short_to_long"}
    (tmp_path / "dataset_info.json").write_text(json.dumps({"d": entry}), encoding="utf-8")
    return data


def _mutate(fn) -> list:
    rows = json.loads(json.dumps(GOOD))
    fn(rows[2])
    return rows


CASES = {
    "missing-field": (
        _mutate(lambda r: r.pop("long_context")),
        {},
        "d.jsonl: record 2 (line 3): field 'long_context' is missing",
    ),
    "misnamed-field": (
        _mutate(lambda r: r["turns"][0].update(instrction=r["turns"][0].pop("instruction"))),
        {},
        "record 2 (line 3): field 'turns[0].instruction' is missing (found 'instrction'",
    ),
    "empty-turns": (_mutate(lambda r: r.update(turns=[])), {}, "record 2 (line 3): field 'turns' is empty"),
    "turn-without-short-context": (
        _mutate(lambda r: r["turns"][0].pop("short_context")),
        {},
        "record 2 (line 3): field 'turns[0].short_context' is missing",
    ),
    "non-utf8": (
        (json.dumps(GOOD[0]) + "\n").encode() + b'{"long_context": "caf\xe9"}\n',
        {},
        "d.jsonl: line 2: not valid UTF-8",
    ),
    "stage-cannot-use": (GOOD, {"stage": "kto"}, "dataset 'd' (d.jsonl): short_to_long records cannot feed stage 'kto'"),
    "unknown-knob-value": (GOOD, {"solopo_distance": "cosine"}, "solopo_distance: 'cosine' is not one of abs, square, smooth_l1"),
    "wrong-pref-loss": (GOOD, {"pref_loss": "hinge"}, "pref_loss: 'hinge' is not supported by stage solopo"),
}


def _check(code: int, text: str, expected: str, out: Path) -> None:
    assert code == 1, text[-3000:]
    errors = [line for line in text.splitlines() if "[llamafactory-longpo] error:" in line]
    assert len(errors) == 1 and expected in errors[0], text[-3000:]
    assert "Traceback" not in text
    assert not out.exists()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_one_line_error(tmp_path: Path, tiny_model: Path, name: str, capfd: pytest.CaptureFixture, logs) -> None:
    rows, overrides, expected = CASES[name]
    _dataset(tmp_path, rows)
    out = tmp_path / "out"
    code, text = train_in_process(base_config(tiny_model, out, dataset="d", dataset_dir=str(tmp_path), **overrides), capfd, logs)
    _check(code, text, expected, out)


def test_bad_input_from_the_cli(tmp_path: Path, tiny_model: Path) -> None:
    rows, overrides, expected = CASES["missing-field"]
    _dataset(tmp_path, rows)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "cfg.yaml", base_config(tiny_model, out, dataset="d", dataset_dir=str(tmp_path), **overrides))
    proc = run_cli(["train", str(cfg)], cwd=tmp_path)
    _check(proc.returncode, proc.stdout, expected, out)
    assert proc.stdout.count("[llamafactory-longpo] error:") == 1 and proc.stdout.rstrip().splitlines()[-1].startswith(
        "[llamafactory-longpo] error:"
    ), proc.stdout[-3000:]


def test_plugin_stage_rejects_other_formats(tmp_path: Path, tiny_model: Path, capfd: pytest.CaptureFixture, logs) -> None:
    _dataset(tmp_path, [{"instruction": "q", "input": "", "chosen": "a", "rejected": "b"}], formatting="alpaca")
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["d"]["ranking"] = True
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    out = tmp_path / "out"
    code, text = train_in_process(base_config(tiny_model, out, dataset="d", dataset_dir=str(tmp_path)), capfd, logs)
    _check(code, text, 'dataset \'d\' (d.jsonl): stage solopo needs "formatting": "short_to_long"', out)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"solopo_alpha": -1.0}, "solopo_alpha: -1.0 must be"),
        ({"pref_betta": 0.1}, "unknown key 'pref_betta' (did you mean 'pref_beta'?)"),
    ],
    ids=["bad-knob", "typo"],
)
def test_distributed_bad_key_stops_before_torchrun(tmp_path: Path, tiny_model: Path, overrides: dict, expected: str) -> None:
    """Two ranks through torchrun (``FORCE_TORCHRUN=1``, as every multi-GPU run): a bad key is one line, printed
    once, by the launching process; no worker starts, so no torchrun failure report and no launcher traceback."""
    _dataset(tmp_path, GOOD)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "cfg.yaml", base_config(tiny_model, out, dataset="d", dataset_dir=str(tmp_path), **overrides))
    proc = run_cli(["train", str(cfg)], cwd=tmp_path, **torchrun_env(tmp_path / "norms.jsonl"))
    _check(proc.returncode, proc.stdout, expected, out)
    assert "ChildFailedError" not in proc.stdout and "torchrun" not in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow
def test_distributed_bad_record_ends_without_launcher_traceback(tmp_path: Path, tiny_model: Path) -> None:
    """A bad record is found by the workers (the data are read there): each rank's line, then the workers'
    exit status, without the launcher's ``CalledProcessError`` traceback on top of torchrun's report."""
    rows, overrides, expected = CASES["missing-field"]
    _dataset(tmp_path, rows)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "cfg.yaml", base_config(tiny_model, out, dataset="d", dataset_dir=str(tmp_path), **overrides))
    proc = run_cli(["train", str(cfg)], cwd=tmp_path, **torchrun_env(tmp_path / "norms.jsonl"))
    assert proc.returncode == 1, proc.stdout[-3000:]
    errors = [line for line in proc.stdout.splitlines() if "[llamafactory-longpo] error:" in line]
    assert errors and all(expected in line for line in errors), proc.stdout[-3000:]
    assert "CalledProcessError" not in proc.stdout, proc.stdout[-3000:]
    assert proc.stdout.rstrip().endswith("=" * 60), proc.stdout[-3000:]  # torchrun's failure report is the last thing
    assert not any((out / name).exists() for name in ("checkpoint-1", "model.safetensors"))
