"""Memory planner: each GPU's peak memory and the step's FLOPs for a training YAML, predicted on a CPU.

``llamafactory-longpo estimate CONFIG.yaml`` traces one training step of the stage's own code (the
plugin's trainer and log-prob code, the toolkit's DPO/SFT trainers) on fake tensors at two reduced
depths, scales it to full depth, and distributes it per rank by ZeRO stage, offload and sequence
parallelism. Model states alone are what ``accelerate estimate-memory`` and DeepSpeed's estimators
count; what grows with length (activations, the LM head and its loss chunk, attention) is traced here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Optional

from ..errors import ConfigError

if TYPE_CHECKING:
    from .plan import Node

__all__ = ["quiet", "run_estimate", "train_start_line"]


@contextmanager
def quiet() -> Iterator[None]:
    """The toolkit's and libraries' info lines and warnings are about the traced copies, not the user's run."""
    from llamafactory.extras.logging import get_logger

    get_logger()  # configures the toolkit's root logger now, so that its level is not reset inside the block

    loggers = [logging.getLogger(name) for name in ("llamafactory", "transformers", "DeepSpeed", "accelerate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_layout(gpus: int, sp: int) -> None:
    if gpus < 1:
        raise ConfigError(f"--gpus: {gpus} must be >= 1")
    if sp < 1 or gpus % sp:
        raise ConfigError(f"sequence_parallel_size: {sp} must divide the number of GPUs ({gpus})")


def run_estimate(
    config: str,
    gpus: int = 1,
    lengths: Optional[list[int]] = None,
    device_gib: float = 80.0,
    sp: Optional[int] = None,
    response: Optional[int] = None,
    validate: bool = False,
    node: Optional[Node] = None,
) -> str:
    """The ``estimate`` command: the report for ``config`` at each of ``lengths`` (default ``cutoff_len``);
    ``node``: GPUs per node, host memory, PCIe and compute rates (:class:`.plan.Node`, whose defaults apply)."""
    from .plan import Node

    with quiet():
        return _report(config, gpus, lengths, device_gib, sp, response, validate, node or Node())


def _report(
    config: str,
    gpus: int,
    lengths: Optional[list[int]],
    device_gib: float,
    sp: Optional[int],
    response: Optional[int],
    validate: bool,
    node: Node,
) -> str:
    from .plan import GIB, estimate, format_report
    from .step import load_run_config

    run = load_run_config(config)
    sp = sp or int(getattr(run.finetuning_args, "sequence_parallel_size", 1) or 1)
    _check_layout(gpus, sp)
    lengths = lengths or [run.data_args.cutoff_len]
    for length in lengths:
        if length < 16:
            raise ConfigError(f"--lengths: {length} tokens is too short to trace (at least 16)")
    estimates = [estimate(run, length, gpus, sp, device_gib, response, node=node) for length in lengths]
    counts = estimates[0].counts
    counts_line = (
        f"{_count(counts.total)} parameters, {_count(counts.trainable)} trainable, "
        f"{run.model_config.num_hidden_layers} layers, vocabulary {run.model_config.vocab_size:,}"
    )
    report = format_report(run, estimates, gpus, sp, counts_line)
    if validate:
        from .validate import GPU_LAYERS, gpu_check

        check = gpu_check(run, lengths[0], response)
        report += (
            f"\nvalidate ({GPU_LAYERS} layers, one GPU, {lengths[0]:,} tokens): predicted {check.predicted / GIB:.2f} GiB, "
            f"max_memory_allocated {check.measured / GIB:.2f} GiB ({check.error:+.1%})"
        )
    return report


def _count(n: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def _fresh_args(obj: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The init fields of a parsed arguments object, to parse them again (post-init values are idempotent)."""
    return {f.name: copy.deepcopy(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init and f.name not in drop}


def train_start_line(model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any) -> str:
    """One line for the start of training: the predicted peak per rank of this run at its ``cutoff_len``.

    Never raises: a run is not stopped for its estimate; the line then says why there is none. Only
    single-process runs without DeepSpeed trace here. In a distributed run the trace would touch process-wide
    state (accelerate's shared state, the attention registry) in one rank only; beside a DeepSpeed engine, even a
    single rank's, it leaves accelerate's state without the engine's plugin, and the first step then runs on
    ZeRO-3's empty partitions. So those lines name the ``estimate`` command instead; ranks other than 0 return
    an empty line, which they do not log anyway.
    """
    if int(getattr(training_args, "process_index", 0) or 0) != 0:
        return ""
    world = int(getattr(training_args, "world_size", 1) or 1)
    if world > 1 or getattr(training_args, "deepspeed", None):
        return f"planner: for this run's per-rank estimate, run llamafactory-longpo estimate <config> --gpus {world}"
    try:
        with quiet(), _random_state_kept():
            return _train_start_line(model_args, data_args, training_args, finetuning_args)
    except Exception as err:  # noqa: BLE001 - the estimate is advice; training goes on without it
        return f"planner: no estimate for this run ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


@contextmanager
def _random_state_kept() -> Iterator[None]:
    """Every random generator as it was before the trace. The trace draws random numbers (model init; the traced
    trainer's ``set_seed``), and only rank 0 traces: without this, its generators would part from the other
    ranks' and the run's own draws after it (LoRA adapters' init, for one) would differ from rank to rank."""
    import random

    import numpy as np
    import torch

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _train_start_line(model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any) -> str:
    from ..train.zero3 import ZeroConfig, hidden_from_transformers
    from .plan import estimate, size
    from .step import load_run_config_from_dict

    raw: dict[str, Any] = {}
    for obj in (model_args, data_args, finetuning_args):
        raw.update(_fresh_args(obj))
    raw.update(_fresh_args(training_args, drop=("deepspeed",)))
    run = load_run_config_from_dict(raw, ZeroConfig.from_training_args(training_args), "the running training")
    world = max(1, int(training_args.world_size))
    with hidden_from_transformers():
        e = estimate(run, data_args.cutoff_len, world)
    parts = ", ".join(f"{k} {size(v)}" for k, v in e.parts.items() if v >= 0.05 * e.total)
    return f"planner: predicted peak per rank at {data_args.cutoff_len:,} tokens: {size(e.total)} ({parts})"
