"""LlamaBoard (web UI): the plugin stages' own controls, their dataset filter, and their run arguments.

The board builds its train tab in one function whose event handlers capture the set of input
components when they are bound, so the plugin's controls are created first (they join that set
through ``Manager.get_base_elems``), shown in their own accordion at the top of the tab, and only
while their stage is selected. Their values reach the run through ``Runner._parse_train_args``, so
"preview command", the saved ``training_args.yaml`` and config save/load all carry them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Optional

from .hparams import PLUGIN_STAGES, SOLOPO_PREF_LOSSES, ShortToLongFinetuningArguments, knob_spec

# control -> (stage, training argument, label, allowed values when narrower than the argument's own). Defaults,
# help and the allowed values otherwise come from the argument's dataclass field (the plugin's knobs in hparams,
# the toolkit's own for pref_loss, pref_beta, simpo_gamma): nothing about a knob is written twice.
CONTROLS: dict[str, tuple[str, str, str, Optional[tuple[str, ...]]]] = {
    "solopo_pref_loss": ("solopo", "pref_loss", "Base loss", SOLOPO_PREF_LOSSES),
    "solopo_beta": ("solopo", "pref_beta", "Beta", None),
    "solopo_gamma": ("solopo", "simpo_gamma", "Gamma", None),
    "solopo_alpha": ("solopo", "solopo_alpha", "Alpha", None),
    "solopo_distance": ("solopo", "solopo_distance", "Distance", None),
    "solopo_long_reference": ("solopo", "solopo_long_reference", "Long reference", None),
    "solopo_align": ("solopo", "solopo_align", "Alignment", None),
    "longpo_beta": ("longpo", "pref_beta", "Beta", None),
    "longpo_lambda": ("longpo", "longpo_lambda", "Lambda", None),
    "longpo_nll_weight": ("longpo", "longpo_nll_weight", "NLL weight", None),
    "longpo_nll_scope": ("longpo", "longpo_nll_scope", "NLL scope", None),
    "policy_rope_theta": ("longpo", "policy_rope_theta", "Policy RoPE theta", None),
    "solopo_sequence_parallel": ("solopo", "sequence_parallel_size", "Sequence parallel", None),
    "longpo_sequence_parallel": ("longpo", "sequence_parallel_size", "Sequence parallel", None),
    "s2ld_divergence": ("s2ld", "s2ld_divergence", "Divergence", None),
    "s2ld_jsd_beta": ("s2ld", "s2ld_jsd_beta", "JSD beta", None),
    "s2ld_nll_weight": ("s2ld", "s2ld_nll_weight", "NLL weight", None),
    "s2ld_on_policy": ("s2ld", "s2ld_on_policy", "On-policy", None),
    "s2ld_samples": ("s2ld", "s2ld_samples", "Samples per prompt", None),
    "s2ld_max_new_tokens": ("s2ld", "s2ld_max_new_tokens", "Max new tokens", None),
    "s2ld_temperature": ("s2ld", "s2ld_temperature", "Temperature", None),
    "s2ld_sample_every": ("s2ld", "s2ld_sample_every", "Sample every (steps)", None),
    "s2ld_sequence_parallel": ("s2ld", "sequence_parallel_size", "Sequence parallel", None),
}
STAGE_LABELS = {
    "solopo": "SoLoPO settings (llamafactory-longpo)",
    "longpo": "LongPO settings (llamafactory-longpo)",
    "s2ld": "S2LD self-distillation settings (llamafactory-longpo)",
}


@dataclass(frozen=True)
class ControlSpec:
    """What a control shows: its argument's default (``None``, "off", is shown as 0), help and choices."""

    stage: str
    argument: str
    label: str
    default: Any
    info: str
    choices: Optional[tuple[Any, ...]]
    off_at_default: bool  # the argument's default means "off": written to the run only when changed


def control_specs() -> dict[str, ControlSpec]:
    from llamafactory.hparams.finetuning_args import FinetuningArguments

    plugin = {f.name for f in fields(ShortToLongFinetuningArguments)}
    specs = {}
    for name, (stage, argument, label, narrower) in CONTROLS.items():
        knob = knob_spec(ShortToLongFinetuningArguments if argument in plugin else FinetuningArguments, argument)
        shown, info = (0.0, knob.help + " 0 = off.") if knob.default is None else (knob.default, knob.help)
        specs[name] = ControlSpec(stage, argument, label, shown, info, narrower or knob.choices, knob.off_by_default)
    return specs


def _build_controls() -> dict[str, Any]:
    """The accordions and controls (created inside the train tab, before the toolkit's own rows)."""
    import gradio as gr

    elems: dict[str, Any] = {}
    specs = control_specs()
    for stage in PLUGIN_STAGES:
        with gr.Accordion(STAGE_LABELS[stage], open=True, visible=False, elem_id=f"s2l_{stage}_tab") as tab:
            with gr.Row():
                for name, spec in specs.items():
                    if spec.stage != stage:
                        continue
                    if isinstance(spec.default, bool):  # a switch
                        elems[name] = gr.Checkbox(value=spec.default, label=spec.label, info=spec.info, elem_id=f"s2l_{name}")
                    elif spec.choices:
                        elems[name] = gr.Dropdown(
                            choices=[c for c in spec.choices if c is not None],
                            value=spec.default,
                            label=spec.label,
                            info=spec.info,
                            elem_id=f"s2l_{name}",
                        )
                    else:
                        whole = isinstance(spec.default, int)  # a count: integers only
                        elems[name] = gr.Number(
                            value=spec.default,
                            label=spec.label,
                            info=spec.info,
                            elem_id=f"s2l_{name}",
                            precision=0 if whole else None,
                            scale=0 if whole else None,  # a wrapped last control keeps its width, not the row's
                            min_width=160,
                        )
        elems[f"{stage}_tab"] = tab
    return elems


def patch_train_tab(module: Any) -> None:
    """Wrap ``create_train_tab`` (and its dataset lister) in ``llamafactory.webui.components.train``."""
    if getattr(module, "_s2l_patched", False):
        return
    module._s2l_patched = True
    original_create, original_list = module.create_train_tab, module.list_datasets

    def list_datasets(dataset_dir: str = None, training_stage: str = None) -> Any:  # noqa: RUF013
        """The plugin stages list only short-to-long datasets."""
        import gradio as gr
        from llamafactory.extras.constants import TRAINING_STAGES
        from llamafactory.webui.common import DEFAULT_DATA_DIR, load_dataset_info

        stage = TRAINING_STAGES.get(training_stage)
        if stage not in PLUGIN_STAGES:
            return original_list(dataset_dir, training_stage) if training_stage else original_list(dataset_dir)
        info = load_dataset_info(dataset_dir if dataset_dir is not None else DEFAULT_DATA_DIR)
        return gr.Dropdown(choices=[k for k, v in info.items() if v.get("formatting") == "short_to_long"])

    def create_train_tab(engine: Any) -> dict[str, Any]:
        import gradio as gr
        from llamafactory.extras.constants import TRAINING_STAGES

        elems = _build_controls()
        controls = {elems[name] for name in CONTROLS}
        manager = engine.manager
        original_base = manager.get_base_elems
        manager.get_base_elems = lambda: original_base() | controls  # the tab's handlers take them as inputs
        try:
            elem_dict = original_create(engine)
        finally:
            del manager.get_base_elems
        elem_dict.update(elems)

        def show(training_stage: str) -> list[Any]:
            stage = TRAINING_STAGES.get(training_stage)
            return [gr.update(visible=stage == s) for s in PLUGIN_STAGES]

        tabs = [elems[f"{s}_tab"] for s in PLUGIN_STAGES]
        elem_dict["training_stage"].change(show, [elem_dict["training_stage"]], tabs, queue=False)
        return elem_dict

    module.list_datasets = list_datasets
    module.create_train_tab = create_train_tab


def add_train_args(runner: Any, data: dict[Any, Any], args: dict[str, Any]) -> None:
    """Arguments of a board run for a plugin stage, from its controls.

    Keys the user typed in the board's extra-arguments JSON box win over the controls.
    """
    manager = runner.manager

    def get(elem_id: str) -> Any:
        return data[manager.get_elem_by_id(elem_id)]

    try:
        typed = set(json.loads(get("train.extra_args") or "{}"))
    except (KeyError, ValueError):
        typed = set()
    stage = args["stage"]
    args["pref_ftx"] = args.get("pref_ftx", 0.0)
    for name, spec in control_specs().items():
        if spec.stage != stage or spec.argument in typed:
            continue
        try:
            value = get(f"train.{name}")
        except KeyError:  # the board was built without the plugin's controls
            continue
        if isinstance(spec.default, (int, float)) and value is not None:
            value = type(spec.default)(value)  # the board's number boxes may hand back either type
        if spec.off_at_default and value == spec.default:
            continue
        args[spec.argument] = value
    if stage == "longpo":
        args["pref_loss"] = "sigmoid"
