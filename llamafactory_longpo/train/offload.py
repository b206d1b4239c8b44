"""Checkpointed layer inputs kept in host memory (``s2l_offload_activations``).

With gradient checkpointing a layer keeps only its input for backward, and at long lengths those inputs are most
of what a step holds: Qwen2.5-7B's 28 layers keep ``28 x T x 3584 x 2`` bytes per row (49 GiB for the 262,144
tokens one rank holds of a 1M-token row at sequence parallel 4). Arctic Long Sequence Training (arXiv 2506.13996)
moves them to host memory; so does this module.

Mechanism: PyTorch's ``torch.autograd.graph.saved_tensors_hooks``, the hooks ``save_on_cpu`` is made of, entered
around each decoder layer's checkpoint call only. Non-reentrant checkpointing (the only kind the plugin runs:
reentrant checkpointing desyncs DDP's reduction when a step makes two forwards) saves the layer's positional
inputs through whatever hooks are active outside it, and its own hooks discard everything saved inside the layer.
So the pack hook sees exactly one tensor per layer call, the hidden states, and moves it to (pinned) host memory;
the unpack hook copies it back to the device when backward reaches that layer, before its recompute runs. The
keyword inputs (position embeddings, masks) are one set shared by all layers and stay where they are.

``save_on_cpu`` itself is not used because it hands back its host tensor unchanged when the tensor came from the
CPU: a CPU run would then move nothing, and neither the tests here nor the planner's trace on fake CPU tensors
could see the upload. The hooks below always copy, both ways, and count the bytes they move
(:class:`OffloadLedger`), which the planner reports as host memory and PCIe traffic.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks

from ..errors import ConfigError

# true while a pack hook allocates its host copy: the planner's tracker counts that storage as host memory
_PACKING: contextvars.ContextVar[bool] = contextvars.ContextVar("s2l_offload_packing", default=False)


def packing() -> bool:
    """Whether the current allocation is an offloaded copy in host memory (read by the planner's tracker)."""
    return _PACKING.get()


@dataclass
class OffloadLedger:
    """Bytes moved to the host (``down``) and back (``up``) since it was made; the planner reads the same counts."""

    down: int = 0
    up: int = 0


class OffloadedInputs(saved_tensors_hooks):
    """Saved tensors go to host memory when packed and come back to their device when unpacked."""

    def __init__(self, ledger: OffloadLedger) -> None:
        def pack(tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
            pin = tensor.device.type != "cpu"  # pinned host memory lets the copies run asynchronously to the device
            token = _PACKING.set(True)
            try:
                host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, device="cpu", pin_memory=pin)
            finally:
                _PACKING.reset(token)
            host.copy_(tensor, non_blocking=pin)
            ledger.down += host.nbytes
            return tensor.device, host

        def unpack(packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
            device, host = packed
            ledger.up += host.nbytes
            return host.to(device, non_blocking=host.is_pinned(), copy=True)

        super().__init__(pack, unpack)


def _offloaded(function: Callable[..., Any], ledger: OffloadLedger) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        with OffloadedInputs(ledger):
            return function(*args, **kwargs)

    return call


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose calls transformers routes through ``_gradient_checkpointing_func`` (the decoder layers)."""
    return [
        m for m in model.modules() if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")
    ]


def install_offload(model: torch.nn.Module, ledger: OffloadLedger) -> Callable[[], None]:
    """Wrap every checkpointed layer's checkpoint call in :class:`OffloadedInputs`; returns the undo.

    The toolkit enables gradient checkpointing as it loads the model, so this runs after loading; checkpointing
    switched off is refused before loading (:func:`settle_checkpointing`), a model that has no checkpointed layers
    anyway here."""
    layers = checkpointed_layers(model)
    if not layers:
        raise ConfigError("s2l_offload_activations: the model has no gradient-checkpointed layers to offload")
    originals = [(layer, layer._gradient_checkpointing_func) for layer in layers]
    for layer, function in originals:
        layer._gradient_checkpointing_func = _offloaded(function, ledger)

    def undo() -> None:
        for layer, function in originals:
            layer._gradient_checkpointing_func = function

    return undo


def settle_checkpointing(model_args: Any, finetuning_args: Any) -> list[str]:
    """Gradient checkpointing as the plugin's stages run it, decided before the model is loaded; returns the lines
    to log about what changed.

    Checkpointing is always non-reentrant (reentrant checkpointing desyncs DDP's gradient reduction when a step
    makes two forwards). The toolkit's ``use_unsloth_gc`` (a reentrant function that offloads to a hard-coded
    ``"cuda"``) becomes ``s2l_offload_activations``, which offloads the same inputs through non-reentrant
    checkpointing. Offloading needs checkpointed layers, so it is refused with checkpointing disabled."""
    notes = []
    model_args.use_reentrant_gc = False
    if getattr(model_args, "use_unsloth_gc", False):
        model_args.use_unsloth_gc = False
        finetuning_args.s2l_offload_activations = True
        notes.append("use_unsloth_gc: the plugin's stages offload checkpointed inputs with s2l_offload_activations (now on)")
    if finetuning_args.s2l_offload_activations and getattr(model_args, "disable_gradient_checkpointing", False):
        raise ConfigError(
            "s2l_offload_activations: true offloads the inputs of checkpointed layers; "
            "set disable_gradient_checkpointing: false (or s2l_offload_activations: false)"
        )
    return notes
