"""Token-level distillation from the short-context view (stage ``s2ld``), without ever building ``[T, V]`` logits.

The teacher (the frozen start model) reads the SHORT row, the student (the policy) the LONG row; both end in the
same response tokens. Their full next-token distributions are compared at every response position
(:func:`..losses.token_divergence`).

Why the teacher is computed live and not cached: its distributions are ``R x V`` floats per row (a 1K-token
response over a 150K vocabulary is 600 MB in float32), too large to store per sample. What is kept instead is the
teacher's final hidden states at the response positions only (``R x H``, from one no-grad forward of the short
row); the LM head is applied to them chunk by chunk, next to the student's chunk, inside one checkpointed function
(:func:`chunked_divergence`) that is recomputed in backward. At any moment one chunk of teacher and student logits
exists, so the head's memory grows with ``s2l_logits_chunk``, never with the response or the context.

Under sequence parallelism each rank feeds its slice of both rows (the attention of every forward is sharded); the
teacher's slices are gathered (short rows, no gradient), so each rank pairs the response tokens of its student
slice with the teacher's states of the same tokens; the sums are added up over the group as in :mod:`.logps`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import TrainingError
from ..losses import TokenDivergence
from .logps import IGNORE_INDEX, at_least_float32, chunk_plan, final_hidden_states, next_token_targets, token_logps
from .sequence_parallel import SequenceParallel, group_sum

Head = Callable[[torch.Tensor], torch.Tensor]


def response_order(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Next-token targets of ``[B, L]`` labels, and each scored position's index in the batch's response order
    (row by row, position by position; ``-100`` elsewhere): the key that pairs a student token with the teacher's."""
    targets = next_token_targets(labels)
    valid = targets != IGNORE_INDEX
    order = torch.where(valid, valid.flatten().cumsum(0).view_as(valid) - 1, IGNORE_INDEX)
    return {"response": targets, "order": order}


def check_same_responses(short_targets: torch.Tensor, long_targets: torch.Tensor) -> None:
    """The short and long rows of each sample must end in the same response tokens (the template encodes each
    assistant turn on its own, so they do unless the data or the template breaks that)."""
    short_counts, long_counts = (short_targets != IGNORE_INDEX).sum(1), (long_targets != IGNORE_INDEX).sum(1)
    same = torch.equal(short_counts, long_counts) and torch.equal(
        short_targets[short_targets != IGNORE_INDEX], long_targets[long_targets != IGNORE_INDEX]
    )
    if not same:
        raise TrainingError(
            "s2ld: the short and long rows of a sample have different response tokens; the template must encode the "
            "assistant turn independently of the context"
        )


def _gather_slices(hidden: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """The whole rows' hidden states from every rank's slice (no gradient: the teacher's)."""
    parts = [torch.empty_like(hidden) for _ in range(sp.size)]
    dist.all_gather(parts, hidden.contiguous(), group=sp.group)
    return torch.cat(parts, dim=1)


@torch.no_grad()
def teacher_states(
    model: torch.nn.Module,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    sequence_parallel: Optional[SequenceParallel] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, H]`` final hidden states of the teacher at the batch's ``N`` response positions, in response order,
    and the ``[B, L]`` next-token targets they predict. One no-grad forward of the short rows."""
    sp = sequence_parallel
    keys = response_order(labels)
    ids, mask, positions = input_ids, attention_mask, None
    if sp is not None:
        ids, mask, positions, _ = sp.local_slice(input_ids, None, None, {})
    hidden = final_hidden_states(model, head, ids, mask, position_ids=positions)
    if sp is not None:
        hidden = _gather_slices(hidden, sp)[:, : labels.size(1)]
    targets = keys["response"]
    rows, pos = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # integer indices: the planner's fake tensors take them
    return hidden[rows, pos], targets


@dataclass
class DistillSums:
    """Sums over the batch's response tokens (over the sequence-parallel group too): the divergence, the student's
    and the teacher's log-probs of the response tokens, and the token count."""

    divergence: torch.Tensor
    student_logps: torch.Tensor
    teacher_logps: torch.Tensor
    tokens: torch.Tensor


def _chunk_sums(
    student_head: Head,
    teacher_head: Head,
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    targets: torch.Tensor,
    divergence: TokenDivergence,
    softcap: Optional[float],
) -> torch.Tensor:
    """``[3]`` sums over one chunk: divergence, student log-prob and teacher log-prob of the targets."""

    def logps(head: Head, hidden: torch.Tensor) -> torch.Tensor:
        logits = at_least_float32(head(hidden))
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.log_softmax(logits, dim=-1)

    student = logps(student_head, student_hidden)
    with torch.no_grad():
        teacher = logps(teacher_head, teacher_hidden)
    picked = targets.unsqueeze(-1)
    return torch.stack(
        [
            divergence(student, teacher).sum(),
            student.gather(-1, picked).sum(),
            teacher.gather(-1, picked).sum(),
        ]
    )


def chunked_divergence(
    model: torch.nn.Module,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: Head,
    divergence: TokenDivergence,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    chunk_size: int,
    softcap: Optional[float] = None,
    sequence_parallel: Optional[SequenceParallel] = None,
    lockstep: bool = False,
    logits_head: Optional[Head] = None,
) -> DistillSums:
    """One forward of the student's long rows, then the divergence to the teacher at every response position.

    ``teacher_hidden``: :func:`teacher_states` of the short rows; ``teacher_head`` maps them to logits. The student's
    logits come from ``logits_head`` (a frozen head gathered once under ZeRO-3) or ``head``. Each chunk of
    ``chunk_size`` positions is one checkpointed call (recomputed in backward); ``lockstep`` and the
    sequence-parallel filler calls as in :func:`.logps.chunk_plan`. Without sequence parallelism the rows go
    through with ``attention_mask``; with it, each rank feeds its slice (right-padded rows, causal attention).
    """
    sp = sequence_parallel
    keys = response_order(labels)
    ids, mask, positions = input_ids, attention_mask, None
    if sp is not None:
        ids, mask, positions, keys = sp.local_slice(input_ids, None, None, keys)
    hidden = final_hidden_states(model, head, ids, mask, position_ids=positions)
    rows, pos = (keys["order"] != IGNORE_INDEX).nonzero(as_tuple=True)
    student_hidden, targets = hidden[rows, pos], keys["response"][rows, pos]
    paired_teacher = teacher_hidden[keys["order"][rows, pos]]  # in the teacher's own dtype, for its own head
    student_head = logits_head or head
    grad = torch.is_grad_enabled()
    at_least_one, lockstep = sp is not None and grad, lockstep and logits_head is None
    (calls,) = chunk_plan([targets.numel()], chunk_size, hidden.device, at_least_one=at_least_one, lockstep=lockstep)
    sums = hidden.new_zeros(3, dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, targets.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        args = (student_hidden[chunk], paired_teacher[chunk], targets[chunk])
        if grad and hidden.requires_grad:
            part = checkpoint(_chunk_sums, student_head, teacher_head, *args, divergence, softcap, use_reentrant=False)
        else:
            part = _chunk_sums(student_head, teacher_head, *args, divergence, softcap)
        sums = sums + part
    # filler head calls (lockstep, or a slice without response tokens): one token each, added as an exact zero
    filler, filler_target = hidden.reshape(-1, hidden.size(-1))[:1], torch.zeros(1, dtype=torch.long, device=hidden.device)
    for _ in range(calls - -(-targets.numel() // chunk_size)):
        sums = sums + 0.0 * token_logps(student_head, filler, filler_target, chunk_size=1, softcap=softcap).sum()
    tokens = torch.tensor(float(targets.numel()), dtype=sums.dtype, device=hidden.device)
    if sp is not None:
        sums, tokens = group_sum(sums, sp.group), group_sum(tokens, sp.group)
    return DistillSums(divergence=sums[0], student_logps=sums[1], teacher_logps=sums[2].detach(), tokens=tokens)
