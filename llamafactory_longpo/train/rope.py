"""RoPE base changes for the policy only (LongPO raises the policy's ``rope_theta`` to 1e7).

The rotary embedding caches ``inv_freq = 1 / theta ** (2i / d)`` at init, so changing the config after
loading is not enough: the buffers are recomputed here. Only the default (unscaled) RoPE is supported.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import ConfigError


def _rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


def current_rope_theta(config: object) -> float:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.rope_theta)


def set_rope_theta(model: torch.nn.Module, theta: float) -> float:
    """Set ``rope_theta`` in the config and every rotary buffer; returns the previous value."""
    config = model.config
    params = getattr(config, "rope_parameters", None)
    rope_type = (params or {}).get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type != "default":
        raise ConfigError(f"policy_rope_theta: only default RoPE is supported, the model uses rope_type {rope_type!r}")
    old = current_rope_theta(config)
    modules = _rotary_modules(model)
    if not modules:
        raise ConfigError("policy_rope_theta: the model has no rotary embedding buffers (inv_freq)")
    for m in modules:
        dim = m.inv_freq.numel() * 2
        exponent = torch.arange(0, dim, 2, dtype=torch.int64).to(device=m.inv_freq.device, dtype=torch.float) / dim
        inv = (1.0 / (theta**exponent)).to(m.inv_freq.dtype)
        m.inv_freq.copy_(inv)
        if isinstance(getattr(m, "original_inv_freq", None), torch.Tensor):
            m.original_inv_freq = inv.clone()
    if isinstance(params, dict):
        params["rope_theta"] = theta
    if hasattr(config, "rope_theta") or not isinstance(params, dict):
        config.rope_theta = theta
    return old


@contextmanager
def rope_theta_override(model: torch.nn.Module, theta: float) -> Iterator[None]:
    """Temporarily run ``model`` with another ``rope_theta`` (the reference under LoRA)."""
    old = set_rope_theta(model, theta)
    try:
        yield
    finally:
        set_rope_theta(model, old)
