"""Trace one real training step on fake tensors: live bytes by kind at the peak, and the step's FLOPs.

Floating-point tensors (weights, activations, gradients) are fake: they carry shape, dtype and device but
no storage, so a 7B-wide layer at 128K tokens costs nothing to "run". Integer and boolean bookkeeping
(token ids, masks, positions, the indices of scored tokens) stays real when it is small, because the
log-prob code reads it (``nonzero``, ``int(mask.sum())``) to decide what to compute. Memory is counted by
PyTorch's ``MemTracker`` (which sees fake storages as it sees real ones) and FLOPs by ``FlopCounterMode``'s formulas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.attention.bias as bias
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
)
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import flop_registry

from ..train.offload import packing

_CAUSAL_LOWER_RIGHT = bias.causal_lower_right
# bookkeeping tensors up to this many elements stay real (a 4M-element index is 32 MB; a [T, T] mask is not)
REAL_LIMIT = 1 << 22

# what the breakdown calls each part of the traced memory
WEIGHTS, GRADIENTS, OPTIMIZER = "weights", "gradients", "optimizer states"
ACTIVATIONS, HEAD, ATTENTION, REFERENCE = "activations", "LM head / loss chunk", "attention", "reference"
KINDS = (WEIGHTS, GRADIENTS, OPTIMIZER, ACTIVATIONS, HEAD, ATTENTION, REFERENCE)
HOST = "offloaded (host)"  # checkpointed inputs in host memory (s2l_offload_activations): not on the GPU

_STATE_KINDS = {
    _MemRefType.PARAM: WEIGHTS,
    _MemRefType.BUFFER: WEIGHTS,
    _MemRefType.GRAD: GRADIENTS,
    _MemRefType.OPT: OPTIMIZER,
}
_MODEL_STATES = (WEIGHTS, GRADIENTS, OPTIMIZER)


def _is_attention(name: str) -> bool:
    """An attention kernel: SDPA's (``aten._scaled_dot_product_*``, ``_flash_attention_*``, ...) or the planner's."""
    return "scaled_dot_product" in name or "flash" in name or "efficient_attention" in name


class HybridFakeMode(FakeTensorMode):
    """Fake floating-point tensors; small integer/boolean results of real inputs computed for real.

    An op whose tensor inputs are all real (or that has none, like ``arange``) first runs fake to learn its
    output; if that output is small it is recomputed for real, so the data-dependent decisions of the code
    under trace (which tokens are scored, how many head chunks) see real values. Ops that cannot run fake
    (``nonzero``, ``.item()``) on real inputs run for real. ``.item()`` of a fake floating-point tensor (a
    logged metric) returns NaN: its value is never used to decide anything.
    """

    def __init__(self, real_limit: int = REAL_LIMIT) -> None:
        """``real_limit``: the most elements of an integer or boolean result computed for real."""
        super().__init__(allow_non_fake_inputs=True)
        self.real_limit = real_limit

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        try:
            return self._hybrid_dispatch(func, types, args, kwargs or {})
        finally:
            # The converter memoises conversions through weakrefs to the fake tensors it makes, and a tensor
            # with a weakref cannot be swapped: ``module.to(...)`` of a fake module (PEFT, trainers) would fail.
            # Forgetting the memo only means that a real tensor used twice is converted twice.
            self.fake_tensor_converter.meta_converter.tensor_memo.clear()

    def _hybrid_dispatch(self, func: Any, types: Any, args: Any, kwargs: dict) -> Any:
        flat = pytree.arg_tree_leaves(*args, **kwargs)
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if any(isinstance(t, FakeTensor) for t in tensors):
            if func is torch.ops.aten._local_scalar_dense.default and tensors[0].dtype.is_floating_point:
                return math.nan
            return super().__torch_dispatch__(func, types, args, kwargs)
        if func._schema.is_mutable:  # writes into a real tensor (which is small: it exists)
            return func(*args, **kwargs)
        try:
            out = super().__torch_dispatch__(func, types, args, kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException):
            return func(*args, **kwargs)
        leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if leaves and all(not t.is_floating_point() and t.numel() <= self.real_limit for t in leaves):
            return func(*args, **kwargs)
        return out


class _NoHook:
    """A hook handle for a hook never installed."""

    def remove(self) -> None:
        return None


_NO_HOOK = _NoHook()


class _KindTracker(MemTracker):
    """``MemTracker`` that also sorts activation-side storages into the breakdown's kinds.

    Each storage gets a kind when it is first seen: model states by MemTracker's own categories; the
    rest by what made it: a backward op whose output has a trainable weight's shape (that weight's gradient),
    an attention kernel, a tensor as wide as the vocabulary (logits, log-softmax and their gradients), a
    forward without gradients (the reference model), else plain activations. The
    live bytes per kind are kept current, and copied whenever the total reaches a new high, separately
    for the forward/backward and the optimizer step.
    """

    def __init__(self, vocab_size: int, grad_shapes: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.grad_shapes = grad_shapes
        self.live: dict[str, int] = dict.fromkeys((*KINDS, HOST), 0)
        self.host_peak = 0
        self.peaks: dict[str, dict[str, int]] = {}
        self._op_kind = ACTIVATIONS
        self._shape_kind: Optional[str] = None
        self.phase = "step"
        # FLOPs by FlopCounterMode's formulas, counted here: FlopCounterMode itself, as a second mode, keeps
        # the step's tensors alive through its module tracking (doubling the traced peak in tests here)
        self.flops = 0
        self.counting_flops = True

    def _kind_of(self, winfo: Any) -> str:
        fixed = getattr(winfo, "s2l_fixed", None)
        return fixed or _STATE_KINDS.get(winfo.reftype) or getattr(winfo, "s2l_kind", ACTIVATIONS)

    def track_reference(self, module: torch.nn.Module) -> None:
        """Count a frozen reference model's weights as the reference's, not the policy's."""
        for tensor in [*module.parameters(), *module.buffers()]:
            for winfo in self._update_and_maybe_create_winfos(tensor, _MemRefType.PARAM):
                if getattr(winfo, "s2l_fixed", None) is None:
                    self.live[self._kind_of(winfo)] -= winfo.mem_consumed
                    winfo.s2l_fixed = REFERENCE
                    self.live[REFERENCE] += winfo.mem_consumed

    def _update_snap(self, u_type: Any, winfo: Any, old_mem_consumed: Optional[int] = None, old_reftype: Any = None) -> None:
        from torch.distributed._tools.mem_tracker import _UpdateType

        if u_type == _UpdateType.ADD:
            if not hasattr(winfo, "s2l_kind"):
                winfo.s2l_kind = self._shape_kind or self._op_kind
            self.live[self._kind_of(winfo)] += winfo.mem_consumed
        elif u_type == _UpdateType.DEL:
            self.live[self._kind_of(winfo)] -= winfo.mem_consumed
        elif u_type == _UpdateType.SIZE:
            self.live[self._kind_of(winfo)] += winfo.mem_consumed - old_mem_consumed
        elif u_type == _UpdateType.REF:
            old = getattr(winfo, "s2l_fixed", None) or _STATE_KINDS.get(old_reftype) or getattr(winfo, "s2l_kind", ACTIVATIONS)
            self.live[old] -= winfo.mem_consumed
            self.live[self._kind_of(winfo)] += winfo.mem_consumed
        super()._update_snap(u_type, winfo, old_mem_consumed, old_reftype)
        self.host_peak = max(self.host_peak, self.live[HOST])
        live = {k: self.live[k] for k in KINDS}
        total = sum(live.values())
        best = self.peaks.get(self.phase)
        if best is None or total > sum(best.values()):
            self.peaks[self.phase] = live
        # the peak of what is not a model state: where it lies when DeepSpeed keeps those partitioned
        transient = total - sum(self.live[k] for k in _MODEL_STATES)
        best = self.peaks.get(f"{self.phase} transient")
        if best is None or transient > sum(v for k, v in best.items() if k not in _MODEL_STATES):
            self.peaks[f"{self.phase} transient"] = live

    def _track(self, reftype: Any, t: torch.Tensor) -> None:
        if packing():
            self._shape_kind = HOST
        elif self._mod_tracker.is_bw and tuple(t.shape) in self.grad_shapes and t.is_floating_point():
            self._shape_kind = GRADIENTS  # a weight's gradient, from the op that makes it (MemTracker types it later)
        elif t.dim() >= 1 and t.shape[-1] == self.vocab_size and t.is_floating_point():
            self._shape_kind = HEAD  # logits, log-softmax and their gradients
        elif t.dtype == torch.bool and t.dim() >= 2 and t.shape[-1] == t.shape[-2] and t.numel() > REAL_LIMIT:
            self._shape_kind = ATTENTION  # a [T, T] attention mask
        else:
            self._shape_kind = None
        super()._track(reftype, t)
        self._shape_kind = None

    def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        # MemTracker hooks every parameter's gradient, and a frozen parameter (LoRA's base weights, a reference
        # model) refuses a hook: mark those as hooked already, with handles that remove nothing
        for p in module.parameters():
            if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[p] = (_NO_HOOK, _NO_HOOK)
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
        # MemTracker's per-module statistics refuse a module called twice in one step; the log-prob code calls
        # the LM head once per chunk and the model once per group of rows. Only the totals are needed here.
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            return
        super()._pre_fw_hook(module, inputs)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else ""
        if _is_attention(name):
            self._op_kind = ATTENTION
        elif not self._mod_tracker.is_bw and not self._in_opt and not torch.is_grad_enabled():
            self._op_kind = REFERENCE
        else:
            self._op_kind = ACTIVATIONS
        out = super().__torch_dispatch__(func, types, args, kwargs)
        formula = flop_registry.get(func.overloadpacket) if self.counting_flops else None
        if formula is not None:
            self.flops += formula(*args, **(kwargs or {}), out_val=out)
        return out


@dataclass
class StepTrace:
    """Peak live bytes by kind in the forward/backward and in the optimizer step, and the step's FLOPs.

    ``transient``: live bytes by kind when the forward/backward's activations, head, attention and
    reference parts together peak (the model states ignored).
    """

    fwd_bwd: dict[str, int]
    optimizer_step: dict[str, int]
    flops: int
    layers: int
    transient: dict[str, int]
    host: int = 0  # the most bytes the offload hooks held in host memory at once

    @property
    def peak(self) -> int:
        return max(sum(self.fwd_bwd.values()), sum(self.optimizer_step.values()))


def _materialized_causal_lower_right(*size: int) -> torch.Tensor:
    """``causal_lower_right`` as a CPU run ends up using it: SDPA's CPU kernels take no ``CausalBias`` and
    get this boolean mask."""
    lq, lk = size
    return torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)


@contextmanager
def fake_mode(real_limit: int = REAL_LIMIT) -> Iterator[HybridFakeMode]:
    """Build models and batches inside this: floating-point tensors are fake, nothing is allocated (``real_limit``:
    see :class:`HybridFakeMode`)."""
    with HybridFakeMode(real_limit) as mode:
        yield mode


@contextmanager
def _cpu_causal_bias() -> Iterator[None]:
    """A ``CausalBias`` cannot be made under a dispatch mode (the tracker, fake tensors): CPU kernels get the
    mask it materialises instead, which is what they would run with. A bias already replaced (the GPU kernel
    model of :mod:`.attention`) stays."""
    if bias.causal_lower_right is not _CAUSAL_LOWER_RIGHT:
        yield
        return
    bias.causal_lower_right = _materialized_causal_lower_right
    try:
        yield
    finally:
        bias.causal_lower_right = _CAUSAL_LOWER_RIGHT


def trace_step(
    step: Callable[[], None],
    optimizer_step: Optional[Callable[[], None]],
    track: list[Any],
    vocab_size: int,
    layers: int,
    reference: Optional[torch.nn.Module] = None,
) -> StepTrace:
    """Run ``step`` (forward and backward of one micro-batch) then ``optimizer_step`` under the tracker.

    ``track``: modules, optimizers and tensors made before the trace (they hold memory from the start);
    ``reference``: a separate frozen reference model, whose weights are counted apart.
    Works the same with real tensors (the validation runs) and inside :func:`fake_mode`.
    """
    modules = [m for m in track if isinstance(m, torch.nn.Module)]
    tracker = _KindTracker(vocab_size, {tuple(p.shape) for m in modules for p in m.parameters() if p.requires_grad})
    tracker.track_external(*track)
    if reference is not None:
        tracker.track_reference(reference)
    with _cpu_causal_bias(), tracker:
        tracker.phase = "step"
        step()
        tracker.counting_flops = False
        if optimizer_step is not None:
            tracker.phase = "optimizer"
            optimizer_step()
    empty = dict.fromkeys(KINDS, 0)
    peaks = tracker.peaks
    return StepTrace(
        peaks.get("step", empty),
        peaks.get("optimizer", empty),
        tracker.flops,
        layers,
        peaks.get("step transient", empty),
        tracker.host_peak,
    )
