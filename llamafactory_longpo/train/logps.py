"""How log-probabilities are gathered, without ever building ``[seq_len, vocab]`` logits.

The model runs its usual forward (through DDP/DeepSpeed/PEFT wrappers, so gradient hooks and
parameter gathering work), but a pre-hook on the LM head captures the final hidden states and hands
the head an empty slice. The head is then applied only where it is needed (response positions, or
every non-pad position for a full-sequence NLL) in chunks of ``chunk_size`` tokens, each chunk
recomputed in backward, so the head's memory grows with the chunk, not with the sequence.

Definitions (the papers' notation): ``logp(y|x) = sum_t log p(y_t | x, y_<t)`` over the label tokens of a
row (labels != -100, shifted by one as in causal LM training).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .sequence_parallel import SequenceParallel, group_sum
from .zero3 import lockstep_calls

IGNORE_INDEX = -100
DEFAULT_CHUNK = 4096


@contextmanager
def capture_head_input(head: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, calls to ``head`` record their input and compute logits for 0 positions."""
    captured: list[torch.Tensor] = []

    def pre_hook(_module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        captured.append(hidden)
        return (hidden[..., :0, :],) + tuple(args[1:])

    # first among the head's pre-hooks: capture the hidden states as the model made them, before wrappers
    # such as ZeRO-3's backward bookkeeping see (and wrap) the head's input
    handle = head.register_forward_pre_hook(pre_hook, prepend=True)
    try:
        yield captured
    finally:
        handle.remove()


def final_hidden_states(
    model: torch.nn.Module,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    **kwargs: torch.Tensor,
) -> torch.Tensor:
    """``[B, L, H]`` hidden states that the LM head would see, from one ordinary model forward."""
    with capture_head_input(head) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True, **kwargs)
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of the LM head per forward, saw {len(captured)}")
    return captured[0]


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax input precision: half precision goes up to float32; float64 (exactness tests) stays."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    logits = at_least_float32(head(hidden))
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.gather(F.log_softmax(logits, dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def token_logps(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """``log p(target)`` for ``[N, H]`` hidden states, ``chunk_size`` tokens of logits at a time.

    With gradients enabled each chunk is recomputed in backward (non-reentrant checkpoint), so only
    one chunk of ``[chunk, vocab]`` logits exists at any moment.
    """
    fn: Callable[..., torch.Tensor] = _chunk_logps
    outs = []
    for start in range(0, hidden.size(0), chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            outs.append(checkpoint(fn, head, h, t, softcap, use_reentrant=False))
        else:
            outs.append(fn(head, h, t, softcap))
    return torch.cat(outs) if outs else hidden.new_zeros(0, dtype=torch.float32)


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` targets by position: position ``p`` predicts ``labels[:, p+1]``; the last predicts nothing.

    Shifting before any split keeps each target with the hidden state that predicts it, so a row cut
    into slices (sequence parallelism) loses no token at a slice boundary.
    """
    return torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), IGNORE_INDEX)], dim=1)


def full_sequence_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Targets of a full-sequence NLL, by predicting position: every non-pad token after the first."""
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    shifted = torch.where(valid, input_ids[:, 1:], IGNORE_INDEX)
    return torch.cat([shifted, shifted.new_full((shifted.size(0), 1), IGNORE_INDEX)], dim=1)


def target_positions(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, positions and target ids of every scored position of a ``[B, L]`` target tensor."""
    rows, pos = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, pos, targets[rows, pos]


def per_row_sums(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    targets: torch.Tensor,
    num_rows: int,
    *,
    out_rows: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK,
    softcap: Optional[float] = None,
    min_chunks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs ``[num_rows]`` and token counts ``[num_rows]`` at the given positions.

    ``hidden[rows, pos]`` predicts ``targets``; each token is added to ``out_rows`` (default ``rows``).
    At least ``min_chunks`` head calls are made (:func:`chunk_plan`).
    """
    out_rows = rows if out_rows is None else out_rows
    logps = token_logps(head, hidden[rows, pos], targets, chunk_size=chunk_size, softcap=softcap)
    sums = torch.zeros(num_rows, dtype=logps.dtype, device=logps.device).index_add(0, out_rows, logps)
    counts = torch.zeros(num_rows, dtype=torch.long, device=rows.device).index_add(0, out_rows, torch.ones_like(out_rows))
    # filler head calls (see chunk_plan): one token each, added as an exact zero, recomputed in backward like the rest
    filler, filler_target = hidden.reshape(-1, hidden.size(-1))[:1], torch.zeros(1, dtype=torch.long, device=rows.device)
    for _ in range(min_chunks - -(-rows.numel() // chunk_size)):
        sums = sums + 0.0 * token_logps(head, filler, filler_target, chunk_size=1, softcap=softcap).sum()
    return sums, counts


def chunk_plan(counts: list[int], chunk_size: int, device: torch.device, *, at_least_one: bool, lockstep: bool) -> list[int]:
    """How many head calls each gather of a pass makes (``counts``: scored tokens of each gather).

    ``at_least_one``: a sequence-parallel slice may hold no scored token, yet its keys and values feed the
    other slices, so it still needs a path from the loss back through its forward (and its all-to-alls).
    ``lockstep``: under ZeRO-3 every head call gathers the head's weight across all ranks, so every rank
    must make the same number of calls: the maximum over ranks (:func:`.zero3.lockstep_calls`). Callers pass
    it off when the logits come from a head gathered once (``logits_head``): its calls are collective-free.
    """
    plan = [max(int(at_least_one), -(-c // chunk_size)) for c in counts]
    return lockstep_calls(plan, device) if lockstep else plan


def scored_sums(
    model: torch.nn.Module,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    targets: dict[str, torch.Tensor],
    *,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK,
    softcap: Optional[float] = None,
    sequence_parallel: Optional[SequenceParallel] = None,
    lockstep: bool = False,
    logits_head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    **forward_kwargs: object,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One forward of ``input_ids``; per-row log-prob sums and token counts for each ``[rows, L]`` target tensor.

    ``targets[name][b, p]`` is the token that position ``p`` of row ``b`` predicts (``-100``: not scored); a
    tensor may cover only the first rows. With ``sequence_parallel`` each rank of the group feeds its slice of
    the (right-padded) rows, the model's attention exchanges the rest (Ulysses), and the sums and counts are
    added up over the group: the same outputs as one process feeding whole rows. ``lockstep``: see
    :func:`chunk_plan`. ``logits_head``: what computes logits from hidden states when it is not ``head`` itself (a
    frozen head gathered once under ZeRO-3); ``head`` is still the module whose input is captured.
    ``forward_kwargs`` go to the model's forward (and on to its attention functions).
    """
    sp = sequence_parallel
    if sp is not None:
        input_ids, attention_mask, position_ids, targets = sp.local_slice(input_ids, attention_mask, position_ids, targets)
    hidden = final_hidden_states(model, head, input_ids, attention_mask, position_ids=position_ids, **forward_kwargs)
    names = list(targets)
    plan = chunk_plan(
        [int((targets[k] != IGNORE_INDEX).sum()) for k in names],
        chunk_size,
        hidden.device,
        at_least_one=sp is not None and torch.is_grad_enabled(),
        lockstep=lockstep and logits_head is None,
    )
    out = {}
    for name, calls in zip(names, plan):
        rows = targets[name].size(0)
        r, p, t = target_positions(targets[name])
        total, count = per_row_sums(
            logits_head or head, hidden[:rows], r, p, t, rows, chunk_size=chunk_size, softcap=softcap, min_chunks=calls
        )
        out[name] = (total, count) if sp is None else (group_sum(total, sp.group), group_sum(count, sp.group))
    return out


def token_mean_nll(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over all tokens of the given rows."""
    return -sums.sum() / counts.sum().clamp(min=1)


def scored_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *, nll_rows: int = 0, nll_scope: str = "response"
) -> dict[str, torch.Tensor]:
    """What one pass scores: every row's response tokens (``response``), and, for a ``full``-scope NLL over the
    first ``nll_rows`` rows, their every non-pad token (``full``); see :func:`chosen_nll`."""
    targets = {"response": next_token_targets(labels)}
    if nll_rows and nll_scope == "full":
        targets["full"] = full_sequence_targets(input_ids[:nll_rows], attention_mask[:nll_rows])
    return targets


def chosen_nll(sums: dict[str, tuple[torch.Tensor, torch.Tensor]], nll_rows: int, nll_scope: str) -> torch.Tensor:
    """LongPO's NLL term (arXiv 2502.13922, eq. 7): the token-mean negative log-likelihood of the chosen rows (the
    first ``nll_rows``), over their response tokens (``response``) or every non-pad token (``full``, as published).

    ``sums``: the per-row log-prob sums and token counts of the targets of :func:`scored_targets`.
    """
    if nll_scope == "full":
        return token_mean_nll(*sums["full"])
    logps, lengths = sums["response"]
    return token_mean_nll(logps[:nll_rows], lengths[:nll_rows])


def sequence_logps(
    model: torch.nn.Module,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    nll_rows: int = 0,
    nll_scope: str = "response",
    sequence_parallel: Optional[SequenceParallel] = None,
    **kw: object,
) -> dict[str, torch.Tensor]:
    """One forward: per-row response log-prob sums and lengths, and optionally a token-mean NLL.

    ``nll_rows`` > 0 adds ``nll`` = token-mean NLL over the first ``nll_rows`` rows; ``nll_scope`` is
    ``response`` (label tokens) or ``full`` (every non-pad token, the document included). Other keywords:
    :func:`scored_sums`. Rows are right-padded and attention is causal, so under sequence parallelism no mask
    is fed (a slice's mask would describe the slice only).
    """
    targets = scored_targets(input_ids, attention_mask, labels, nll_rows=nll_rows, nll_scope=nll_scope)
    mask = attention_mask if sequence_parallel is None else None
    sums = scored_sums(model, head, input_ids, targets, attention_mask=mask, sequence_parallel=sequence_parallel, **kw)
    logps, lengths = sums["response"]
    out = {"logps": logps, "lengths": lengths}
    if nll_rows:
        out["nll"] = chosen_nll(sums, nll_rows, nll_scope)
    return out


def plain_sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    nll_rows: int = 0,
    nll_scope: str = "response",
) -> dict[str, torch.Tensor]:
    """The straightforward path (``s2l_response_logits: false``): full ``[B, L, V]`` fp32 logits, as the
    toolkit's DPO trainer computes them. Kept for benchmarks and as the reference of exactness tests."""
    logits = at_least_float32(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True).logits)
    logp = logits.log_softmax(-1)

    def sums(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        valid = targets != IGNORE_INDEX
        rows = logp if targets.size(0) == logp.size(0) else logp[: targets.size(0)]  # a slice's backward copies [B, L, V]
        per_token = rows.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (per_token * valid).sum(-1), valid.sum(-1)

    targets = scored_targets(input_ids, attention_mask, labels, nll_rows=nll_rows, nll_scope=nll_scope)
    scored = {k: sums(t) for k, t in targets.items()}
    logps, lengths = scored["response"]
    out = {"logps": logps, "lengths": lengths}
    if nll_rows:
        out["nll"] = chosen_nll(scored, nll_rows, nll_scope)
    return out
