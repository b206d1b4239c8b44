"""Decoder MLPs run in sequence tiles (``s2l_tiled_mlp``), so no step holds a ``[T, intermediate]`` tensor.

A gated MLP's intermediate is several times the hidden size (18,944 against 3,584 for Qwen2.5-7B), and when a
checkpointed layer is recomputed in backward its gate, up and activation tensors for all ``T`` tokens are alive
together: for 262,144 tokens on a rank that is about 28 GiB for one layer, more than half of what all 28
checkpointed inputs hold (49 GiB). Arctic Long Sequence Training (arXiv 2506.13996) runs the MLP over slices of
the sequence instead; this module does the same. The LM head, the other per-token piece wider than the hidden
size, is already applied in chunks of ``s2l_logits_chunk`` tokens (:mod:`.logps`).

Each tile is a non-reentrant ``torch.utils.checkpoint`` of the MLP's own forward: it keeps only its slice of the
input, and in backward recomputes its ``[tile, intermediate]`` tensors one tile at a time. Tiles are
``hidden_size`` tokens, DeepSpeed's choice (its intermediate is then the size of one MLP weight).

Why not DeepSpeed's ``TiledMLP``: its backward runs ``torch.autograd.backward`` once per tile, so each weight's
gradient is accumulated ``tiles`` times in one step. DeepSpeed's ZeRO is told to wait for the last tile, but DDP
is not: DDP all-reduces a weight's gradient at the first accumulation. Measured here on two gloo ranks (a 8-32-8
MLP in 4 tiles under ``DistributedDataParallel``): the weight gradients differed from the single-process ones by
up to 1.98, silently. A checkpoint per tile stays inside the one autograd graph, where each weight's gradient is
accumulated once; under DDP the same check agrees to 1e-6.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .zero3 import lockstep_calls, partitioned


def tile_count(tokens: int, tile_tokens: int) -> int:
    """Tiles for a row of ``tokens``: one per ``tile_tokens`` tokens (at least one)."""
    return max(1, math.ceil(tokens / tile_tokens))


def tiled(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiles: int) -> torch.Tensor:
    """``forward(x)`` computed over ``tiles`` slices of the token dimension (``x``: ``[..., T, hidden]``).

    With gradients each slice is checkpointed (only its input is kept); without, slices run one after another
    and only the output is kept. ``tensor_split`` always gives ``tiles`` slices (empty ones when ``T < tiles``),
    so a rank with fewer tokens makes as many module calls as the others (ZeRO-3 gathers weights per call)."""
    pieces = torch.tensor_split(x, tiles, dim=-2)
    if torch.is_grad_enabled():
        outs = [checkpoint(forward, piece, use_reentrant=False) for piece in pieces]
    else:
        outs = [forward(piece) for piece in pieces]
    return torch.cat(outs, dim=-2)


def decoder_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MLP of every decoder layer; refuses a layer whose MLP is not a dense gated one (a mixture of experts
    returns router logits beside its output, and its experts see tokens in routed order, not in slices)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    mlps = []
    for layer in model.modules():
        if not isinstance(layer, GradientCheckpointingLayer):
            continue
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
            kind = type(mlp).__name__ if mlp is not None else "no mlp"
            raise ConfigError(
                f"s2l_tiled_mlp: {type(layer).__name__} has {kind}, not a dense gated MLP; set s2l_tiled_mlp: false"
            )
        mlps.append(mlp)
    return mlps


def install_tiled_mlp(model: torch.nn.Module, tile_tokens: Optional[int] = None) -> Callable[[], None]:
    """Route every decoder MLP's forward through :func:`tiled` in tiles of ``tile_tokens`` (default: the hidden
    size); returns the undo. The planner's FLOPs-only trace passes one tile per row: a tile count changes no FLOP."""
    tile_tokens = tile_tokens or model.config.get_text_config().hidden_size
    mlps = decoder_mlps(model)

    def tiled_forward(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
        def call(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            tiles = tile_count(x.shape[-2], tile_tokens)
            if partitioned():
                (tiles,) = lockstep_calls([tiles], x.device)
            return tiled(lambda piece: forward(piece, *args, **kwargs), x, tiles)

        return call

    for mlp in mlps:
        mlp.forward = tiled_forward(mlp.forward)  # an instance attribute: the class's forward stays as it is

    def undo() -> None:
        for mlp in mlps:
            del mlp.forward

    return undo
