"""Every special case DeepSpeed ZeRO makes the plugin take, in one place.

Under ZeRO-3 (Rajbhandari et al., 2020, arXiv 1910.02054) each rank holds ``1/world`` of every parameter and
DeepSpeed gathers a module's weights around each call of it. For the plugin's stages that means:

- :func:`lockstep_calls`: every LM-head call is a collective gather, so all ranks must make the same number of
  head calls in a pass, though each scores its own number of response tokens;
- :func:`gathered_frozen_head`: a FROZEN head (LoRA, freeze) is gathered once per pass and applied as a plain
  function: called through the module, the chunk recomputed in backward found its weight partitioned
  (DeepSpeed does not gather frozen modules there again);
- :func:`gathered_model`: the one-off reference pass runs before DeepSpeed's engine (and its gathering hooks)
  exists, so it gathers the whole model for its duration;
- :func:`engine_grad_norm`: DeepSpeed keeps gradients out of ``param.grad``; the trainer checks the engine's
  global norm instead;
- :class:`ZeroConfig` and :func:`hidden_from_transformers`: what a run's DeepSpeed JSON says about model states
  (the planner's formulas), and hiding a running ZeRO-3 from a traced copy of the model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import ConfigError


def partitioned() -> bool:
    """Whether ZeRO-3 partitions this process's parameters: transformers' own switch, set when the training
    arguments are parsed (from ``deepspeed:`` or from accelerate's DeepSpeed plugin)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def lockstep_calls(plan: list[int], device: torch.device) -> list[int]:
    """Head calls per gather, raised to the maximum over all ranks (one tiny all-reduce) when distributed."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        most = torch.tensor(plan, dtype=torch.long, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return most.tolist()
    return plan


@contextmanager
def gathered_frozen_head(head: torch.nn.Module, lockstep: bool) -> Iterator[Optional[Callable[[torch.Tensor], torch.Tensor]]]:
    """Under ZeRO-3 a frozen head as a plain function of its gathered weight; ``None`` otherwise (a trainable
    head keeps the module path, whose gradients ZeRO-3 must see)."""
    params = list(head.parameters())
    if not lockstep or any(p.requires_grad for p in params):
        yield None
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        weight = head.weight.detach().clone()
        bias = head.bias.detach().clone() if getattr(head, "bias", None) is not None else None
    yield functools.partial(F.linear, weight=weight, bias=bias)


def gathered_model(model: torch.nn.Module) -> Any:
    """The whole model gathered on every rank for a pass outside the engine (a full model per rank, for the pass)."""
    if not partitioned():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def engine_grad_norm(trainer: Any) -> Optional[float]:
    """DeepSpeed's global gradient norm of the last step, the same on every rank (``None`` without an engine)."""
    if not trainer.is_deepspeed_enabled or trainer.model_wrapped is trainer.model:
        return None
    norm = trainer.model_wrapped.get_global_grad_norm()
    return None if norm is None else float(norm)


@dataclass
class ZeroConfig:
    """What the run's DeepSpeed JSON says about model states (stage 0 = no DeepSpeed)."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False

    @property
    def enabled(self) -> bool:
        return self.stage > 0 or self.offload_optimizer

    @classmethod
    def from_file(cls, path: Optional[str], base: Optional[Path]) -> ZeroConfig:
        """Read the ``deepspeed`` JSON (relative paths: from the working directory, else beside the YAML)."""
        if not path:
            return cls()
        file = Path(path)
        if not file.exists() and base is not None and not file.is_absolute():
            file = base / path
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"deepspeed: cannot read {path!r} ({err.strerror})") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed: {path!r} is not valid JSON (line {err.lineno}: {err.msg})") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ZeroConfig:
        zero = raw.get("zero_optimization") or {}

        def offloaded(key: str) -> bool:
            device = (zero.get(key) or {}).get("device", "none")
            return str(device).lower() in ("cpu", "nvme")

        return cls(int(zero.get("stage", 0) or 0), offloaded("offload_optimizer"), offloaded("offload_param"))

    @classmethod
    def from_training_args(cls, training_args: Any) -> ZeroConfig:
        """The config of parsed ``TrainingArguments`` as transformers resolved it (``deepspeed:`` a path, a dict, a
        JSON or base64 string); with accelerate's DeepSpeed plugin instead, stage 3 when it partitions."""
        resolved = getattr(training_args, "hf_deepspeed_config", None)
        if resolved is not None:
            return cls.from_dict(resolved.config)
        return cls(stage=3) if partitioned() else cls()


@contextmanager
def hidden_from_transformers() -> Iterator[None]:
    """Hide a running ZeRO-3 from a traced copy of the model: no ``zero.Init`` partitioning of it, no LM-head
    lockstep. Either would start collectives that only the tracing rank joins."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
