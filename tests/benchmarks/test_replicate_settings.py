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


def test_every_plugin_method_passes_its_stage_checks_and_sets_only_knobs_it_reads(script, caplog) -> None:
    from dataclasses import fields

    from llamafactory_longpo.hparams import PLUGIN_STAGES, ShortToLongFinetuningArguments

    names = {f.name for f in fields(ShortToLongFinetuningArguments)}
    plugin = {name: m for name, m in script.METHODS.items() if m[0] in PLUGIN_STAGES}
    assert {"S2LD off-policy", "S2LD on-policy"} <= set(plugin)
    for name, (stage, _, extra) in plugin.items():
        args = ShortToLongFinetuningArguments(**{k: v for k, v in extra.items() if k in names})
        args.stage, args.pref_loss = stage, extra.get("pref_loss", "sigmoid")  # the toolkit's fields, merged in training
        caplog.clear()
        with caplog.at_level("WARNING", logger="llamafactory.longpo.hparams"):
            args.validate_short_to_long(args.stage, args.pref_loss)
        assert [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()] == [], name


def test_evaluated_lengths_reach_the_training_length(script) -> None:
    assert script.eval_mults(script.Settings()) == (1, 2, 4, 8)
    assert script.eval_mults(script.apply_settings(script.Settings(), ["train_mult=4"])) == (1, 2, 4, 8)
    assert script.eval_mults(script.apply_settings(script.Settings(), ["train_mult=16"])) == (1, 2, 4, 8, 16)
