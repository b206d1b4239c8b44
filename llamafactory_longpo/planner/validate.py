"""Check a prediction against the real step: live tensor bytes on CPU, the allocator's peak on a GPU.

CPU: the same step (trainer, batch, optimizer) on real tensors at full depth, under the same tracker
without fake tensors, against the prediction made with the model's own attention kernel (what the CPU
run uses), so the comparison tests the tracing and the depth scaling. The process's peak RSS is also
reported; it holds the interpreter, the libraries and the allocator's cache besides the tensors.

GPU: a reduced-depth model of the run's width on the GPU, one real step, ``torch.cuda.max_memory_allocated``
against the prediction for that depth with the flash-kernel attention model: this tests the GPU kernel
modelling as well.
"""

from __future__ import annotations

import gc
import resource
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .plan import estimate, traced_step
from .step import Lengths, RunConfig, StepSetup, step_setup

GPU_LAYERS = 4


@dataclass
class Check:
    """A prediction and what the real step held (bytes): live tensors by the tracker, and by the allocator."""

    predicted: float
    measured: float
    allocated: Optional[float] = None
    rss: Optional[float] = None
    predicted_moved: float = 0.0  # bytes the offload hooks copy down and up in the step: predicted ...
    measured_moved: float = 0.0  # ... and counted by the real step's hooks
    flops: float = 0.0  # the step's FLOPs as the planner counts them (GPU check)
    seconds: float = 0.0  # the real step's forward, backward and optimizer step, synchronised (GPU check)

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured

    @property
    def allocator_error(self) -> Optional[float]:
        return None if self.allocated is None else (self.predicted - self.allocated) / self.allocated


def allocator_peak(run: RunConfig, setup: StepSetup) -> float:
    """Peak bytes of a real step as PyTorch's CPU allocator reports them to the profiler (its ``[memory]``
    events), on top of the storages alive before it: a count that does not go through the tracker."""
    from torch.profiler import ProfilerActivity, profile

    from .step import autocast_context

    setup.warm_optimizer()
    state = [t for s in setup.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    modules = [m for m in (setup.model, setup.ref_model) if m is not None]
    before = [*state, *setup.batch.values(), *(t for m in modules for t in [*m.parameters(), *m.buffers()])]
    baseline = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in before}.values())
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with autocast_context(run):
            setup.run_step()
        setup.optimizer_step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return baseline + peak


def cpu_check(
    run: RunConfig, length: int, response: Optional[int] = None, attention: str = "sdpa", allocator: bool = True
) -> Check:
    """Predict with ``attention`` (the kernel the CPU run uses), then run the real step and compare (``allocator``:
    also count the CPU allocator's peak, in a second real step)."""
    from .plan import row_lengths

    prediction = estimate(run, length, sp=1, response=response, attention=attention)
    layers = run.model_config.num_hidden_layers
    gc.collect()
    with step_setup(run, layers, row_lengths(run, length, 1, response), attention) as setup:
        measured = traced_step(run, setup, layers).peak
        moved = setup.offloaded.down + setup.offloaded.up if setup.offloaded is not None else 0
        # with offload, the allocator counts the host copies too (CPU memory here)
        allocated = allocator_peak(run, setup) if allocator else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return Check(prediction.total, measured, allocated, rss, prediction.moved, moved)


def gpu_check(run: RunConfig, length: int, response: Optional[int] = None, layers: int = GPU_LAYERS) -> Check:
    """One real step of a ``layers``-deep model of the run's width on the GPU, against its prediction.

    Runs without DeepSpeed on one GPU: the model-state formulas of ZeRO are DeepSpeed's own; what is
    checked here is the traced part (activations, LM head, attention kernels) and the weights as held.
    """
    if not torch.cuda.is_available():
        from ..errors import ConfigError

        raise ConfigError("--validate: no CUDA device here (on CPU, benchmarks/planner_validate.py checks the planner)")
    import copy

    from ..train.zero3 import ZeroConfig
    from .plan import row_lengths
    from .step import autocast_context

    run = copy.copy(run)
    run.zero = ZeroConfig()  # one GPU, the toolkit's own optimizer: no DeepSpeed formulas to compare
    prediction = estimate(run, length, sp=1, response=response, layers=layers)
    lengths: Lengths = row_lengths(run, length, 1, response)
    device = torch.device("cuda")
    with step_setup(run, layers, lengths, "sdpa", device=device) as setup:  # PyTorch picks its flash kernel (no mask)
        setup.model.to(device)
        if setup.ref_model is not None:
            setup.ref_model.to(device)
        setup.batch = {k: v.to(device) for k, v in setup.batch.items()}
        setup.warm_optimizer()
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with autocast_context(run, "cuda"):
            setup.run_step()
        setup.optimizer_step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return Check(prediction.total, float(torch.cuda.max_memory_allocated()), flops=prediction.flops, seconds=seconds)
