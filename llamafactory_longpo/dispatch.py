"""A plugin-stage run as the toolkit's dispatch hands it over: its checks, callbacks, output-folder lock and
one-line errors. The seams through which it is reached are patched in :mod:`.integration`."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from .errors import TRACEBACK_ENV, ConfigError, Interrupted, ShortToLongError, TrainingError, one_line
from .keys import admits_bool, unknown_keys_line


def peek_stage(args: Any) -> Any:
    """The ``stage`` of raw training args (a YAML/JSON dict or CLI list) without parsing them."""
    from llamafactory.hparams import read_args

    raw = read_args(args)
    if isinstance(raw, dict):
        return raw.get("stage")
    for i, item in enumerate(raw):
        if item == "--stage" and i + 1 < len(raw):
            return raw[i + 1]
        if item.startswith("--stage="):
            return item.split("=", 1)[1]
    return None


@contextlib.contextmanager
def lock_output_dir(output_dir: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``output_dir`` for the run; a second run into it fails in one line.

    Two runs into one folder both "succeed" and interleave their logs and checkpoints. The lock is the
    folder's own file descriptor, so the kernel drops it when the process dies: a crash leaves nothing
    behind. Only global rank 0 takes it (the other ranks of a run write through rank 0). A folder this
    run created and left empty (it failed before writing) is removed again.
    """
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    import fcntl

    created = not os.path.exists(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    fd = os.open(output_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(
                f"output_dir {output_dir}: another run is writing to it; wait for it to end or choose another output_dir"
            ) from None
        except OSError:  # a file system without flock (some network mounts): run unlocked
            pass
        ok = False
        try:
            yield
            ok = True
        finally:
            if created and not ok and not os.listdir(output_dir):
                os.rmdir(output_dir)
    finally:
        os.close(fd)


def check_kernels(flash_attn: Any, half_precision: bool, finetuning_args: Any, spec: Any = None) -> None:
    """The attention-kernel checks of a plugin-stage run (:func:`.attention_kernels.check_attention_kernels`), on its spec
    (``spec``: the run's :class:`.train.spec.RunSpec`, when the caller has made it)."""
    from .attention_kernels import check_attention_kernels
    from .train.spec import RunSpec

    spec = spec or RunSpec.from_args(finetuning_args)
    check_attention_kernels(
        stage=spec.stage,
        flash_attn=str(flash_attn),
        half_precision=half_precision or bool(finetuning_args.pure_bf16),
        sequence_parallel_size=spec.sequence_parallel_size,
        shared_prefix=spec.shared_prefix,
    )


def run_plugin_stage(tuner: Any, config: dict[str, Any]) -> None:
    """The toolkit's ``_training_function`` for a plugin stage: same callbacks, the plugin's workflow.

    Why the callback set-up is repeated here instead of calling the toolkit's function: that function parses
    the arguments, builds the callbacks and dispatches on the stage in one body, through a closed
    ``if/elif`` chain that ends in ``raise ValueError("Unknown task")``; no hook runs between the callbacks and
    the dispatch, so a plugin stage could only pass through it disguised as one of the toolkit's stages.
    The repeated part is the list of callbacks, with the toolkit's own classes taken from its module.
    """
    from llamafactory.extras import logging

    from .train.callbacks import (
        NonFiniteGuardCallback,
        ShortToLongLogCallback,
        TerminateNoteCallback,
        checkpoint_note,
        last_checkpoint,
    )
    from .train.compat import shutdown_distributed
    from .train.offload import settle_checkpointing
    from .train.spec import RunSpec
    from .train.workflow import run_short_to_long

    callbacks: list[Any] = config.get("callbacks")
    model_args, data_args, training_args, finetuning_args, generating_args = tuner.get_train_args(config.get("args"))
    for note in settle_checkpointing(model_args, finetuning_args):
        logging.get_logger("llamafactory.longpo.dispatch").warning_rank0(note)
    spec = RunSpec.for_run(finetuning_args, training_args)  # made once: the checks and the workflow read it
    check_kernels(model_args.flash_attn, bool(training_args.bf16 or training_args.fp16), finetuning_args, spec)
    if spec.on_policy and spec.zero_stage == 3:
        raise ConfigError(
            "s2ld_on_policy: true does not run under DeepSpeed ZeRO-3 here; use ZeRO-2 or DDP, or s2ld_on_policy: false"
        )

    callbacks.append(NonFiniteGuardCallback())  # first: a NaN step stops before any other callback saves or logs it
    callbacks.append(ShortToLongLogCallback())  # the toolkit's LogCallback + the plugin's metrics
    callbacks.append(TerminateNoteCallback())
    if finetuning_args.pissa_convert:
        callbacks.append(tuner.PissaConvertCallback())
    if finetuning_args.use_swanlab:
        callbacks.append(tuner.get_swanlab_callback(finetuning_args))
    if finetuning_args.early_stopping_steps is not None:
        callbacks.append(tuner.EarlyStoppingCallback(early_stopping_patience=finetuning_args.early_stopping_steps))
    if getattr(training_args, "enable_torch_profiler", False) and hasattr(tuner, "TorchProfilerCallback"):
        callbacks.append(tuner.TorchProfilerCallback(training_args))
    if getattr(training_args, "profile_modules", None) and hasattr(tuner, "ModuleProfilerCallback"):
        callbacks.append(tuner.ModuleProfilerCallback(training_args.profile_modules))
    callbacks.append(tuner.ReporterCallback(model_args, data_args, finetuning_args, generating_args))

    with lock_output_dir(training_args.output_dir):
        try:
            if training_args.do_train and finetuning_args.s2l_estimate_at_start:
                _log_start_estimate(model_args, data_args, training_args, finetuning_args)
            run_short_to_long(model_args, data_args, training_args, finetuning_args, callbacks, spec)
        except KeyboardInterrupt:
            last = last_checkpoint(training_args.output_dir)
            resume = " (resume_from_checkpoint continues from it)" if last else ""
            raise Interrupted(f"interrupted; {checkpoint_note(training_args.output_dir, last)}{resume}") from None

    if tuner.is_ray_available():
        import ray

        if ray.is_initialized():
            return
    try:
        shutdown_distributed()  # a no-op for the process groups when not distributed
    except Exception as err:  # same tolerance as the toolkit
        print(f"[llamafactory-longpo] failed to destroy process group: {err}", file=sys.stderr)


def _log_start_estimate(model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any) -> None:
    """The planner's one line at the start of training, before anything is built: the trace must meet this
    process's attention registry as the toolkit left it (the run's wiring replaces entries in place)."""
    from llamafactory.extras import logging

    from .planner import train_start_line

    line = train_start_line(model_args, data_args, training_args, finetuning_args)
    logging.get_logger("llamafactory.longpo.planner").info_rank0(line)


def check_train_yaml(args: Any = None) -> None:
    """The YAML file of ``llamafactory-cli train x.yaml key=value`` (``args`` None: read from ``sys.argv`` as the
    toolkit's ``read_args`` does), checked before OmegaConf reads it: a missing file, a syntax error, a top-level
    list and a key written twice are one :class:`ConfigError` naming the file and line instead of a traceback, and
    a YAML 1.1 boolean word given to a key that takes no boolean (``save_strategy: no``) is refused with its quoting.
    """
    from . import yamlio

    if args is not None or len(sys.argv) < 2 or not sys.argv[1].endswith((".yaml", ".yml")):
        return
    yamlio.read_mapping(sys.argv[1], admits_bool)
    yamlio.check_override_bool_words(sys.argv[2:], admits_bool)


@contextlib.contextmanager
def one_line_errors(plugin_stage: bool) -> Iterator[None]:
    """Bad input stops with one clear line and exit status 1, no traceback: the plugin's own errors in any stage,
    and the toolkit's errors inside a plugin stage (``LLAMAFACTORY_LONGPO_TRACEBACK=1`` shows the traceback)."""
    try:
        yield
    except ShortToLongError as err:
        print(f"[llamafactory-longpo] error: {err}", file=sys.stderr)
        raise SystemExit(getattr(err, "exit_code", 1)) from None
    except Exception as err:
        if not plugin_stage or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        text = describe_error(err)
        hint = "" if text.startswith("unknown key") else f" (set {TRACEBACK_ENV}=1 for the traceback)"  # a typo, not a bug
        print(f"[llamafactory-longpo] error: {text}{hint}", file=sys.stderr)
        raise SystemExit(1) from None


def describe_error(err: BaseException) -> str:
    """One line for a toolkit error (see :func:`errors.one_line`), with the nearest known key for a typo'd one."""
    unused = re.match(r"Some keys are not used by the HfArgumentParser: \[(.*)\]", str(err))
    if unused:
        return unknown_keys_line(re.findall(r"'([^']+)'", unused.group(1)))
    return one_line(err)
