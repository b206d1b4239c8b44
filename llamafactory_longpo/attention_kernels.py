"""The attention kernels a run can ask for (the toolkit's ``flash_attn`` values), what each runs, and the one-line
checks made before loading; sequence parallelism and LongPO's shared prefix read the same table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError


@dataclass(frozen=True)
class AttentionKernel:
    """What one value of the toolkit's ``flash_attn`` runs, and which of the plugin's features run on it."""

    implementation: str  # transformers' ``attn_implementation``
    half_precision_only: bool  # flash-attention computes in bf16/fp16 only
    sequence_parallel: bool  # takes no 4D mask, so Ulysses can shard its sequence
    shared_prefix: Optional[str]  # LongPO's shared prefix: how its pieces run on it (None: it cannot)


# the one list of attention kernels: the checks below, train/sequence_parallel.py and train/shared_prefix.py read it
ATTENTION_KERNELS: dict[str, AttentionKernel] = {
    "disabled": AttentionKernel("eager", False, False, "eager"),
    "sdpa": AttentionKernel("sdpa", False, True, "sdpa"),
    "fa2": AttentionKernel("flash_attention_2", True, True, "fa2"),
    "fa3": AttentionKernel("flash_attention_3", True, True, None),
}  # "auto": transformers picks sdpa (or eager where sdpa is missing)


def check_attention_kernels(
    *, stage: str, flash_attn: str, half_precision: bool, sequence_parallel_size: int, shared_prefix: bool
) -> None:
    """Stop before loading, in one line naming the key, on an attention setting that cannot run.

    flash-attention computes in bf16/fp16 only (an fp32 run fails at its first step on the GPU); Ulysses needs a
    kernel that takes no 4D mask (eager needs one); LongPO's shared prefix runs on sdpa, flash-attention 2 and eager.
    """
    flash_attn = str(flash_attn)
    if flash_attn == "auto":
        return
    kernel = ATTENTION_KERNELS.get(flash_attn)
    if kernel is None:  # the toolkit takes the YAML's string as it is, and fails only once the model is loading
        raise ConfigError(f"flash_attn: {flash_attn!r} is not one of auto, {', '.join(ATTENTION_KERNELS)}")
    if kernel.half_precision_only and not half_precision:
        raise ConfigError(
            f"flash_attn: {flash_attn} runs in bf16 or fp16 only; set bf16: true (or fp16: true), or flash_attn: sdpa"
        )
    if sequence_parallel_size > 1 and not kernel.sequence_parallel:
        allowed = " or ".join(k for k, v in ATTENTION_KERNELS.items() if v.sequence_parallel)
        raise ConfigError(
            f"flash_attn: {flash_attn} ({kernel.implementation}) cannot run sequence_parallel_size: "
            f"{sequence_parallel_size}; use {allowed}"
        )
    if stage == "longpo" and shared_prefix and kernel.shared_prefix is None:
        allowed = ", ".join(["auto", *(k for k, v in ATTENTION_KERNELS.items() if v.shared_prefix)])
        raise ConfigError(
            f"flash_attn: {flash_attn} cannot run LongPO's shared prefix (use one of {allowed}), or set s2l_shared_prefix: false"
        )
