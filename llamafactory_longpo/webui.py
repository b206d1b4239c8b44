"""LlamaBoard (web UI): the plugin stages' own controls, their dataset filter, and their run arguments.

The board builds its train tab in one function whose event handlers capture the set of input
components when they are bound, so the plugin's controls are created first (they join that set
through ``Manager.get_base_elems``), shown in their own accordion at the top of the tab, and only
while their stage is selected. Their values reach the run through ``Runner._parse_train_args``, so
"preview command", the saved ``training_args.yaml`` and config save/load all carry them.
"""

from __future__ import annotations

import json
from typing import Any

from .hparams import PLUGIN_STAGES

# control name -> (stage, training argument, default); the argument of a "both stages" knob is shared
CONTROLS: dict[str, tuple[str, str, Any]] = {
    "solopo_pref_loss": ("solopo", "pref_loss", "orpo"),
    "solopo_beta": ("solopo", "pref_beta", 0.1),
    "solopo_gamma": ("solopo", "simpo_gamma", 0.5),
    "solopo_alpha": ("solopo", "solopo_alpha", 1.0),
    "solopo_distance": ("solopo", "solopo_distance", "abs"),
    "solopo_long_reference": ("solopo", "solopo_long_reference", "long"),
    "solopo_align": ("solopo", "solopo_align", "chosen"),
    "longpo_beta": ("longpo", "pref_beta", 0.1),
    "longpo_lambda": ("longpo", "longpo_lambda", 0.01),
    "longpo_nll_weight": ("longpo", "longpo_nll_weight", 1.0),
    "longpo_nll_scope": ("longpo", "longpo_nll_scope", "full"),
    "policy_rope_theta": ("longpo", "policy_rope_theta", 0.0),
    "solopo_sequence_parallel": ("solopo", "sequence_parallel_size", 1),
    "longpo_sequence_parallel": ("longpo", "sequence_parallel_size", 1),
}
# controls whose default means "off": written to the run only when changed, so plain runs' configs stay unchanged
OFF_AT_DEFAULT = {"policy_rope_theta", "solopo_sequence_parallel", "longpo_sequence_parallel"}
_SEQUENCE_PARALLEL_HELP = (
    "Sequence parallel",
    "GPUs per sequence (Ulysses); 1 = off.",
)
HELP = {
    "solopo_pref_loss": ("Base loss", "SoLo-DPO (sigmoid), SoLo-SimPO (simpo) or SoLo-ORPO (orpo) on the short pair."),
    "solopo_beta": ("Beta", "DPO/SimPO temperature, ORPO's lambda."),
    "solopo_gamma": ("Gamma", "SimPO target margin."),
    "solopo_alpha": ("Alpha", "Weight of the short-to-long reward alignment term."),
    "solopo_distance": ("Distance", "s() applied to the short-long reward gap."),
    "solopo_long_reference": (
        "Long reference",
        "SoLo-DPO: reference log-prob of the chosen answer on the long input, or reuse the short one.",
    ),
    "solopo_align": ("Alignment", "Align the chosen response only (paper) or both responses."),
    "longpo_beta": ("Beta", "DPO temperature of the preference term."),
    "longpo_lambda": ("Lambda", "Weight of the preference term."),
    "longpo_nll_weight": ("NLL weight", "Weight of the NLL term on the long chosen sequence."),
    "longpo_nll_scope": ("NLL scope", "Every token of the long chosen sequence (full) or its responses only."),
    "policy_rope_theta": ("Policy RoPE theta", "Raise the policy's rope_theta before training (LongPO: 1e7); 0 = unchanged."),
    "solopo_sequence_parallel": _SEQUENCE_PARALLEL_HELP,
    "longpo_sequence_parallel": _SEQUENCE_PARALLEL_HELP,
}
STAGE_LABELS = {"solopo": "SoLoPO settings (llamafactory-longpo)", "longpo": "LongPO settings (llamafactory-longpo)"}


def _build_controls() -> dict[str, Any]:
    """The accordions and controls (created inside the train tab, before the toolkit's own rows)."""
    import gradio as gr

    choices = {
        "solopo_pref_loss": ["sigmoid", "simpo", "orpo"],
        "solopo_distance": ["abs", "square", "smooth_l1"],
        "solopo_long_reference": ["long", "short"],
        "solopo_align": ["chosen", "both"],
        "longpo_nll_scope": ["full", "response"],
    }
    elems: dict[str, Any] = {}
    for stage in PLUGIN_STAGES:
        with gr.Accordion(STAGE_LABELS[stage], open=True, visible=False, elem_id=f"s2l_{stage}_tab") as tab:
            with gr.Row():
                for name, (owner, _, default) in CONTROLS.items():
                    if owner != stage:
                        continue
                    label, info = HELP[name]
                    if name in choices:
                        elems[name] = gr.Dropdown(
                            choices=choices[name], value=default, label=label, info=info, elem_id=f"s2l_{name}"
                        )
                    else:
                        whole = isinstance(default, int)  # a count: integers only
                        elems[name] = gr.Number(
                            value=default,
                            label=label,
                            info=info,
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
    for name, (owner, key, default) in CONTROLS.items():
        if owner != stage or key in typed:
            continue
        try:
            value = get(f"train.{name}")
        except KeyError:  # the board was built without the plugin's controls
            continue
        if isinstance(default, (int, float)) and value is not None:
            value = type(default)(value)  # the board's number boxes may hand back either type
        if name in OFF_AT_DEFAULT and value == default:
            continue
        args[key] = value
    if stage == "longpo":
        args["pref_loss"] = "sigmoid"
