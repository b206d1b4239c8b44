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
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .sequence_parallel import SequenceParallel, group_sum

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
    must make the same number of calls: the maximum over ranks (one tiny all-reduce). Callers pass it off
    when the logits come from a head gathered once (``logits_head``): its calls are collective-free.
    """
    plan = [max(int(at_least_one), -(-c // chunk_size)) for c in counts]
    if lockstep and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        most = torch.tensor(plan, dtype=torch.long, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        plan = most.tolist()
    return plan


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
    sequence_parallel: Optional[SequenceParallel] = None,
    lockstep: bool = False,
    logits_head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """One forward: per-row response log-prob sums and lengths, and optionally a token-mean NLL.

    ``nll_rows`` > 0 adds ``nll`` = token-mean NLL over the first ``nll_rows`` rows; ``nll_scope`` is
    ``response`` (label tokens) or ``full`` (every non-pad token, the document included).

    With ``sequence_parallel`` each rank of the group feeds one contiguous slice of every (right-padded)
    row, the model's attention exchanges the rest (Ulysses), and the sums and counts are added up over
    the group: the same outputs as one process feeding whole rows. ``lockstep``: see :func:`chunk_plan`.
    ``logits_head``: what computes logits from hidden states when it is not ``head`` itself (a frozen head
    gathered once under ZeRO-3); ``head`` is still the module whose input is captured.
    """
    batch = input_ids.size(0)
    targets = {"response": next_token_targets(labels)}
    if nll_rows and nll_scope == "full":
        targets["full"] = full_sequence_targets(input_ids[:nll_rows], attention_mask[:nll_rows])
    sp = sequence_parallel
    if sp is None:
        hidden = final_hidden_states(model, head, input_ids, attention_mask)
    else:
        pad = -input_ids.size(1) % sp.size
        if pad:
            input_ids = F.pad(input_ids, (0, pad), value=0)
            targets = {k: F.pad(t, (0, pad), value=IGNORE_INDEX) for k, t in targets.items()}
        width = input_ids.size(1) // sp.size
        local = slice(sp.rank * width, (sp.rank + 1) * width)
        positions = torch.arange(local.start, local.stop, device=input_ids.device).expand(batch, -1).contiguous()  # all-gathered
        targets = {k: t[:, local] for k, t in targets.items()}
        hidden = final_hidden_states(model, head, input_ids[:, local], None, position_ids=positions)

    names = list(targets)
    plan = dict(
        zip(
            names,
            chunk_plan(
                [int((targets[k] != IGNORE_INDEX).sum()) for k in names],
                chunk_size,
                hidden.device,
                at_least_one=sp is not None and torch.is_grad_enabled(),
                lockstep=lockstep and logits_head is None,
            ),
        )
    )

    def sums(name: str, rows_: int) -> tuple[torch.Tensor, torch.Tensor]:
        r, p, t = target_positions(targets[name])
        total, count = per_row_sums(
            logits_head or head, hidden[:rows_], r, p, t, rows_, chunk_size=chunk_size, softcap=softcap, min_chunks=plan[name]
        )
        return (total, count) if sp is None else (group_sum(total, sp.group), group_sum(count, sp.group))

    logps, lengths = sums("response", batch)
    out = {"logps": logps, "lengths": lengths}
    if nll_rows:
        if nll_scope == "response":
            nll_sum, nll_count = -logps[:nll_rows].sum(), lengths[:nll_rows].sum()
        else:
            row_sums, counts = sums("full", nll_rows)
            nll_sum, nll_count = -row_sums.sum(), counts.sum()
        out["nll_sum"], out["nll_count"] = nll_sum, nll_count
        out["nll"] = nll_sum / nll_count.clamp(min=1)
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
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True).logits.float()
    logp = logits[:, :-1].log_softmax(-1)
    tgt = labels[:, 1:]
    valid = tgt != IGNORE_INDEX
    per_token = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    out = {"logps": (per_token * valid).sum(-1), "lengths": valid.sum(-1)}
    if nll_rows:
        if nll_scope == "full":
            ok = (attention_mask[:nll_rows, 1:] * attention_mask[:nll_rows, :-1]).bool()
            tok = logp[:nll_rows].gather(-1, input_ids[:nll_rows, 1:].unsqueeze(-1)).squeeze(-1)
        else:
            ok, tok = valid[:nll_rows], per_token[:nll_rows]
        out["nll"] = -(tok * ok).sum() / ok.sum().clamp(min=1)
    return out


def pack_shared_prefix(
    chosen_ids: torch.Tensor,
    chosen_mask: torch.Tensor,
    chosen_labels: torch.Tensor,
    rejected_ids: torch.Tensor,
    rejected_mask: torch.Tensor,
    rejected_labels: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Pack each chosen/rejected pair into ONE row ``[prefix | chosen suffix | rejected suffix]``.

    The prefix is the longest common token prefix of the two (the document, the first instruction and
    the assistant header). Rejected-suffix tokens keep their original positions and see the prefix and
    their own suffix only (a 4D mask), so every hidden state equals the one of two separate forwards,
    while the prefix is computed once: ``P + C + R`` tokens instead of ``2P + C + R``.

    Returns ``input_ids``/``position_ids`` ``[n, T]``, ``attention_mask`` ``[n, 1, T, T]`` (bool), and the
    gather plan: ``rows``/``pos``/``targets``/``out_rows`` for the response log-probs of the ``2n`` rows
    (chosen ``0..n-1``, rejected ``n..2n-1``), and ``nll_*`` for every non-pad chosen token.
    """
    n = chosen_ids.size(0)
    device = chosen_ids.device
    seqs, positions, branches = [], [], []
    plan: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("rows", "pos", "targets", "out_rows", "nll_rows", "nll_pos", "nll_targets")
    }
    for i in range(n):
        lc, lr = int(chosen_mask[i].sum()), int(rejected_mask[i].sum())  # right padding: valid tokens first
        ci, ri = chosen_ids[i, :lc], rejected_ids[i, :lr]
        m = min(lc, lr)
        differ = (ci[:m] != ri[:m]).nonzero()
        shared = int(differ[0]) if differ.numel() else m
        seqs.append(torch.cat([ci, ri[shared:]]))
        positions.append(torch.cat([torch.arange(lc, device=device), torch.arange(shared, lr, device=device)]))
        branches.append(
            torch.cat(
                [
                    torch.zeros(shared, dtype=torch.long, device=device),
                    torch.ones(lc - shared, dtype=torch.long, device=device),
                    torch.full((lr - shared,), 2, dtype=torch.long, device=device),
                ]
            )
        )
        # packed index of original token k: chosen k -> k; rejected k -> k if k < shared else lc + k - shared
        rej_index = torch.arange(lr, device=device)
        rej_index = torch.where(rej_index < shared, rej_index, lc + rej_index - shared)
        for side, labels, index, length in (
            (0, chosen_labels[i], torch.arange(lc, device=device), lc),
            (1, rejected_labels[i], rej_index, lr),
        ):
            k = (labels[1:length] != IGNORE_INDEX).nonzero(as_tuple=True)[0] + 1
            plan["rows"].append(torch.full_like(k, i))
            plan["pos"].append(index[k - 1])
            plan["targets"].append(labels[k])
            plan["out_rows"].append(torch.full_like(k, side * n + i))
        k = torch.arange(1, lc, device=device)
        plan["nll_rows"].append(torch.full_like(k, i))
        plan["nll_pos"].append(k - 1)
        plan["nll_targets"].append(ci[k])
    width = max(len(s) for s in seqs)
    ids = torch.zeros(n, width, dtype=chosen_ids.dtype, device=device)
    pos = torch.zeros(n, width, dtype=torch.long, device=device)
    branch = torch.full((n, width), 3, dtype=torch.long, device=device)  # 3 = padding: sees only itself
    for i, (s, p, b) in enumerate(zip(seqs, positions, branches)):
        ids[i, : len(s)], pos[i, : len(s)], branch[i, : len(s)] = s, p, b
    causal = pos.unsqueeze(2) >= pos.unsqueeze(1)  # [n, q, k]
    same = (branch.unsqueeze(2) == branch.unsqueeze(1)) | (branch.unsqueeze(1) == 0)
    mask = causal & same
    mask |= torch.eye(width, dtype=torch.bool, device=device).unsqueeze(0)  # padding rows attend to themselves
    out = {"input_ids": ids, "position_ids": pos, "attention_mask": mask.unsqueeze(1)}
    out.update({k: torch.cat(v) for k, v in plan.items()})
    return out


def shared_prefix_logps(
    model: torch.nn.Module,
    head: torch.nn.Module,
    chosen: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rejected: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    nll_scope: str = "full",
    chunk_size: int = DEFAULT_CHUNK,
    softcap: Optional[float] = None,
    lockstep: bool = False,
    logits_head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """LongPO's policy pass with the shared prefix computed once; same outputs as :func:`sequence_logps`
    on the ``2n`` stacked rows with ``nll_rows = n``. ``lockstep``, ``logits_head``: as in :func:`sequence_logps`."""
    n = chosen[0].size(0)
    packed = pack_shared_prefix(*chosen, *rejected)
    hidden = final_hidden_states(model, head, packed["input_ids"], packed["attention_mask"], position_ids=packed["position_ids"])
    counts = [packed["rows"].numel()] + ([packed["nll_rows"].numel()] if nll_scope != "response" else [])
    plan = chunk_plan(counts, chunk_size, hidden.device, at_least_one=False, lockstep=lockstep and logits_head is None)
    logps, lengths = per_row_sums(
        logits_head or head,
        hidden,
        packed["rows"],
        packed["pos"],
        packed["targets"],
        2 * n,
        out_rows=packed["out_rows"],
        chunk_size=chunk_size,
        softcap=softcap,
        min_chunks=plan[0],
    )
    out = {"logps": logps, "lengths": lengths}
    if nll_scope == "response":
        nll_sum, nll_count = -logps[:n].sum(), lengths[:n].sum()
    else:
        sums, counts = per_row_sums(
            logits_head or head,
            hidden,
            packed["nll_rows"],
            packed["nll_pos"],
            packed["nll_targets"],
            n,
            chunk_size=chunk_size,
            softcap=softcap,
            min_chunks=plan[1],
        )
        nll_sum, nll_count = -sums.sum(), counts.sum()
    out["nll"] = nll_sum / nll_count.clamp(min=1)
    return out
