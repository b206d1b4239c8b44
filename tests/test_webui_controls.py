"""The LlamaBoard controls take each knob's default, help and allowed values from its argument's own field."""

from __future__ import annotations

from dataclasses import fields


def test_controls_come_from_the_arguments() -> None:
    from llamafactory.hparams.finetuning_args import FinetuningArguments

    from llamafactory_longpo.hparams import SOLOPO_PREF_LOSSES, ShortToLongFinetuningArguments
    from llamafactory_longpo.webui import CONTROLS, control_specs

    specs = control_specs()
    assert specs.keys() == CONTROLS.keys()
    plugin = {f.name: f for f in fields(ShortToLongFinetuningArguments)}
    toolkit = {f.name: f for f in fields(FinetuningArguments)}
    for name, spec in specs.items():
        field = plugin.get(spec.argument) or toolkit[spec.argument]
        assert spec.info.startswith(field.metadata["help"]), name
        assert spec.default == (0.0 if field.default is None else field.default), name
    # the base loss starts where the toolkit's does; its list is SoLoPO's, narrower than the toolkit's
    assert specs["solopo_pref_loss"].default == FinetuningArguments().pref_loss == "sigmoid"
    assert specs["solopo_pref_loss"].choices == SOLOPO_PREF_LOSSES
    assert specs["solopo_distance"].choices == ("abs", "square", "smooth_l1")
    # stage s2ld has its own panel: its divergence list, its on-policy switch and sampling knobs
    assert {n for n, s in specs.items() if s.stage == "s2ld"} == {
        "s2ld_divergence",
        "s2ld_jsd_beta",
        "s2ld_nll_weight",
        "s2ld_on_policy",
        "s2ld_samples",
        "s2ld_max_new_tokens",
        "s2ld_temperature",
        "s2ld_sample_every",
        "s2ld_sequence_parallel",
    }
    assert specs["s2ld_divergence"].choices == ("forward_kl", "reverse_kl", "jsd")
    assert specs["s2ld_on_policy"].default is False and specs["s2ld_jsd_beta"].default == 0.5
    # "off" knobs are written to a run only when changed
    assert {n for n, s in specs.items() if s.off_at_default} == {
        "policy_rope_theta",
        "solopo_sequence_parallel",
        "longpo_sequence_parallel",
        "s2ld_sequence_parallel",
    }
