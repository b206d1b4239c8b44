"""Attention as a GPU flash kernel holds it, for traces on fake tensors.

A CPU trace of the model's own attention would show the CPU kernel's memory: with a mask, PyTorch's CPU
SDPA falls back to the math path and builds ``[T, T]`` scores, which no GPU kernel does. The trace uses
this op instead: FlashAttention-2's memory (Dao, 2023, arXiv 2307.08691, Algorithm 1-2): the forward
keeps its output and the row log-sum-exp ``[B, H, T]`` in fp32; the backward makes ``dq``, ``dk``, ``dv``
and an fp32 ``dq`` accumulator. GQA key/value heads are read as they are, never repeated. A mask given to
the model (LongPO's shared-prefix mask) is still built and counted by the code that builds it.

FLOPs: ``4 B H T_q T_k D`` for the forward's two matmuls, halved for causal masking; the backward
is 2.5 times the forward (five matmuls, one of them the recomputed ``Q K^T``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils.flop_counter import register_flop_formula

NAME = "s2l_planner_attention"  # no "flash" in it: transformers would look for a flash-attn package


@torch.library.custom_op("llamafactory_longpo::planner_flash_fwd", mutates_args=())
def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, T, D]`` q, ``[B, Hkv, T, D]`` k/v -> output ``[B, T, H, D]``, log-sum-exp ``[B, H, T]``."""
    raise RuntimeError("the planner's attention has shapes only: it runs on fake tensors")


@flash_forward.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, t, d = q.shape
    return q.new_empty(b, t, h, d), q.new_empty(b, h, t, dtype=torch.float32)


@torch.library.custom_op("llamafactory_longpo::planner_flash_bwd", mutates_args=())
def flash_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq``, ``dk``, ``dv`` and the kernel's fp32 ``dq`` accumulator (returned so that it is counted)."""
    raise RuntimeError("the planner's attention has shapes only: it runs on fake tensors")


@flash_backward.register_fake
def _(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> Any:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(q, dtype=torch.float32)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: Optional[torch.Tensor]) -> tuple:
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv, _accumulator = flash_backward(grad_out, q, k, v, out, lse)
    return dq, dk, dv


flash_forward.register_autograd(_backward, setup_context=_setup_context)


def _forward_flops(q_shape: tuple, k_shape: tuple) -> int:
    b, h, tq, d = q_shape
    return 4 * b * h * tq * k_shape[2] * d // 2  # causal: half of the score matrix


@register_flop_formula(torch.ops.llamafactory_longpo.planner_flash_fwd)
def _fwd_flops(q_shape: tuple, k_shape: tuple, v_shape: tuple, *args: Any, **kwargs: Any) -> int:
    return _forward_flops(q_shape, k_shape)


@register_flop_formula(torch.ops.llamafactory_longpo.planner_flash_bwd)
def _bwd_flops(grad_shape: tuple, q_shape: tuple, k_shape: tuple, *args: Any, **kwargs: Any) -> int:
    return 5 * _forward_flops(q_shape, k_shape) // 2


def planner_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function (``AttentionInterface``) with the flash kernel's memory."""
    out, _lse = flash_forward(query, key, value)
    return out, None


def register() -> str:
    """Make the op available to models as ``attn_implementation=NAME``; returns ``NAME``."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, planner_attention)
    return NAME
