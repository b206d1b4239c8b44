"""Callbacks of the plugin stages: metrics in ``trainer_log.jsonl``, and opt-in diagnostics.

``LLAMAFACTORY_LONGPO_STEP_TIME_FILE=path`` appends each optimizer step's wall time (JSON lines), for
benchmarks of any stage, the toolkit's own included.

``LLAMAFACTORY_LONGPO_PEAK_MEMORY_FILE=path``: each rank writes its peak RSS (and peak CUDA memory) at the
end of training to ``path.rank<R>``, for per-rank memory under data or sequence parallelism.

``LLAMAFACTORY_LONGPO_GRAD_NORM_FILE=path`` makes every rank append its own gradient norm (and each
tensor's gradient norm and sum), measured
after the gradient all-reduce and before the optimizer step, to ``path.rank<R>`` (JSON lines). With
data parallelism the ranks must agree; a mismatch means gradients silently went out of sync (the
reentrant-checkpointing failure: two forwards per step desync DDP's gradient reduction).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

import torch
from llamafactory.extras import logging
from llamafactory.train.callbacks import LogCallback
from transformers import TrainerCallback

from ..errors import Terminated, TrainingError
from .metrics import is_plugin_metric

logger = logging.get_logger(f"llamafactory.longpo.{__name__.rsplit('.', 1)[-1]}")  # under the toolkit's root: its handlers apply
GRAD_NORM_ENV = "LLAMAFACTORY_LONGPO_GRAD_NORM_FILE"
STEP_TIME_ENV = "LLAMAFACTORY_LONGPO_STEP_TIME_FILE"
PEAK_MEMORY_ENV = "LLAMAFACTORY_LONGPO_PEAK_MEMORY_FILE"


class GradNormPerRankCallback(TrainerCallback):
    def __init__(self, path: str) -> None:
        rank = int(os.environ.get("RANK", "0"))
        self.path = f"{path}.rank{rank}"
        self.rank = rank

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Optional[torch.nn.Module] = None, **kw: Any
    ) -> None:
        if model is None:
            return
        grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
        sq = sum(float(g.pow(2).sum()) for g in grads.values())
        # per tensor: norm and signed sum, so equality checks see more than one number
        params = {n: [float(g.norm()), float(g.sum())] for n, g in grads.items()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"rank": self.rank, "step": state.global_step, "grad_norm": sq**0.5, "params": params}) + "\n")


class PeakMemoryCallback(TrainerCallback):
    """Each rank's peak resident memory (and, on GPU, peak allocated CUDA memory) at the end of training."""

    def __init__(self, path: str) -> None:
        self.path = f"{path}.rank{os.environ.get('RANK', '0')}"

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import resource

        entry = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            entry["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        with open(self.path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")


class StepTimeCallback(TrainerCallback):
    def __init__(self, path: str) -> None:
        self.path = f"{path}.rank{os.environ.get('RANK', '0')}"
        self.start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": state.global_step, "seconds": time.perf_counter() - self.start}) + "\n")


def last_checkpoint(output_dir: str) -> Optional[str]:
    """The newest checkpoint of a run, as transformers finds it (``None``: none was saved)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


def checkpoint_note(output_dir: str, last: Optional[str]) -> str:
    """Where the newest checkpoint ``last`` of a run is, in words, for one-line messages."""
    return f"the last checkpoint is {last}" if last else f"no checkpoint was saved in {output_dir}"


def last_checkpoint_note(output_dir: str) -> str:
    """:func:`checkpoint_note` of the newest checkpoint in ``output_dir``."""
    return checkpoint_note(output_dir, last_checkpoint(output_dir))


class TerminateNoteCallback(TrainerCallback):
    """SIGTERM during training ends the run with one line: the step reached, the last checkpoint, how to resume.

    Python's default for SIGTERM is to die at once, without a word; a scheduler's job then simply stops. The
    handler raises instead, so the output folder's lock and the process groups are released as on any error.
    A save cut short by it stays in the trainer's staging folder (never resumed from; the next save removes it).
    Only global rank 0 speaks; torchrun forwards the signal to every rank.
    """

    def __init__(self) -> None:
        self.previous: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import signal

        def stop(signum: int, frame: Any) -> None:
            if os.environ.get("RANK", "0") != "0":
                raise SystemExit(Terminated.exit_code)
            last = last_checkpoint(args.output_dir)
            how = f"to resume, run again with resume_from_checkpoint: {last}" if last else "a new run starts over"
            note = checkpoint_note(args.output_dir, last)
            raise Terminated(f"terminated (SIGTERM) at step {state.global_step}; {note}; {how}")

        self.previous = signal.signal(signal.SIGTERM, stop)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def stop_non_finite(args: Any, step: int, what: str) -> None:
    """Stop the run: ``what`` (the gradient, a logged value) is NaN or infinite at ``step``."""
    raise TrainingError(
        f"step {step}: {what} is NaN or infinite; training stopped before saving it, {last_checkpoint_note(args.output_dir)} "
        "(lower learning_rate, or check the data and the loss weights)"
    )


class NonFiniteGuardCallback(TrainerCallback):
    """Stop the run at the first NaN/infinite gradient or logged loss, before it is saved.

    The Trainer hides a NaN loss (``logging_nan_inf_filter`` logs the running mean instead) and steps the
    optimizer anyway, so one bad step writes NaN weights into every later checkpoint and the final model.
    Gradients are checked after the all-reduce and clipping, before the optimizer step. DeepSpeed keeps them
    out of ``param.grad`` and has stepped by then (its step runs inside the backward): the plugin's trainer
    checks its engine's global gradient norm itself, right after the step (:func:`.zero3.engine_grad_norm`),
    the same value on every rank, and the run stops before that step's checkpoint. The logged ``loss`` and
    ``grad_norm`` are checked too. Under fp16 the loss scaler owns this case: an overflowing step is skipped
    (the weights stay finite) and the scale lowered, so the guard stands aside.
    """

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Optional[torch.nn.Module] = None, **kw: Any
    ) -> None:
        if args.fp16:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))):
            stop_non_finite(args, state.global_step + 1, "the gradient")

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict[str, Any]] = None, **kw: Any) -> None:
        for key in ("loss", "grad_norm") if not args.fp16 else ():
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                stop_non_finite(args, state.global_step, key)


def diagnostic_callbacks() -> list[TrainerCallback]:
    """The opt-in diagnostics selected by environment variables (none by default)."""
    out: list[TrainerCallback] = []
    if os.environ.get(GRAD_NORM_ENV):
        out.append(GradNormPerRankCallback(os.environ[GRAD_NORM_ENV]))
    if os.environ.get(STEP_TIME_ENV):
        out.append(StepTimeCallback(os.environ[STEP_TIME_ENV]))
    if os.environ.get(PEAK_MEMORY_ENV):
        out.append(PeakMemoryCallback(os.environ[PEAK_MEMORY_ENV]))
    return out


def plugin_metrics(entry: dict[str, Any]) -> dict[str, Any]:
    """The plugin's metrics of one log entry (:func:`.metrics.is_plugin_metric`)."""
    return {k: v for k, v in entry.items() if is_plugin_metric(k)}


class ShortToLongLogCallback(LogCallback):
    """The toolkit's ``LogCallback`` (progress, LlamaBoard monitor) plus the plugin's metrics per line.

    The toolkit writes a fixed set of keys to ``trainer_log.jsonl``; the extra keys are added to the
    line it is about to write, so there is still exactly one line per logging step.
    """

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """The toolkit deletes an earlier ``trainer_log.jsonl`` here (``overwrite_output_dir``); that waits for
        :meth:`on_train_begin`, so a run refused while it loads its checkpoint or optimizer loses no log."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_init_end(args, state, control, **kwargs)
        super().on_train_begin(args, state, control, **kwargs)

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        extra = plugin_metrics(state.log_history[-1]) if state.log_history else {}
        write = type(self)._write_log
        self._write_log = lambda output_dir, logs: write(self, output_dir, {**logs, **extra})
        try:
            super().on_log(args, state, control, **kwargs)
        finally:
            del self._write_log
        if self.webui_mode and extra and args.should_save:  # the board shows this log; put the new metrics there too
            logger.info_rank0("{" + ", ".join(f"'{k}': {v:.4g}" for k, v in extra.items()) + "}")
