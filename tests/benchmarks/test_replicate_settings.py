"""``replicate_small.py --set``: typed overrides, and one line for a bad one."""

from __future__ import annotations

import pytest

from tests.conftest import benchmark_module


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch):
    return benchmark_module(monkeypatch, "replicate_small")


def test_set_keeps_each_settings_type(script) -> None:
    s = script.apply_settings(script.Settings(), ["steps=200", "lr=1e-3", "sft_lr=0.002", "temperature=2"])
    assert (s.steps, s.lr, s.sft_lr, s.temperature) == (200, 1e-3, 0.002, 2.0)
    assert type(s.temperature) is float
    assert script.Settings().steps != 200  # the defaults are not changed
    for bad, message in [
        ("steps=2.5", "--set: steps: 2.5 is not an integer"),
        ("stepz=2", "--set: unknown key 'stepz'; allowed: batch, "),
        ("steps", "'steps': expected KEY=VALUE"),
        ("lr=fast", "--set: lr: 'fast' is not a finite number"),
        ("facts_per_paragraph=7", "--set: facts_per_paragraph=7, hops=2, train_mult=8: a LongPO document needs more names"),
    ]:
        with pytest.raises(SystemExit, match="^replicate_small.py: error: " + message.replace("(", r"\(")):
            script.apply_settings(script.Settings(), [bad])
