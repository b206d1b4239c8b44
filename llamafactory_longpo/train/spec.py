"""The run spec: every decision about how a plugin-stage run is put together, made once from its arguments.

Training (:mod:`.workflow`), the memory planner (which traces one step of the same run) and the launcher's
checks all read these decisions from one :class:`RunSpec`; none of them decides any of them again. The spec
is pure data (no model, no toolkit import), so it can be made before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..data.plan import ReferenceKind, RowPlan


def separate_reference_model(finetuning_args: Any, live: bool) -> bool:
    """Whether the reference is a separate frozen model: an explicit ``ref_model`` always (to score once, or in every
    step); without one, a ``live`` reference under full or freeze fine-tuning is a frozen copy of the start model,
    and under LoRA the policy with its adapters disabled (the toolkit's ``create_ref_model`` makes the same choice).
    A reference scored once before training without ``ref_model`` is the policy itself, before its first update."""
    return finetuning_args.ref_model is not None or (live and finetuning_args.finetuning_type != "lora")


@dataclass(frozen=True)
class RunSpec:
    """How one ``solopo`` / ``longpo`` / ``s2ld`` run is wired."""

    stage: str
    plan: RowPlan  # the rows of a step and the reference values its loss reads
    shared_prefix: bool  # LongPO's pair runs its document once (:mod:`.shared_prefix`)
    sequence_parallel_size: int  # Ulysses ranks per row (1: off)
    reference_model: bool  # a separate frozen model is loaded for it (else: the policy, adapters off under LoRA)
    policy_rope_theta: Optional[float]  # the policy's RoPE base after the reference pass (the reference keeps its own)
    zero_stage: int  # DeepSpeed ZeRO stage of the run's config (0: no DeepSpeed)
    offload_activations: bool = False  # checkpointed layer inputs in host memory (:mod:`.offload`)
    tiled_mlp: bool = False  # decoder MLPs in sequence tiles (:mod:`.tiling`)
    mlp_tile_tokens: Optional[int] = None  # tokens per tile (None: the model's hidden size)
    on_policy: bool = False  # S2LD: the policy samples the responses it is distilled on (:mod:`.distill`)

    @property
    def reference(self) -> ReferenceKind:
        """None (SimPO, ORPO), scored once before training, or scored in every step (S2LD's teacher): the plan's."""
        return self.plan.reference_kind

    @classmethod
    def for_run(cls, finetuning_args: Any, training_args: Any) -> RunSpec:
        """The spec of a training run from its parsed arguments (the ZeRO stage as transformers resolved it)."""
        from .zero3 import ZeroConfig

        return cls.from_args(
            finetuning_args, do_train=training_args.do_train, zero_stage=ZeroConfig.from_training_args(training_args).stage
        )

    @classmethod
    def from_args(cls, finetuning_args: Any, *, do_train: bool = True, zero_stage: int = 0) -> RunSpec:
        """The spec of a plugin-stage run from its parsed ``FinetuningArguments`` (the checks made before the
        training arguments exist read it too)."""
        fa = finetuning_args
        plan = RowPlan.for_stage(fa, do_train)
        reference = plan.reference_kind
        return cls(
            stage=fa.stage,
            plan=plan,
            shared_prefix=fa.stage == "longpo" and bool(fa.s2l_shared_prefix) and bool(fa.s2l_response_logits),
            sequence_parallel_size=int(fa.sequence_parallel_size or 1),
            reference_model=reference != "none" and separate_reference_model(fa, live=reference == "live"),
            policy_rope_theta=fa.policy_rope_theta,
            zero_stage=zero_stage,
            offload_activations=bool(fa.s2l_offload_activations),
            tiled_mlp=bool(fa.s2l_tiled_mlp),
            on_policy=fa.stage == "s2ld" and bool(fa.s2ld_on_policy),
        )
