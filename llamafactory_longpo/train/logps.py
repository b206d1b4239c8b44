"""How log-probabilities are gathered, without ever building ``[seq_len, vocab]`` logits.

The model runs its usual forward (through DDP/DeepSpeed/PEFT wrappers, so gradient hooks and
parameter gathering work), but a pre-hook on the LM head captures the final hidden states and hands
the head an empty slice. The head is then applied only where it is needed (response positions, or
every non-pad position for a full-sequence NLL) in chunks of ``chunk_size`` tokens, each chunk
recomputed in backward, so the head's memory grows with the chunk, not with the sequence.

Definitions (SPEC notation): ``logp(y|x) = sum_t log p(y_t | x, y_<t)`` over the label tokens of a
row (labels != -100, shifted by one as in causal LM training).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield captured
    finally:
        handle.remove()


def final_hidden_states(
    model: torch.nn.Module, head: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """``[B, L, H]`` hidden states that the LM head would see, from one ordinary model forward."""
    with capture_head_input(head) as captured:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of the LM head per forward, saw {len(captured)}")
    return captured[0]


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, softcap: Optional[float]) -> torch.Tensor:
    logits = head(hidden).float()
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


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, positions and targets of every label token: position ``p`` predicts ``labels[:, p+1]``."""
    shifted = labels[:, 1:]
    rows, pos = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, pos, shifted[rows, pos]


def token_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, positions and targets of every non-pad token after the first (full-sequence NLL)."""
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    rows, pos = valid.nonzero(as_tuple=True)
    return rows, pos, input_ids[:, 1:][rows, pos]


def per_row_sums(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    targets: torch.Tensor,
    num_rows: int,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    softcap: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs ``[num_rows]`` and token counts ``[num_rows]`` at the given positions."""
    logps = token_logps(head, hidden[rows, pos], targets, chunk_size=chunk_size, softcap=softcap)
    sums = torch.zeros(num_rows, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)
    counts = torch.zeros(num_rows, dtype=torch.long, device=rows.device).index_add(0, rows, torch.ones_like(rows))
    return sums, counts


def sequence_logps(
    model: torch.nn.Module,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    *,
    nll_rows: int = 0,
    nll_scope: str = "response",
    chunk_size: int = DEFAULT_CHUNK,
    softcap: Optional[float] = None,
) -> dict[str, torch.Tensor]:
    """One forward: per-row response log-prob sums and lengths, and optionally a token-mean NLL.

    ``nll_rows`` > 0 adds ``nll`` = token-mean NLL over the first ``nll_rows`` rows; ``nll_scope`` is
    ``response`` (label tokens) or ``full`` (every non-pad token, the document included).
    """
    hidden = final_hidden_states(model, head, input_ids, attention_mask)
    batch = input_ids.size(0)
    rows, pos, targets = label_positions(labels)
    logps, lengths = per_row_sums(head, hidden, rows, pos, targets, batch, chunk_size=chunk_size, softcap=softcap)
    out = {"logps": logps, "lengths": lengths}
    if nll_rows:
        if nll_scope == "response":
            nll_sum, nll_count = -logps[:nll_rows].sum(), lengths[:nll_rows].sum()
        else:
            r, p, t = token_positions(input_ids[:nll_rows], attention_mask[:nll_rows])
            sums, counts = per_row_sums(head, hidden[:nll_rows], r, p, t, nll_rows, chunk_size=chunk_size, softcap=softcap)
            nll_sum, nll_count = -sums.sum(), counts.sum()
        out["nll_sum"], out["nll_count"] = nll_sum, nll_count
        out["nll"] = nll_sum / nll_count.clamp(min=1)
    return out


def full_logits_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation on materialized ``[B, L, V]`` logits (used by tests and the plain path)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1].float()
    mask = labels != IGNORE_INDEX
    labels[~mask] = 0
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1), mask.sum(-1)
