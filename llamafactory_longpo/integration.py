"""Where the plugin meets LLaMA-Factory's internals: every seam is patched here or listed here.

Each ``patch_*`` function receives a toolkit module right after it has executed (see ``_bootstrap``)
and is idempotent. :func:`apply` patches every already-imported module, for callers that import the
toolkit before the bootstrap could run (or with the ``.pth`` disabled). A toolkit upgrade starts with
this list:

- ``extras.constants`` stage tables: the two stages join the board's lists (:func:`patch_constants`);
- the ``_*_ARGS`` lists of ``hparams.parser``: argument subclasses with the plugin's knobs (:func:`patch_parser`);
- ``data.parser.DatasetAttr.join``: short-to-long column renamings are kept (:func:`patch_dataset_attr`);
- ``data.loader`` ``_get_merged_dataset``, ``align_dataset``, ``_get_dataset_processor``,
  ``_get_preprocessed_dataset``, ``load_dataset``: short-to-long data validated, loaded, processed
  (:func:`patch_loader`);
- ``train.tuner._training_function`` and ``read_args``: the plugin's stages dispatched to
  :func:`.dispatch.run_plugin_stage`, a training YAML checked first (:func:`patch_tuner`);
- ``launcher.subprocess`` (its torchrun call): a plugin-stage run's keys checked before the workers start
  (:func:`patch_launcher`);
- ``webui.runner.Runner._parse_train_args``: the plugin's controls reach a board run (:func:`patch_runner`);
- ``webui.components.train`` ``create_train_tab`` and ``list_datasets``, ``webui.manager.Manager.get_base_elems``:
  the plugin's controls and dataset filter (:mod:`.webui`, installed by :func:`patch_webui_train`);
- ``train.callbacks.LogCallback._write_log``: the plugin's metrics in each log line (:mod:`.train.callbacks`);
- ``data.collator.MultiModalDataCollatorForSeq2Seq.__call__``: the long and reference rows padded as their own
  group (:mod:`.data.collator`);
- ``train.dpo.trainer.CustomDPOTrainer``: the plugin's trainer's base class (:mod:`.train.trainer`).
- read, not patched: ``chat.ChatModel.engine``'s ``model``, ``tokenizer`` and ``template`` (``encode_oneturn``,
  ``get_stop_token_ids``) for batched greedy answers on the huggingface backend (:meth:`.text.generate.Generator.greedy`);
- read, not patched, by the memory planner (:mod:`.planner`), which builds one training step as the toolkit does:
  ``hparams.parser._parse_train_args`` (the YAML parsed as training parses it), ``extras.misc.infer_optim_dtype``,
  ``model.model_utils.checkpointing.prepare_model_for_training``, ``model.adapter.init_adapter``, the trainers
  ``train.dpo.trainer.CustomDPOTrainer`` and ``train.sft.trainer.CustomSeq2SeqTrainer``, and
  ``extras.logging.get_logger`` (its info lines silenced during a trace).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from . import dispatch, keys
from .checks import check_run
from .data import loading
from .errors import ConfigError
from .hparams import PLUGIN_STAGES, ShortToLongDataArguments, ShortToLongFinetuningArguments

STAGE_LABELS = {"LongPO": "longpo", "SoLoPO": "solopo", "S2LD": "s2ld"}
_MARK = "_llamafactory_longpo_patched"


def _once(obj: Any, name: str) -> bool:
    """True the first time ``(obj, name)`` is seen; marks it."""
    key = f"{_MARK}_{name}"
    if getattr(obj, key, False):
        return False
    setattr(obj, key, True)
    return True


# --------------------------------------------------------------------------------- constants
def patch_constants(module: Any) -> None:
    """New stages in the web UI's stage list; they use pairwise (``ranking: true``) datasets."""
    for label, stage in STAGE_LABELS.items():
        module.TRAINING_STAGES.setdefault(label, stage)  # mutate in place: importers hold the same dict
        module.STAGES_USE_PAIR_DATA.add(stage)


# --------------------------------------------------------------------------------- arguments
_CLASSES: dict[str, type] = {}


def plugin_argument_classes() -> tuple[type, type]:
    """``FinetuningArguments`` / ``DataArguments`` subclasses carrying the plugin's knobs."""
    if _CLASSES:
        return _CLASSES["finetuning"], _CLASSES["data"]
    from llamafactory.hparams.data_args import DataArguments
    from llamafactory.hparams.finetuning_args import FinetuningArguments

    @dataclass
    class LongPOFinetuningArguments(FinetuningArguments, ShortToLongFinetuningArguments):
        stage: Literal["pt", "sft", "rm", "ppo", "dpo", "kto", "longpo", "solopo", "s2ld"] = field(
            default="sft",
            metadata={"help": "Which stage will be performed in training (longpo, solopo, s2ld: llamafactory-longpo)."},
        )

        def __post_init__(self) -> None:
            super().__post_init__()
            from .hparams import validate_choices

            validate_choices(self, {"stage"})
            if self.stage in PLUGIN_STAGES:
                self.validate_short_to_long(self.stage, self.pref_loss)
                from .data.plan import RowPlan

                plan = RowPlan.for_stage(self)
                self.use_ref_model = plan.reference_kind != "none"  # the plan's decision, told to the toolkit
            elif int(getattr(self, "sequence_parallel_size", 1) or 1) > 1:
                stages = ", ".join(PLUGIN_STAGES)
                raise ConfigError(f"sequence_parallel_size: stage {self.stage!r} has no sequence parallelism here; use {stages}")

    @dataclass
    class LongPODataArguments(DataArguments, ShortToLongDataArguments):
        def __post_init__(self) -> None:
            super().__post_init__()
            self.validate_short_to_long()

    # module-level names so pickling (datasets workers, deepcopy, ray) finds them
    for cls in (LongPOFinetuningArguments, LongPODataArguments):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        setattr(sys.modules[__name__], cls.__name__, cls)
    _CLASSES.update(finetuning=LongPOFinetuningArguments, data=LongPODataArguments)
    return LongPOFinetuningArguments, LongPODataArguments


def patch_parser(module: Any) -> None:
    """Swap the toolkit's argument classes for the subclasses in every parser list, by identity."""
    from llamafactory.hparams.data_args import DataArguments
    from llamafactory.hparams.finetuning_args import FinetuningArguments

    finetuning_cls, data_cls = plugin_argument_classes()
    swap = {FinetuningArguments: finetuning_cls, DataArguments: data_cls}
    for name in dir(module):
        lst = getattr(module, name)
        if name.startswith("_") and name.endswith("_ARGS") and isinstance(lst, list):
            lst[:] = [swap.get(c, c) for c in lst]


# --------------------------------------------------------------------------------- data
def patch_dataset_attr(module: Any) -> None:
    """Keep ``dataset_info.json`` column renamings of short-to-long fields (the toolkit drops unknown ones)."""
    cls = module.DatasetAttr
    if not _once(cls, "join"):
        return
    original = cls.join

    @functools.wraps(original)
    def join(self: Any, attr: dict[str, Any]) -> None:
        original(self, attr)
        loading.remember_columns(self, attr)

    cls.join = join


def patch_loader(module: Any) -> None:
    """Route ``"formatting": "short_to_long"`` datasets: validation, conversion, processor (:mod:`.data.loading`)."""
    if not _once(module, "loader"):
        return
    orig = loading.Originals(
        merged=module._get_merged_dataset,
        align=module.align_dataset,
        get_processor=module._get_dataset_processor,
        preprocessed=module._get_preprocessed_dataset,
        load_dataset=module.load_dataset,
        get_dataset_list=module.get_dataset_list,
    )
    wrapped = {
        "_get_merged_dataset": (loading.merged_dataset, orig.merged),
        "align_dataset": (loading.aligned, orig.align),
        "_get_dataset_processor": (loading.processor, orig.get_processor),
        "_get_preprocessed_dataset": (loading.preprocessed, orig.preprocessed),
        "load_dataset": (loading.load_files_checked, orig.load_dataset),
    }
    for name, (function, original) in wrapped.items():
        setattr(module, name, functools.update_wrapper(functools.partial(function, orig), original))


# --------------------------------------------------------------------------------- dispatch
def patch_tuner(module: Any) -> None:
    """Dispatch ``stage: longpo|solopo`` to the plugin; every other stage runs the toolkit's code. A training YAML
    with a mistake (any stage: it is found before the stage is known) stops in one line."""
    if not _once(module, "tuner"):
        return
    original = module._training_function
    original_read_args = module.read_args

    @functools.wraps(original)
    def _training_function(config: dict[str, Any]) -> None:
        from .train.callbacks import diagnostic_callbacks  # opt-in, by environment variable, any stage

        config["callbacks"] = list(config.get("callbacks") or []) + diagnostic_callbacks()
        plugin_stage = dispatch.peek_stage(config.get("args")) in PLUGIN_STAGES
        with dispatch.one_line_errors(plugin_stage):
            if plugin_stage:
                if isinstance(config.get("args"), dict):  # a YAML's keys (command-line arguments are parsed later)
                    config["args"] = check_run(config["args"], loading.data_warning)
                dispatch.run_plugin_stage(module, config)
            else:
                original(config)

    @functools.wraps(original_read_args)
    def read_args(args: Any = None) -> Any:
        with dispatch.one_line_errors(False):
            dispatch.check_train_yaml(args)
        return original_read_args(args)

    module._training_function = _training_function
    module.read_args = read_args


# --------------------------------------------------------------------------------- distributed launch
def preflight(raw: dict[str, Any]) -> None:
    """The checks a plugin-stage run would fail on in every worker, run once in the launching process.

    ``llamafactory-cli train`` on several GPUs (or with ``FORCE_TORCHRUN=1``) starts torchrun, whose workers each
    parse the arguments: a bad key then printed its line once per worker, then torchrun's failure report and the
    launcher's ``CalledProcessError`` traceback. Here the keys are checked first: unknown keys, then every argument
    class but ``TrainingArguments`` (whose set-up initialises DeepSpeed and the process group, so it can only be
    parsed in a worker) with their own checks, then the attention kernel.
    """
    from llamafactory.hparams import ModelArguments
    from transformers import HfArgumentParser, TrainingArguments

    known = set(keys.known_keys())
    unknown = [key for key in raw if key not in known]
    if unknown:
        raise ConfigError(keys.unknown_keys_line(unknown))
    classes = [c for c in keys.train_arg_classes() if not issubclass(c, TrainingArguments)]
    parsed = HfArgumentParser(classes).parse_dict(raw, allow_extra_keys=True)
    finetuning_cls, _ = plugin_argument_classes()
    finetuning = next(p for p in parsed if isinstance(p, finetuning_cls))
    model_args = next(p for p in parsed if isinstance(p, ModelArguments))
    dispatch.check_kernels(model_args.flash_attn, bool(raw.get("bf16") or raw.get("fp16")), finetuning)


class _CheckedSubprocess:
    """Stands in for the ``subprocess`` module inside ``llamafactory.launcher``, whose only use of it is to run
    torchrun: :func:`preflight` first, and a failed plugin-stage run ends with the workers' exit status instead of
    the launcher's ``CalledProcessError`` traceback (the workers have printed the cause)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        from llamafactory.hparams import read_args

        with dispatch.one_line_errors(False):
            dispatch.check_train_yaml()  # the launcher has taken "train" off sys.argv: the config and its overrides remain
        raw = read_args()
        plugin_stage = dispatch.peek_stage(raw) in PLUGIN_STAGES
        with dispatch.one_line_errors(plugin_stage):
            if plugin_stage and isinstance(raw, dict):  # command-line arguments (no YAML) are checked by the workers
                preflight(check_run(raw))
            try:
                return self._real.run(*args, **kwargs)
            except self._real.CalledProcessError as err:
                if not plugin_stage:
                    raise
                raise SystemExit(err.returncode) from None


def patch_launcher(module: Any) -> None:
    """Distributed ``llamafactory-cli train`` of a plugin stage: keys checked before torchrun starts."""
    if _once(module, "launcher"):
        module.subprocess = _CheckedSubprocess(module.subprocess)


# --------------------------------------------------------------------------------- web UI
def patch_runner(module: Any) -> None:
    """LlamaBoard runs: the new stages receive the preference knobs like ``dpo`` does."""
    cls = module.Runner
    if not _once(cls, "runner"):
        return
    original = cls._parse_train_args

    @functools.wraps(original)
    def _parse_train_args(self: Any, data: dict[Any, Any]) -> dict[str, Any]:
        args = original(self, data)
        if args.get("stage") in PLUGIN_STAGES:
            from . import webui

            webui.add_train_args(self, data, args)
        return args

    cls._parse_train_args = _parse_train_args


def patch_webui_train(module: Any) -> None:
    """LlamaBoard's train tab: the plugin's own controls and dataset filter (see :mod:`.webui`)."""
    from . import webui

    webui.patch_train_tab(module)


def apply() -> None:
    """Patch every watched toolkit module that is already imported (idempotent)."""
    from ._bootstrap import WATCHED

    for name, patcher in WATCHED.items():
        module = sys.modules.get(name)
        if module is not None:
            globals()[patcher](module)
