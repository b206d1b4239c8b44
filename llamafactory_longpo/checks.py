"""Checks made before a command writes or loads anything, each failing as one :class:`ConfigError` line.

A run that fails after it started has often changed something already (an output folder's log, an evaluation's
results file), and under torchrun a failure in the workers is printed once per rank. What can be known from the
files alone is therefore checked here first: by the launching process before torchrun starts, by each worker
again (silently when it passes), and by the helper commands before they load a model.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from typing import Any, Optional

from .errors import ConfigError

# any one of these holds a tokenizer's vocabulary (fast tokenizers, sentencepiece, GPT-2 BPE, WordPiece, tiktoken)
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)


GIB = 1 << 30


def size(nbytes: float) -> str:
    """``12.3 GiB``, or ``45.6 MiB`` under a GiB."""
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / (1 << 20):.1f} MiB"


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the disk that holds ``path`` (or its nearest existing folder)."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def write_failure(err: BaseException, path: str) -> str:
    """Why a write under ``path`` failed, in words a user can act on.

    A full disk reaches Python in three dialects: ``OSError`` (``[Errno 28] No space left on device``), safetensors'
    ``I/O error: No space left on device (os error 28)``, and torch.save's C++ writer, which drops the reason
    (``[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534``). The system's reason is taken from
    the first two; every line then adds the two limits a user can change: the free space on the disk, and the
    largest file this process may write (``ulimit -f``, which schedulers set) when there is one.
    """
    import resource

    found = re.search(r"\[Errno (\d+)\]|\(os error (\d+)\)", str(err))
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    elif found:
        reason = os.strerror(int(found.group(1) or found.group(2)))
    else:
        from .errors import one_line

        reason = one_line(err)
    limits = f"{size(free_bytes(path))} free on its disk"
    most = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if most != resource.RLIM_INFINITY:
        limits += f", files limited to {size(most)} (ulimit -f)"
    return f"{reason}; {limits}"


def _looks_local(name: str) -> bool:
    """A path, not a hub id (``org/name``): hub ids have exactly one slash and no leading ``.``, ``/`` or ``~``."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep != "/" and os.sep in name


def check_model_folder(name: str, key: str = "model_name_or_path", tokenizer: bool = True) -> None:
    """A local model folder must exist and hold a ``config.json`` and, when ``tokenizer``, a tokenizer's files.

    Hub exports often carry only the weights and ``config.json``; transformers then builds an empty tokenizer,
    and training and evaluation run on empty text without an error. A hub id is left to the toolkit's download.
    """
    path = os.path.expanduser(name)
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise ConfigError(f"{key}: {name} is a file, not a model folder")
        if _looks_local(name):
            raise ConfigError(f"{key}: {name} does not exist")
        return
    files = set(os.listdir(path))
    missing = [] if "config.json" in files else ["config.json"]
    if tokenizer and not files.intersection(TOKENIZER_FILES) and not any(f.endswith(".tiktoken") for f in files):
        missing.append(f"a tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    if missing:
        held = ", ".join(sorted(files)[:6]) + (", ..." if len(files) > 6 else "") if files else "nothing"
        raise ConfigError(
            f"{key}: {name} lacks {' and '.join(missing)}; it holds {held}; copy the missing files from the model "
            "it was exported from"
        )


def _safetensors_readable(path: str) -> bool:
    """Whether ``path`` starts with a safetensors header: 8 bytes of length, then that much JSON."""
    import json

    try:
        with open(path, "rb") as fh:
            header = int.from_bytes(fh.read(8), "little")
            if not 2 <= header <= os.path.getsize(path) - 8:
                return False
            return isinstance(json.loads(fh.read(header)), dict)
    except (OSError, ValueError):
        return False


SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


def checkpoint_problem(folder: str, model: Any = None) -> str:
    """Why ``folder`` cannot be resumed from ("" when it can): the Trainer writes ``trainer_state.json`` last, so a
    save cut short (a full disk, a kill) lacks it; weights must read as safetensors, and be of ``model``'s shape."""
    import json

    if not os.path.isdir(folder):
        return "does not exist" if not os.path.exists(folder) else "is a file, not a checkpoint folder"
    files = set(os.listdir(folder))
    if "trainer_state.json" not in files:
        return "is incomplete (no trainer_state.json: its save was cut short)"
    for name in sorted(f for f in files if f.endswith(".safetensors")):
        if not _safetensors_readable(os.path.join(folder, name)):
            return f"is damaged ({name} is not a safetensors file)"
    if isinstance(model, str) and "config.json" in files and os.path.isfile(os.path.join(model, "config.json")):
        try:
            with (
                open(os.path.join(folder, "config.json"), encoding="utf-8") as a,
                open(os.path.join(model, "config.json"), encoding="utf-8") as b,
            ):
                ours, theirs = json.load(a), json.load(b)
        except ValueError:
            return "is damaged (its config.json is not JSON)"
        for key in SHAPE_KEYS:
            if key in ours and key in theirs and ours[key] != theirs[key]:
                return f"holds a model of another shape ({key} {ours[key]}, the model's {theirs[key]})"
    return ""


def _checkpoints(output_dir: str) -> list[str]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest (highest N) first, as transformers finds them."""
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)]


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def check_checkpoint_space(raw: dict[str, Any]) -> None:
    """Refuse a run whose ``output_dir`` lies on a disk with less free space than one checkpoint needs.

    A full disk is otherwise found at the first save, after the reference pass and the first ``save_steps``
    steps. The need is a lower bound: the model folder's weight files (a full or freeze checkpoint holds the whole
    model; an adapter's holds a small part of it: not checked), plus, for full fine-tuning with a full-precision
    AdamW, its two moments per weight (Kingma and Ba, arXiv 1412.6980) at the weights' own size; the toolkit keeps
    trainable weights in fp32, so a bf16 model's checkpoint is larger still.
    """
    model, output_dir = raw.get("model_name_or_path"), raw.get("output_dir")
    finetuning = raw.get("finetuning_type", "lora")  # the toolkit's default
    if not (raw.get("do_train") and isinstance(output_dir, str) and isinstance(model, str) and os.path.isdir(model)):
        return
    if finetuning not in ("full", "freeze"):
        return
    weights = sum(os.path.getsize(os.path.join(model, name)) for name in os.listdir(model) if name.endswith(WEIGHT_SUFFIXES))
    optim = str(raw.get("optim", "adamw_torch_fused"))  # transformers' default
    adam = finetuning == "full" and optim.startswith("adamw") and "bit" not in optim and not raw.get("save_only_model")
    saving = str(raw.get("save_strategy", "steps")) != "no"  # without checkpoints, the final model still is saved
    need = weights * (3 if adam and saving else 1)
    free = free_bytes(output_dir)
    if free < need:
        parts = f"the weights {size(weights)}" + (f" and AdamW's two moments {size(2 * weights)}" if need > weights else "")
        raise ConfigError(
            f"output_dir: {output_dir} is on a disk with {size(free)} free, and one checkpoint of this run needs at "
            f"least {size(need)} ({parts}); free space, or choose an output_dir on another disk"
        )


def check_run(raw: dict[str, Any], warn: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """The file checks of a ``longpo``/``solopo`` training run's arguments, made before anything is loaded or
    written: the model folder, the checkpoint it resumes from, and the free space for one checkpoint. ``warn``
    (``None`` in the launcher, whose workers warn) hears about skipped checkpoints; the arguments come back with
    the checkpoint to resume from.
    """
    model = raw.get("model_name_or_path")
    if isinstance(model, str):
        check_model_folder(model)
    raw = _resume_target(raw, warn)
    check_checkpoint_space(raw)
    return raw


RUN_RECORD = "llamafactory_longpo_run.json"  # in each checkpoint of a plugin stage: run_identity of its run


def run_identity(stage: Any, pref_loss: Any, dataset: Any) -> dict[str, str]:
    """What a resumed run must share with the run that wrote its checkpoint: the stage, ``pref_loss`` and the
    dataset names (the toolkit's comma-separated string or its list, as one comma-separated string)."""
    names = dataset.split(",") if isinstance(dataset, str) else list(dataset or [])
    return {"stage": str(stage), "pref_loss": str(pref_loss), "dataset": ",".join(str(n).strip() for n in names)}


def check_same_run(checkpoint: str, raw: dict[str, Any], key: str, instead: str) -> None:
    """Refuse to resume from ``checkpoint`` when it was written by a run of another stage, loss or dataset, unless
    ``s2l_resume_other_run: true``.

    Refused rather than warned about: resuming restores the optimizer's moments (of the other loss), the learning
    rate schedule's position and the number of batches to skip (counted in the other dataset), so the run is
    neither a continuation nor a fresh start from those weights (which is ``model_name_or_path: <checkpoint>``),
    and a warning scrolls away among a run's log lines. Datasets are compared by name; a checkpoint without the
    record (a stock stage's, or one saved before the record existed) is not compared.
    """
    import json

    try:
        with open(os.path.join(checkpoint, RUN_RECORD), encoding="utf-8") as fh:
            theirs = json.load(fh)
    except (OSError, ValueError):
        return
    if not isinstance(theirs, dict):
        return
    ours = run_identity(raw.get("stage"), raw.get("pref_loss", "sigmoid"), raw.get("dataset"))  # the toolkit's default
    differs = [f"{k} {theirs[k]} (this run: {v})" for k, v in ours.items() if theirs.get(k, v) != v]
    if differs and raw.get("s2l_resume_other_run") is not True:
        raise ConfigError(
            f"{key} {checkpoint} was written by a run with {', '.join(differs)}; resuming would carry its optimizer "
            f"state, schedule and data position into this run: set s2l_resume_other_run: true to resume anyway, {instead}"
        )


def _resume_target(raw: dict[str, Any], warn: Optional[Callable[[str], None]]) -> dict[str, Any]:
    """``raw`` with the checkpoint it resumes from: a ``resume_from_checkpoint`` that can be resumed from, or under
    auto-resume the newest checkpoint of ``output_dir`` that can (``warn`` hears about the ones skipped)."""
    model = raw.get("model_name_or_path")
    resume = raw.get("resume_from_checkpoint")
    if isinstance(resume, str):
        problem = checkpoint_problem(resume, model)
        if problem:
            raise ConfigError(f"resume_from_checkpoint: {resume} {problem}")
        check_same_run(resume, raw, "resume_from_checkpoint:", f"or model_name_or_path: {resume} to start from its weights")
        return raw
    output_dir = raw.get("output_dir")
    if resume is not None or not raw.get("do_train") or raw.get("overwrite_output_dir") or not isinstance(output_dir, str):
        return raw
    checkpoints = _checkpoints(output_dir) if os.path.isdir(output_dir) else []
    newest_problem = ""  # why the newest cannot be resumed from, once found
    for checkpoint in checkpoints:  # the toolkit resumes from the newest: the newest that can be resumed from
        problem = checkpoint_problem(checkpoint, model)
        if not problem:
            if newest_problem and warn is not None:
                warn(f"{checkpoints[0]} {newest_problem}; resuming from {checkpoint}")
            check_same_run(checkpoint, raw, "output_dir: its checkpoint", "or overwrite_output_dir: true to start over")
            return {**raw, "resume_from_checkpoint": checkpoint}
        newest_problem = newest_problem or problem
    if checkpoints:
        raise ConfigError(
            f"output_dir: its newest checkpoint {checkpoints[0]} {newest_problem}, and no "
            "other can be resumed from; remove it, or set overwrite_output_dir: true to start over"
        )
    return raw
