"""Configs read as the toolkit reads them: ``1e-5`` (no dot) is a number in LLaMA-Factory's OmegaConf, a
string in plain YAML 1.1; both the package's own configs and the planner's reading of a training YAML must
agree with the toolkit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llamafactory_longpo import yamlio
from llamafactory_longpo.builders.solopo import SoLoPOBuildConfig
from llamafactory_longpo.cli import _load_config
from llamafactory_longpo.planner.step import load_run_config
from tests.conftest import ROOT


@pytest.mark.parametrize("text", ["1e-5", "-3E2", "+2e3", "1_000e2", "1.0e-5", "12", "1e", "e5", "'1e-5'", "a1e5"])
def test_numbers_as_omegaconf_reads_them(text: str) -> None:
    from omegaconf import OmegaConf  # the toolkit's own reader (a dependency of llamafactory)

    assert yamlio.load(f"a: {text}") == OmegaConf.to_container(OmegaConf.create(f"a: {text}"))


def test_builder_config_and_override_take_exponent_floats(tmp_path: Path) -> None:
    path = tmp_path / "build.yaml"
    path.write_text("input: in.jsonl\noutput: out.jsonl\nmodel: {model_name_or_path: m}\ntemperature: 8.5e-1\ntop_p: 9e-1\n")
    config = _load_config(SoLoPOBuildConfig, str(path), False, ["temperature=7e-1"])
    assert (config.temperature, config.top_p) == (0.7, 0.9)


def test_planner_reads_a_learning_rate_without_a_dot(tmp_path: Path) -> None:
    text = (ROOT / "examples" / "solo_orpo_qwen.yaml").read_text()
    path = tmp_path / "run.yaml"
    path.write_text(text.replace("learning_rate: 5.0e-7", "learning_rate: 1e-5"))
    assert yaml.safe_load(path.read_text())["learning_rate"] == "1e-5"  # what plain YAML 1.1 makes of it
    assert load_run_config(str(path)).training_args.learning_rate == 1e-5
