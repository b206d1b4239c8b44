"""Process-wide fixes for library bugs the plugin's stages meet, in one place.

Each function names the library and the failure it works around, so it can go when the library is fixed:

- torch cannot ``torch.load(..., map_location=torch.device("cpu", 0))``: resuming any multi-process CPU run
  (accelerate gives each CPU rank ``cpu:0``; transformers loads the optimizer with that location) fails.
- a gloo or NCCL group freed during interpreter finalization can abort a finished distributed run (DeepSpeed's
  module globals and transformers' attention registry keep the sequence-parallel group alive until then).
"""

from __future__ import annotations

import functools
import gc
import sys
from typing import Any

import torch
import torch.distributed as dist


@functools.cache  # registered once per process
def accept_indexed_cpu_locations() -> None:
    """Let ``torch.load(..., map_location=torch.device("cpu", i))`` work: resuming on several CPU processes.

    accelerate gives each CPU rank the device ``cpu:0`` and transformers resumes the optimizer with
    ``torch.load(map_location=args.device)``; torch knows the location ``"cpu"`` but not ``"cpu:0"`` and
    stops with "don't know how to restore data location". A deserializer for ``cpu:N`` (public
    ``torch.serialization.register_package``) keeps such storages on the CPU. Other locations are untouched.
    """

    def deserialize(obj: Any, location: str) -> Any:
        if location.startswith("cpu:") and location[4:].isdigit():
            return obj
        return None  # not ours: torch tries the next deserializer

    torch.serialization.register_package(100, lambda _obj: None, deserialize)


def shutdown_distributed() -> None:
    """Destroy every process group and drop every reference to one while the interpreter is alive.

    Why not just ``torch.distributed.destroy_process_group()``: the sequence-parallel group stays
    referenced by DeepSpeed's module globals, by the Ulysses wrapper in transformers' attention registry
    and by garbage cycles of the trainer; a gloo group freed during interpreter finalization can abort the
    process ("terminate called without an active exception", exit -6) after a successful run. DeepSpeed's
    own ``destroy_process_group`` releases its globals; the registry entry was put back when the run's
    wiring was undone (:meth:`.wiring.Wiring.undo`), and the cycles are collected before returning.
    """
    gc.collect()  # the trainer, model and engine of the finished run: free them before their groups go
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # torch's, plus DeepSpeed's own group references
    elif dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
