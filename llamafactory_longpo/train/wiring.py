"""The one place a plugin-stage model is wired for its run, and unwired after it.

Training (:mod:`.workflow`) and the memory planner's traced step both call :func:`wire_model`, so the step the
planner measures is put together exactly as the step that trains. What it changes, in this order:

1. LongPO's shared-prefix attention (:mod:`.shared_prefix`), when the spec has it;
2. Ulysses sequence parallelism (:mod:`.sequence_parallel`), which wraps whatever attention step 1 left: its
   all-to-all runs outside, so the shared prefix's pieces see the whole sequence of their heads;
3. decoder MLPs in sequence tiles (:mod:`.tiling`) and checkpointed layer inputs in host memory
   (:mod:`.offload`), when the spec has them: both change the policy's own modules only;
4. the reference model, loaded when the spec needs a separate one (after 1 and 2: the attention registry is
   process-wide, so the reference's forwards take the same path as the policy's; a frozen reference runs no
   backward, so it neither tiles nor offloads).

Steps 1 and 2 replace entries of transformers' attention registry, which every model in the process reads.
:meth:`Wiring.undo` puts back each entry it replaced (a traced copy must leave the registry as it found it, and a
finished run must drop the Ulysses wrapper, which holds its process group, before the group is destroyed), and
the policy's modules as step 3 found them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .offload import OffloadLedger
from .rope import current_rope_theta
from .sequence_parallel import SequenceParallel
from .spec import RunSpec


@dataclass
class Wiring:
    """What :func:`wire_model` set up for one model, and what it replaced."""

    sequence_parallel: Optional[SequenceParallel] = None  # this rank's group (sequence_parallel_size > 1)
    ref_model: Optional[torch.nn.Module] = None  # the separate frozen reference, when the spec has one
    original_rope_theta: Optional[float] = None  # the RoPE base the reference keeps when the policy's is raised
    offloaded: Optional[OffloadLedger] = None  # bytes the offload hooks moved (s2l_offload_activations)
    replaced: dict[str, Any] = field(default_factory=dict)  # attention registry name -> the entry before wiring
    restores: list[Callable[[], None]] = field(default_factory=list)  # put the policy's modules back as they were

    def undo(self) -> None:
        """Put back every attention registry entry and module the wiring replaced (idempotent)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        for name, function in self.replaced.items():
            ALL_ATTENTION_FUNCTIONS[name] = function
        self.replaced.clear()
        while self.restores:
            self.restores.pop()()


def _remember(wiring: Wiring, model: torch.nn.Module) -> None:
    """Keep the registry entry of the model's attention before it is replaced (the first value seen wins)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation
    if name in ALL_ATTENTION_FUNCTIONS and name not in wiring.replaced:
        wiring.replaced[name] = ALL_ATTENTION_FUNCTIONS[name]


def wire_model(
    model: torch.nn.Module,
    spec: RunSpec,
    *,
    make_reference: Callable[[], Optional[torch.nn.Module]],
    log: Callable[[str], None] = lambda _line: None,
) -> Wiring:
    """Wire ``model`` for the run ``spec`` describes (see the module docstring); ``make_reference`` loads the
    separate reference model when the spec needs one. ``log`` hears one line per feature switched on."""
    wiring = Wiring()
    try:
        if spec.shared_prefix:
            from .shared_prefix import install_shared_prefix_attention

            _remember(wiring, model)
            kernel = install_shared_prefix_attention(model)
            log(f"LongPO shared prefix: the document runs once per pair ({kernel} attention in two causal pieces)")
        if spec.sequence_parallel_size > 1:  # checked and wired before any forward (the reference pass included)
            from .sequence_parallel import enable_sequence_parallel

            _remember(wiring, model)
            sp = enable_sequence_parallel(model, spec.sequence_parallel_size)
            wiring.sequence_parallel = sp
            log(f"sequence parallel: {sp.size} ranks per row (DeepSpeed Ulysses), {sp.dp_size} data-parallel group(s)")
        if spec.tiled_mlp:
            from .tiling import install_tiled_mlp

            wiring.restores.append(install_tiled_mlp(model, spec.mlp_tile_tokens))
            log("tiled MLP: each decoder MLP runs in slices of hidden_size tokens, recomputed slice by slice")
        if spec.offload_activations:
            from .offload import install_offload

            wiring.offloaded = OffloadLedger()
            wiring.restores.append(install_offload(model, wiring.offloaded))
            log("offloaded checkpoints: each checkpointed layer's input waits in host memory until its recompute")
        if spec.reference_model:
            wiring.ref_model = make_reference()
        if spec.policy_rope_theta is not None:
            wiring.original_rope_theta = current_rope_theta(model.config)
    except BaseException:
        wiring.undo()
        raise
    return wiring
