"""The toolkit's dataset loader, taught ``"formatting": "short_to_long"`` (listed in :mod:`..integration`).

``llamafactory.data.loader`` loads a dataset in four steps, each a module function the plugin wraps here:

1. ``_get_merged_dataset`` (:func:`merged_dataset`): the short-to-long entries are checked (ranking, no mixing
   with other formats, a stage that can read them) and their files VALIDATED, every record, with the file and
   line of the first bad one, before the toolkit loads anything;
2. ``load_dataset`` (:func:`load_files_checked`): a validated file is read by :func:`.converter.load_files`,
   which keeps only the fields the plugin reads (so an odd extra field cannot break the Arrow schema);
3. ``align_dataset`` (:func:`aligned`): records become rows for the run's plan (:func:`.converter.align_short_to_long`);
4. ``_get_dataset_processor`` / ``_get_preprocessed_dataset`` (:func:`processor`, :func:`preprocessed`): the
   plugin's tokenizer processor, and one line when every sample is over its cutoff.

Why a record is parsed twice, in steps 1 and 3: step 1 runs in the launching process over the raw files, so a bad
record is reported with its file and line before any tokenization (``datasets.map`` errors name neither), and
an empty or odd dataset is warned about once; step 3 runs inside ``datasets.map`` (worker processes, Arrow rows,
datasets from a hub that step 1 never saw), where a parsed record cannot be handed over, so it parses again.

Column renamings of ``dataset_info.json`` for the short-to-long fields are dropped by the toolkit's
``DatasetAttr.join``; :func:`remember_columns` keeps them in this module's own table (:data:`COLUMNS`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..hparams import PLUGIN_STAGES
from . import converter
from .plan import TOOLKIT_TARGETS, RowPlan

# (load_from, dataset_name) of a dataset_info.json entry -> its short-to-long column renamings
COLUMNS: dict[tuple[str, str], dict[str, str]] = {}
# validated short_to_long file (absolute path) -> its column renamings, read by load_files_checked
VALIDATED: dict[str, dict[str, str]] = {}


def columns_of(dataset_attr: Any) -> dict[str, str]:
    """The short-to-long column renamings of a ``DatasetAttr`` (empty: the fields' own names)."""
    return COLUMNS.get((dataset_attr.load_from, dataset_attr.dataset_name), {})


def remember_columns(dataset_attr: Any, attr: dict[str, Any]) -> None:
    """After ``DatasetAttr.join(attr)``: keep the entry's renamings of short-to-long fields."""
    COLUMNS[(dataset_attr.load_from, dataset_attr.dataset_name)] = converter.column_map(attr.get("columns"))


@dataclass(frozen=True)
class Originals:
    """The toolkit's own loader functions, as they were before the plugin wrapped them."""

    merged: Callable[..., Any]
    align: Callable[..., Any]
    get_processor: Callable[..., Any]
    preprocessed: Callable[..., Any]
    load_dataset: Callable[..., Any]
    get_dataset_list: Callable[..., Any]


def data_warning(message: str) -> None:
    """One warning line of the data checks, through the toolkit's logger (rank 0 only)."""
    from llamafactory.extras import logging

    logging.get_logger("llamafactory.longpo.data").warning_rank0(message)


def _plugin_plan(data_args: Any) -> Any:
    """The run's row plan when the run is a plugin stage (set by its workflow), else ``None``."""
    plan = data_args.s2l_plan
    return plan if plan is not None and plan.target in PLUGIN_STAGES else None


def _check_entries(attrs: list[Any], names: dict[int, str], plan: Any, stage: str) -> list[Any]:
    """The short-to-long entries among ``attrs``, after the checks of how they may be combined and used."""
    s2l = [a for a in attrs if a.formatting == converter.FORMATTING]
    if plan is not None:
        for a in attrs:
            if a.formatting != converter.FORMATTING:
                raise ConfigError(
                    f'dataset {names[id(a)]}: stage {plan.target} needs "formatting": "short_to_long" in '
                    f"dataset_info.json, got {a.formatting!r}"
                )
    if s2l and len(s2l) != len(attrs):
        other = next(a for a in attrs if a.formatting != converter.FORMATTING)
        raise ConfigError(f"dataset {names[id(other)]}: cannot be mixed with short_to_long datasets")
    if s2l and plan is None and stage not in TOOLKIT_TARGETS:
        raise ConfigError(
            f"dataset {names[id(s2l[0])]}: short_to_long records cannot feed stage {stage!r}; "
            "use stage solopo, longpo, dpo, rm or sft"
        )
    return s2l


def _validate_entries(attrs: list[Any], names: dict[int, str], dataset_dir: str) -> None:
    """Each entry in turn: its ``ranking``, then every record of its local files, before the toolkit loads them
    (see the module docstring)."""
    for a in attrs:
        if not a.ranking:
            raise ConfigError(f'dataset {names[id(a)]}: a short_to_long entry in dataset_info.json needs "ranking": true')
        if a.load_from != "file":
            continue
        files = converter.dataset_files(dataset_dir, a.dataset_name)
        if not files:
            raise ConfigError(f"dataset {names[id(a)]}: file {a.dataset_name!r} not found in {dataset_dir}")
        columns = columns_of(a)
        converter.validate_files(files, columns, warn=data_warning)
        VALIDATED.update({os.path.abspath(f): columns for f in files})


def merged_dataset(
    orig: Originals,
    dataset_names: Any,
    model_args: Any,
    data_args: Any,
    training_args: Any,
    stage: str,
    return_dict: bool = False,
) -> Any:
    """``_get_merged_dataset``: short-to-long entries checked and validated, then loaded as the toolkit's ``rm``
    stage (whose ranking check they pass); other datasets untouched."""
    if dataset_names is None:
        return orig.merged(dataset_names, model_args, data_args, training_args, stage, return_dict)
    attrs = orig.get_dataset_list(dataset_names, data_args.dataset_dir)
    names = {id(a): f"'{n}' ({a})" if str(a) != n else f"'{n}'" for n, a in zip(dataset_names, attrs)}
    plan = _plugin_plan(data_args)
    s2l = _check_entries(attrs, names, plan, stage)
    if not s2l:
        return orig.merged(dataset_names, model_args, data_args, training_args, stage, return_dict)
    if plan is None:
        data_args.s2l_plan = RowPlan.for_toolkit(stage)  # the toolkit's stages: their own view of the records
    _validate_entries(s2l, names, data_args.dataset_dir)
    return orig.merged(dataset_names, model_args, data_args, training_args, "rm", return_dict)


def aligned(orig: Originals, dataset: Any, dataset_attr: Any, data_args: Any, training_args: Any) -> Any:
    """``align_dataset``: short-to-long records become the plan's rows."""
    if dataset_attr.formatting != converter.FORMATTING:
        return orig.align(dataset, dataset_attr, data_args, training_args)
    return converter.align_short_to_long(
        dataset, columns_of(dataset_attr), data_args, training_args, data_args.s2l_plan.target, source=str(dataset_attr)
    )


def processor(
    orig: Originals, data_args: Any, stage: str, template: Any, tokenizer: Any, processor: Any, do_generate: bool = False
) -> Any:
    """``_get_dataset_processor``: the plugin's processor for its stages."""
    if _plugin_plan(data_args) is None:
        return orig.get_processor(data_args, stage, template, tokenizer, processor, do_generate)
    from .processor import ShortToLongDatasetProcessor

    return ShortToLongDatasetProcessor(template=template, tokenizer=tokenizer, processor=processor, data_args=data_args)


def preprocessed(orig: Originals, dataset: Any, data_args: Any, training_args: Any, *args: Any, **kwargs: Any) -> Any:
    """``_get_preprocessed_dataset``: a plugin stage whose every sample is over its cutoff stops in one line.

    The toolkit notices an empty result only while printing its first example (``next(iter(dataset))`` raises
    ``StopIteration``, which it turns into a ``RuntimeError``), and only on ranks that print; the other ranks
    get an empty dataset back."""
    if _plugin_plan(data_args) is None or dataset is None:
        return orig.preprocessed(dataset, data_args, training_args, *args, **kwargs)
    from .processor import overlong_hint

    split = "eval" if kwargs.get("is_eval") else "training"
    nothing_left = ConfigError(
        f"every {split} sample is longer than its cutoff, nothing is left to train on ({overlong_hint(data_args)})"
    )
    try:
        out = orig.preprocessed(dataset, data_args, training_args, *args, **kwargs)
    except RuntimeError as err:
        if isinstance(err.__context__, StopIteration):  # raised while handling the empty dataset's StopIteration
            raise nothing_left from None
        raise
    if hasattr(out, "__len__") and len(out) == 0:
        raise nothing_left
    return out


def load_files_checked(orig: Originals, *args: Any, **kwargs: Any) -> Any:
    """``load_dataset``: files validated in :func:`merged_dataset` are read by the plugin's own loader."""
    files = kwargs.get("data_files") or []
    if files and all(os.path.abspath(f) in VALIDATED for f in files):
        return converter.load_files(files, VALIDATED[os.path.abspath(files[0])], kwargs.get("cache_dir"))
    return orig.load_dataset(*args, **kwargs)
