"""LongPO's shared document prefix, computed once for both responses, with no ``T x T`` tensor on any kernel.

LongPO (arXiv 2502.13922, eq. 5-7) scores a chosen and a rejected response to the same long input, and its NLL term
runs over the whole chosen sequence. The two rows share their first tokens (document, first instruction, assistant
header), which at 128K tokens are nearly all of each row. Each pair is packed into ONE row

    [ prefix (P) | chosen suffix (C) | rejected suffix (R) ]

whose rejected tokens keep their original positions (``P .. P+R-1``), so RoPE sees every token where two separate
rows would put it. Attention runs as two causal pieces per packed row:

    queries [prefix + chosen suffix]   over keys [prefix + chosen suffix]     square, causal
    queries [rejected suffix]          over keys [prefix + rejected suffix]   causal, aligned bottom-right

(bottom-right: the query at ``P + i`` sees keys up to ``P + i``). Every hidden state equals the one of two
separate forwards while the prefix's layers run once: ``P + C + R`` tokens instead of ``2P + C + R``.

Why two causal pieces and not one mask: the pattern as a ``[T, T]`` mask costs T^2 memory (16 GiB of bool at
128K, before a kernel turns it into a float bias), and flash-attention takes no 4D mask at all. Causal attention,
square or bottom-right, is what every kernel runs natively:

- ``flash_attention_2``: one ``flash_attn_varlen_func`` call, each piece a sequence of its own (``cu_seqlens_q``
  and ``cu_seqlens_k`` differ for the rejected piece, whose prefix keys are gathered next to its own; flash-attn
  aligns causality bottom-right when a sequence has fewer queries than keys);
- ``sdpa``: one call per piece, the rejected piece with torch's ``causal_lower_right`` bias, which SDPA's flash
  and memory-efficient kernels take without materialising it (the CPU math kernel builds an ``[R, P + R]`` mask:
  linear in ``T``);
- ``eager``: the model's own eager function per piece, with the piece's mask (eager is quadratic by nature).

The only copy is the rejected piece's prefix keys and values (per layer, linear in ``T``). Under Ulysses sequence
parallelism (:mod:`.sequence_parallel`) the all-to-all hands this function every token of its heads, so the
pieces are cut from the whole packed row there too: the shared prefix stays on under SP.

How a forward gets here: :func:`install_shared_prefix_attention` wraps the model's attention function in
transformers' registry. A call that carries ``shared_prefix=`` (a :class:`PrefixLayout`, passed as a forward
keyword that transformers hands down to every attention call, and that gradient checkpointing replays) runs the
pieces; every other call (short rows, reference passes, other models) goes to the original function unchanged.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ..attention_kernels import ATTENTION_KERNELS
from ..errors import ConfigError
from .logps import chosen_nll, scored_sums

IGNORE_INDEX = -100
EAGER_NAME = "longpo_shared_prefix_eager"  # eager has no registry entry of its own to wrap
# transformers' attention name -> how the pieces run on it
KERNELS = {k.implementation: k.shared_prefix for k in ATTENTION_KERNELS.values() if k.shared_prefix} | {EAGER_NAME: "eager"}


@dataclass(frozen=True)
class PrefixLayout:
    """Lengths ``(prefix, chosen suffix, rejected suffix)`` of each packed row; padding follows them."""

    rows: tuple[tuple[int, int, int], ...]

    def pieces(self) -> list[tuple[int, tuple[int, int], list[tuple[int, int]]]]:
        """``(row, query range, key ranges)`` of every non-empty attention piece, in packed order."""
        out = []
        for b, (p, c, r) in enumerate(self.rows):
            out.append((b, (0, p + c), [(0, p + c)]))
            if r:
                out.append((b, (p + c, p + c + r), [(0, p), (p + c, p + c + r)]))
        return out


def pack_shared_prefix(
    chosen: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rejected: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> dict[str, Any]:
    """Pack each right-padded ``(input_ids, attention_mask, labels)`` chosen/rejected pair into one row.

    The prefix is the longest common token prefix of the two rows. Returns ``input_ids`` and ``position_ids``
    ``[n, W]``, the ``layout`` (:class:`PrefixLayout`), and next-token targets by packed position (``-100`` where
    nothing is scored): ``chosen`` and ``rejected`` (response tokens of each side; the last prefix position predicts
    a token of both, hence two tensors) and ``full`` (every chosen token after the first: the full-sequence NLL).
    """
    (c_ids, c_mask, c_labels), (r_ids, r_mask, r_labels) = chosen, rejected
    n, device = c_ids.size(0), c_ids.device
    rows, lengths = [], []
    for i in range(n):
        lc, lr = int(c_mask[i].sum()), int(r_mask[i].sum())
        m = min(lc, lr)
        differ = (c_ids[i, :m] != r_ids[i, :m]).nonzero()
        p = int(differ[0]) if differ.numel() else m
        rows.append((p, lc - p, lr - p))
        lengths.append((lc, lr))
    width = max(p + c + r for p, c, r in rows)
    ids = c_ids.new_zeros(n, width)
    pos = torch.zeros(n, width, dtype=torch.long, device=device)
    targets = {k: torch.full((n, width), IGNORE_INDEX, dtype=torch.long, device=device) for k in ("chosen", "rejected", "full")}
    for i, ((p, _, r), (lc, lr)) in enumerate(zip(rows, lengths)):
        ids[i, :lc] = c_ids[i, :lc]
        ids[i, lc : lc + r] = r_ids[i, p:lr]
        pos[i, :lc] = torch.arange(lc, device=device)
        pos[i, lc : lc + r] = torch.arange(p, lr, device=device)
        # position k predicts token k+1 of its own side; the rejected side's token p is predicted by prefix position p-1
        targets["chosen"][i, : lc - 1] = c_labels[i, 1:lc]
        targets["full"][i, : lc - 1] = c_ids[i, 1:lc]
        rejected_next = r_labels[i, 1:lr]  # predicted by original positions 0 .. lr-2
        k = min(p, lr - 1)
        targets["rejected"][i, :k] = rejected_next[:k]
        targets["rejected"][i, lc : lc + r - 1] = rejected_next[p:]
    return {"input_ids": ids, "position_ids": pos, "layout": PrefixLayout(tuple(rows)), **targets}


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sdpa_piece(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: Optional[float], dropout: float) -> torch.Tensor:
    """One piece through SDPA. The chosen piece (as many keys as queries, no mask) lets SDPA read grouped K/V
    heads in place where transformers' own SDPA path does (``enable_gqa``); the rejected piece's bottom-right
    causal bias is kept off that path (not every kernel takes the two together), so its K/V heads are repeated."""
    from torch.nn.attention.bias import causal_lower_right
    from transformers.integrations.sdpa_attention import use_gqa_in_sdpa

    groups = q.size(1) // k.size(1)
    if q.size(2) == k.size(2):
        gqa = groups > 1 and use_gqa_in_sdpa(None, k)
        if not gqa:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        extra = {"enable_gqa": True} if gqa else {}
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, **extra)
    else:
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        bias = causal_lower_right(q.size(2), k.size(2))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2)


def _eager_piece(
    module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: Optional[float], dropout: float
) -> torch.Tensor:
    eager = importlib.import_module(type(module).__module__).eager_attention_forward
    lq, lk = q.size(2), k.size(2)
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)  # bottom-right causal
    mask = torch.zeros(lq, lk, dtype=q.dtype, device=q.device).masked_fill(~allowed, torch.finfo(q.dtype).min)
    out, _ = eager(module, q, k, v, mask[None, None], scaling=scaling, dropout=dropout)
    return out


def _flash_dtype(query: torch.Tensor, module: torch.nn.Module) -> Optional[torch.dtype]:
    """The half dtype flash-attention must get when a float32 query reaches it (fp32 LoRA weights or norms in a
    bf16 run), or ``None``: the rule of transformers' own flash-attention path, so both paths compute alike."""
    if query.dtype != torch.float32:
        return None
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    if hasattr(module.config, "_is_quantized"):
        return module.config.dtype
    return next(m for m in module.modules() if isinstance(m, torch.nn.Linear)).weight.dtype


def _flash_pieces(
    qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor], scaling: Optional[float], dropout: float
) -> list[torch.Tensor]:
    """All pieces in one varlen flash-attention call; pieces are ``[1, heads, len, dim]``."""
    from flash_attn import flash_attn_varlen_func

    def flat(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        lens = [t.size(2) for t in parts]
        cu = torch.tensor([0, *lens], dtype=torch.int32, device=parts[0].device).cumsum(0, dtype=torch.int32)
        return torch.cat([t[0].transpose(0, 1) for t in parts]), cu, max(lens)

    (q, cu_q, max_q), (k, cu_k, max_k), (v, _, _) = flat(qs), flat(ks), flat(vs)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout, softmax_scale=scaling, causal=True)
    return list(out.split([t.size(2) for t in qs]))


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: PrefixLayout,
    kernel: str,
    *,
    scaling: Optional[float] = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention of packed rows ``[B, heads, W, dim]`` piece by piece; returns ``[B, W, heads, dim]`` (zeros at padding)."""
    qs, ks, vs, owners = [], [], [], []
    for b, (q0, q1), key_ranges in layout.pieces():
        owners.append(b)
        qs.append(query[b : b + 1, :, q0:q1])
        ks.append(torch.cat([key[b : b + 1, :, s:e] for s, e in key_ranges], dim=2))
        vs.append(torch.cat([value[b : b + 1, :, s:e] for s, e in key_ranges], dim=2))
    if kernel == "fa2":
        half = _flash_dtype(query, module)
        if half is not None:
            qs, ks, vs = ([t.to(half) for t in parts] for parts in (qs, ks, vs))
        outs = [o.unsqueeze(0) for o in _flash_pieces(qs, ks, vs, scaling, dropout)]
    elif kernel == "sdpa":
        outs = [_sdpa_piece(q, k, v, scaling, dropout) for q, k, v in zip(qs, ks, vs)]
    else:
        outs = [_eager_piece(module, q, k, v, scaling, dropout) for q, k, v in zip(qs, ks, vs)]
    rows = []
    width = query.size(2)
    for b in range(query.size(0)):
        parts = [o for o, owner in zip(outs, owners) if owner == b]
        used = sum(o.size(1) for o in parts)
        parts.append(query.new_zeros(1, width - used, query.size(1), query.size(3)))
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows)


def _wrap(original: Optional[Callable[..., Any]], kernel: str) -> Callable[..., Any]:
    """The registry entry: calls with ``shared_prefix=`` run the pieces, all others the original function."""

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        *args: Any,
        shared_prefix: Optional[PrefixLayout] = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if shared_prefix is None:
            function = original or importlib.import_module(type(module).__module__).eager_attention_forward
            return function(module, query, key, value, attention_mask, *args, **kwargs)
        if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
            raise ConfigError("s2l_shared_prefix: sliding-window and soft-capped attention are not supported; set it to false")
        out = shared_prefix_attention(
            module, query, key, value, shared_prefix, kernel, scaling=kwargs.get("scaling"), dropout=kwargs.get("dropout", 0.0)
        )
        return out, None

    attention.shared_prefix_kernel = kernel  # marks the wrapper: installing twice is a no-op
    return attention


def install_shared_prefix_attention(model: torch.nn.Module) -> str:
    """Route the model's attention through :func:`_wrap`; returns the kernel (``sdpa``, ``fa2`` or ``eager``).

    sdpa and flash-attention are wrapped in place in transformers' registry (their names keep every branch the
    model and the toolkit take on them). Eager has no registry entry: the model moves to a registered name whose
    mask function is eager's. Sequence parallelism wraps what this leaves (:func:`.wiring.wire_model` keeps the
    order and puts the registry entry back).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    sliding = sliding or "sliding_attention" in (getattr(config, "layer_types", None) or ())
    if sliding or getattr(config, "attn_logit_softcapping", None):
        raise ConfigError("s2l_shared_prefix: sliding-window and soft-capped attention are not supported; set it to false")
    name = model.config._attn_implementation
    kernel = KERNELS.get(name)
    if kernel is None:
        raise ConfigError(
            f"s2l_shared_prefix: attention {name!r} is not supported "
            f"(flash_attn: {', '.join(k for k, v in ATTENTION_KERNELS.items() if v.shared_prefix)}); "
            "set s2l_shared_prefix: false"
        )
    if name in ("eager", EAGER_NAME):
        if EAGER_NAME not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(EAGER_NAME, _wrap(None, "eager"))
            ALL_MASK_ATTENTION_FUNCTIONS.register(EAGER_NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
        model.set_attn_implementation(EAGER_NAME)
    elif not hasattr(ALL_ATTENTION_FUNCTIONS[name], "shared_prefix_kernel"):
        ALL_ATTENTION_FUNCTIONS[name] = _wrap(ALL_ATTENTION_FUNCTIONS[name], kernel)
    return kernel


def shared_prefix_logps(
    model: torch.nn.Module,
    head: torch.nn.Module,
    chosen: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rejected: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    nll_scope: str = "full",
    **kw: Any,
) -> dict[str, torch.Tensor]:
    """LongPO's policy pass over packed pairs: response ``logps`` and ``lengths`` of the ``2n`` rows (chosen
    first) and the chosen rows' token-mean ``nll``, equal to :func:`..logps.sequence_logps` on the stacked rows
    with ``nll_rows = n``. Keywords: :func:`..logps.scored_sums` (sequence parallelism included)."""
    packed = pack_shared_prefix(chosen, rejected)
    targets = {k: packed[k] for k in ("chosen", "rejected", "full") if k != "full" or nll_scope == "full"}
    sums = scored_sums(
        model,
        head,
        packed["input_ids"],
        targets,
        # an all-ones mask, not None: with None, transformers reads the restarting positions as packed sequences
        # and builds a [T, T] mask; with all ones it builds none for sdpa and flash-attention
        attention_mask=torch.ones_like(packed["input_ids"]),
        position_ids=packed["position_ids"],
        shared_prefix=packed["layout"],
        **kw,
    )
    (chosen_sums, chosen_counts), (rejected_sums, rejected_counts) = sums["chosen"], sums["rejected"]
    response = (torch.cat([chosen_sums, rejected_sums]), torch.cat([chosen_counts, rejected_counts]))
    nll = chosen_nll({**sums, "response": response}, chosen_sums.size(0), nll_scope)
    return {"logps": response[0], "lengths": response[1], "nll": nll}
