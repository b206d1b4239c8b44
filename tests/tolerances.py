"""Comparison bounds derived from float32's precision, the same on every machine.

Exactness tests run the model in float64, but a model still computes a few things in float32 whatever its
dtype (RoPE angles, eager attention's softmax, some CPU attention kernels' accumulators). Their error is of
order eps32 times the magnitude involved, independent of reduction order; a real bug (a wrong mask, a lost
token) moves values by percent.
"""

from __future__ import annotations

import torch

EPS32 = torch.finfo(torch.float32).eps


def assert_within_eps32(got: torch.Tensor, expected: torch.Tensor, what: str, factor: int = 16) -> None:
    """|got - expected| <= factor x eps32 x the largest magnitude of ``expected`` (observed: up to 2 eps32)."""
    bound = factor * EPS32 * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=bound, msg=lambda m: f"{what}: {m}")
