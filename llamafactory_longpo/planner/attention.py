"""Attention as a GPU kernel holds it, for traces on fake tensors.

A CPU trace of SDPA would show the CPU kernels' memory: with a mask or a causal bias that is not square,
PyTorch's CPU SDPA falls back to the math path and builds ``[T_q, T_k]`` scores, which no GPU kernel does.
During a trace, :func:`gpu_attention` puts this op in the place of ``torch.nn.functional.scaled_dot_product_attention``
(every caller looks it up there: transformers' SDPA attention, LongPO's shared-prefix pieces), with
FlashAttention-2's memory (Dao, 2023, arXiv 2307.08691, Algorithms 1-2; SDPA's memory-efficient kernel keeps
the same): the forward keeps its output and the row log-sum-exp ``[B, H, T_q]`` in fp32; the backward makes
``dq``, ``dk``, ``dv`` and an fp32 ``dq`` accumulator. What the caller builds around the kernel (repeated
GQA keys, a mask tensor) is still built and counted by the caller's own code.

FLOPs: ``4 B H D`` per visible (query, key) pair for the forward's two matmuls, with causal visibility
(square, or aligned bottom-right when there are fewer queries than keys); the backward is 2.5 times the
forward (five matmuls, one of them the recomputed ``Q K^T``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula


@torch.library.custom_op("llamafactory_longpo::planner_flash_fwd", mutates_args=())
def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, H, Tq, D]`` q, ``[B, Hkv, Tk, D]`` k/v -> output ``[B, H, Tq, D]``, log-sum-exp ``[B, H, Tq]``."""
    raise RuntimeError("the planner's attention has shapes only: it runs on fake tensors")


@flash_forward.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, t, d = q.shape
    return q.new_empty(b, h, t, v.shape[-1]), q.new_empty(b, h, t, dtype=torch.float32)


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
    tk = k_shape[2]
    visible = tq * tk - tq * (tq - 1) // 2  # causal; bottom-right aligned when tq < tk
    return 4 * b * h * d * visible


@register_flop_formula(torch.ops.llamafactory_longpo.planner_flash_fwd)
def _fwd_flops(q_shape: tuple, k_shape: tuple, v_shape: tuple, *args: Any, **kwargs: Any) -> int:
    return _forward_flops(q_shape, k_shape)


@register_flop_formula(torch.ops.llamafactory_longpo.planner_flash_bwd)
def _bwd_flops(grad_shape: tuple, q_shape: tuple, k_shape: tuple, *args: Any, **kwargs: Any) -> int:
    return 5 * _forward_flops(q_shape, k_shape) // 2


def flash_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``scaled_dot_product_attention``'s signature with the kernel's memory; the mask's pattern (a tensor or
    a causal bias) changes which scores are computed, not what is kept."""
    out, _lse = flash_forward(query, key, value)
    return out


def _no_bias(*size: int) -> None:
    """A GPU kernel aligns a bottom-right causal mask itself: nothing to build."""
    return None


@contextmanager
def gpu_attention() -> Iterator[None]:
    """Inside the block, ``torch.nn.functional.scaled_dot_product_attention`` is :func:`flash_sdpa` and
    ``torch.nn.attention.bias.causal_lower_right`` builds nothing."""
    import torch.nn.attention.bias as bias

    originals = F.scaled_dot_product_attention, bias.causal_lower_right
    F.scaled_dot_product_attention, bias.causal_lower_right = flash_sdpa, _no_bias
    try:
        yield
    finally:
        F.scaled_dot_product_attention, bias.causal_lower_right = originals
