"""Trainer of the ``solopo``, ``longpo`` and ``s2ld`` stages, over LLaMA-Factory's DPO trainer.

The toolkit's trainer keeps what users rely on (optimizers, schedulers, LoRA/freeze/full, DeepSpeed,
bf16, checkpointing, metric logging); this class only replaces "batch -> log-probs -> loss": log-probs
come from :mod:`.logps` (response positions only) and the losses from :mod:`llamafactory_longpo.losses`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal, Optional

import torch
from llamafactory.train.dpo.trainer import CustomDPOTrainer

from ..data.plan import RowPlan
from ..losses import (
    SoLoPOLogps,
    SoLoPOOutput,
    SoLoPOReference,
    longpo_loss,
    s2ld_loss,
    solo_dpo_loss,
    solo_orpo_loss,
    solo_simpo_loss,
    token_divergence,
)
from . import zero3
from .callbacks import stop_non_finite
from .checkpoints import AtomicCheckpointMixin
from .compat import accept_indexed_cpu_locations
from .distill import check_same_responses, chunked_divergence, teacher_states
from .logps import next_token_targets, plain_sequence_logps, sequence_logps
from .metrics import logged, longpo_metrics, s2ld_metrics, solopo_metrics
from .on_policy import OnPolicySampler
from .rope import rope_theta_override
from .sequence_parallel import GroupSamplingMixin, SequenceParallel
from .shared_prefix import shared_prefix_logps
from .spec import RunSpec
from .wiring import Wiring


class ShortToLongTrainer(AtomicCheckpointMixin, GroupSamplingMixin, CustomDPOTrainer):
    """One trainer for the plugin's stages; the run spec's stage picks the loss. Its reference pass is
    :func:`.reference.precompute_reference`; its batch order under sequence parallelism,
    :class:`.sequence_parallel.GroupSamplingMixin`; its checkpoints, :class:`.checkpoints.AtomicCheckpointMixin`."""

    def __init__(
        self, *args: Any, spec: RunSpec, wiring: Wiring, identity: Optional[dict[str, str]] = None, **kwargs: Any
    ) -> None:
        """``spec``: how the run is put together (:mod:`.spec`); ``wiring``: what :func:`.wiring.wire_model` set up
        on the model (this rank's sequence-parallel group, the reference model, the policy's original RoPE base);
        ``identity``: :func:`..checks.run_identity`, recorded in each checkpoint (None: the planner's trace, which
        never saves)."""
        super().__init__(*args, ref_model=wiring.ref_model, **kwargs)
        self.spec, self.wiring, self.identity = spec, wiring, identity
        self.reference_cache: dict[str, tuple[str, str]] = {}  # split -> (cache file, "hit" | "miss")
        self.add_group_sampling()
        self.sampler: Optional[OnPolicySampler] = None  # S2LD on-policy: the student's own responses (:mod:`.on_policy`)
        if spec.on_policy:
            self.sampler = OnPolicySampler.from_args(self.finetuning_args, self.processing_class, self.data_collator.template)
        if spec.stage == "s2ld":  # on-policy samples are scored with the reverse KL and have no chosen response to fit
            fa = self.finetuning_args
            self.divergence = token_divergence("reverse_kl" if spec.on_policy else fa.s2ld_divergence, fa.s2ld_jsd_beta)
            self.nll_weight = 0.0 if spec.on_policy else fa.s2ld_nll_weight
        if self.args.device.type == "cpu" and self.args.device.index is not None:  # several CPU ranks: resumable
            accept_indexed_cpu_locations()

    @property
    def plan(self) -> RowPlan:
        return self.spec.plan

    @property
    def sequence_parallel(self) -> Optional[SequenceParallel]:
        return self.wiring.sequence_parallel

    @property
    def lockstep_head(self) -> bool:
        """Under ZeRO-3 each LM-head call gathers its weight over all ranks: they must make as many calls."""
        return self.spec.zero_stage == 3

    # ------------------------------------------------------------------ log-probs
    @contextmanager
    def _scoring(self, model: torch.nn.Module) -> Iterator[dict[str, Any]]:
        """The keywords of every response-only log-prob pass of ``model`` (:func:`.logps.scored_sums`): its LM
        head (gathered once under ZeRO-3 when frozen), chunk size, logit soft-cap and sequence-parallel group."""
        unwrapped = self.accelerator.unwrap_model(model)
        head = unwrapped.get_output_embeddings()
        with zero3.gathered_frozen_head(head, self.lockstep_head) as logits_head:
            yield {
                "head": head,
                "chunk_size": self.finetuning_args.s2l_logits_chunk,
                "softcap": getattr(unwrapped.config, "final_logit_softcapping", None),
                "sequence_parallel": self.sequence_parallel,
                "lockstep": self.lockstep_head,
                "logits_head": logits_head,
            }

    def _logps(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str = "", **kw: Any
    ) -> dict[str, torch.Tensor]:
        """Per-row response log-prob sums and lengths of one group of rows (``prefix``: "", ``long_``, ``ref_``)."""
        ids, mask, labels = batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}labels"]
        if not self.finetuning_args.s2l_response_logits:
            return plain_sequence_logps(model, ids, mask, labels, **kw)
        with self._scoring(model) as scoring:
            return sequence_logps(model, input_ids=ids, attention_mask=mask, labels=labels, **scoring, **kw)

    def _reference_context(self, model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
        """Frozen reference: a separate model, the policy with its adapters disabled (LoRA), or, before
        the first update (the precompute pass), the policy itself."""
        if self.ref_model is not None:
            return self.ref_model, nullcontext()
        unwrapped = self.accelerator.unwrap_model(model)
        if not hasattr(unwrapped, "disable_adapter"):
            if self.state.global_step > 0 or self.model_wrapped is not self.model:
                raise RuntimeError("no reference model: full fine-tuning needs s2l_precompute_ref or a reference copy")
            return model, nullcontext()
        ctx = unwrapped.disable_adapter()
        original_theta = self.wiring.original_rope_theta
        if original_theta is not None:  # the reference keeps its original RoPE (LongPO, arXiv 2502.13922)
            from contextlib import ExitStack

            stack = ExitStack()
            stack.enter_context(ctx)
            stack.enter_context(rope_theta_override(unwrapped, original_theta))
            ctx = stack
        return model, ctx

    @torch.no_grad()
    def reference_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        ref_model, ctx = self._reference_context(model)
        with ctx:
            return self._logps(ref_model, batch, prefix)["logps"]

    @torch.no_grad()
    def compute_reference_values(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference log-prob SUMS per sample, for the plan's reference values (LongPO: summed over its turns)."""
        n = batch["input_ids"].size(0) // 2
        keys = self.plan.reference
        out: dict[str, torch.Tensor] = {}
        if self.plan.reference_rows:
            rows = self.reference_logps(model, batch, "ref_")
            owner = batch["ref_sample"]
            half = owner.size(0) // 2  # chosen turns of every sample, then rejected turns
            zeros = torch.zeros(n, dtype=rows.dtype, device=rows.device)
            out["ref_chosen_logps"] = zeros.index_add(0, owner[:half], rows[:half])
            out["ref_rejected_logps"] = zeros.index_add(0, owner[half:], rows[half:])
            return out
        if keys:
            short = self.reference_logps(model, batch, "")
            out["ref_chosen_logps"], out["ref_rejected_logps"] = short[:n], short[n:]
        if "ref_long_chosen_logps" in keys:
            long = self.reference_logps(model, batch, "long_")
            out["ref_long_chosen_logps"] = long[:n]
            if "ref_long_rejected_logps" in keys:
                out["ref_long_rejected_logps"] = long[n:]
        return out

    def reference_values(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Precomputed values from the batch (no reference model runs), or live ones."""
        if self.plan.precomputed:
            return {k: batch[k] for k in self.plan.reference}
        return self.compute_reference_values(model, batch)

    # ------------------------------------------------------------------ losses
    def _solopo(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str
    ) -> tuple[torch.Tensor, dict[str, float]]:
        n = batch["input_ids"].size(0) // 2
        short = self._logps(model, batch)
        long = self._logps(model, batch, "long_")
        both = self.plan.long_rejected
        policy = SoLoPOLogps(
            short_chosen=short["logps"][:n],
            short_rejected=short["logps"][n:],
            long_chosen=long["logps"][:n],
            short_chosen_lengths=short["lengths"][:n],
            short_rejected_lengths=short["lengths"][n:],
            long_chosen_lengths=long["lengths"][:n],
            long_rejected=long["logps"][n:] if both else None,
            long_rejected_lengths=long["lengths"][n:] if both else None,
        )
        out = self._solopo_loss(model, batch, policy)
        return out.loss, logged(solopo_metrics(out, short, long, n, both), prefix)

    def _solopo_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], policy: SoLoPOLogps) -> SoLoPOOutput:
        """The SoLoPO variant of ``pref_loss``; only SoLo-DPO has a reference (on the short input; the long one
        unless ``solopo_long_reference: short``)."""
        fa = self.finetuning_args
        common = {"beta": fa.pref_beta, "alpha": fa.solopo_alpha, "distance": fa.solopo_distance}
        if fa.pref_loss == "simpo":
            return solo_simpo_loss(policy, gamma=fa.simpo_gamma, **common)
        if fa.pref_loss == "orpo":
            return solo_orpo_loss(policy, **common)
        if fa.pref_loss != "sigmoid":  # the knob's check refuses it first; this keeps the choice explicit
            raise ValueError(f"pref_loss: {fa.pref_loss!r} is not one of sigmoid, simpo, orpo")
        ref = self.reference_values(model, batch)
        reference = SoLoPOReference(
            short_chosen=ref["ref_chosen_logps"],
            short_rejected=ref["ref_rejected_logps"],
            long_chosen=ref.get("ref_long_chosen_logps"),
            long_rejected=ref.get("ref_long_rejected_logps"),
        )
        return solo_dpo_loss(policy, reference, **common)

    def _longpo(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str
    ) -> tuple[torch.Tensor, dict[str, float]]:
        fa = self.finetuning_args
        n = batch["input_ids"].size(0) // 2
        if self.spec.shared_prefix:
            chosen, rejected = (
                tuple(batch[k][rows] for k in ("input_ids", "attention_mask", "labels")) for rows in (slice(0, n), slice(n, None))
            )
            with self._scoring(model) as scoring:
                policy = shared_prefix_logps(model, chosen=chosen, rejected=rejected, nll_scope=fa.longpo_nll_scope, **scoring)
        else:
            policy = self._logps(model, batch, nll_rows=n, nll_scope=fa.longpo_nll_scope)
        ref_values = self.reference_values(model, batch)
        ref = torch.stack([ref_values["ref_chosen_logps"], ref_values["ref_rejected_logps"]]).to(policy["logps"].dtype)
        out = longpo_loss(
            policy["logps"][:n],
            policy["logps"][n:],
            ref[0],
            ref[1],
            policy["nll"],
            beta=fa.pref_beta,
            lam=fa.longpo_lambda,
            nll_weight=fa.longpo_nll_weight,
        )
        return out.loss, logged(longpo_metrics(out, policy, ref, n), prefix)

    def _s2ld(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, dict[str, float]]:
        """Short-to-long self-distillation (:mod:`.distill`): the teacher (the frozen start model: the reference copy,
        or the policy with its adapters disabled) reads the short rows without gradient; the policy reads the long
        rows; their distributions are compared at every response token. On-policy, training steps distill on the
        student's own samples with the reverse KL; evaluation always scores the dataset's chosen responses."""
        if self.sampler is not None and not prefix:
            batch = self.sampler.rows(self.accelerator.unwrap_model(model), batch, self.state.global_step)
        teacher, ctx = self._reference_context(model)
        with ctx, self._scoring(teacher) as scoring:
            hidden, short_targets = teacher_states(
                teacher, scoring["head"], batch["input_ids"], batch["attention_mask"], batch["labels"], self.sequence_parallel
            )
            # its LM head as a function: used again in backward, outside the adapters-off block (a LoRA'd head's base)
            teacher_head = scoring["logits_head"] or getattr(scoring["head"], "base_layer", scoring["head"])
        check_same_responses(short_targets, next_token_targets(batch["long_labels"]))
        with self._scoring(model) as scoring:
            sums = chunked_divergence(
                model,
                input_ids=batch["long_input_ids"],
                labels=batch["long_labels"],
                attention_mask=batch["long_attention_mask"] if self.sequence_parallel is None else None,
                teacher_hidden=hidden,
                teacher_head=teacher_head,
                divergence=self.divergence,
                **scoring,
            )
        out = s2ld_loss(sums.divergence, sums.student_logps, sums.tokens, nll_weight=self.nll_weight)
        return out.loss, logged(s2ld_metrics(out, sums), prefix)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The toolkit's step, then, under DeepSpeed, the engine's gradient norm checked: the engine has stepped
        inside the backward, out of the non-finite guard's sight (its gradients never reach ``param.grad``)."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        norm = zero3.engine_grad_norm(self)
        if norm is not None and not math.isfinite(norm) and not self.args.fp16:  # fp16: the loss scaler skips it
            stop_non_finite(self.args, self.state.global_step + 1, "the gradient")
        return loss

    def get_batch_loss_metrics(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], train_eval: Literal["train", "eval"] = "train"
    ) -> tuple[torch.Tensor, dict[str, float]]:
        prefix = "eval_" if train_eval == "eval" else ""
        losses = {"solopo": self._solopo, "longpo": self._longpo, "s2ld": self._s2ld}
        return losses[self.spec.stage](model, batch, prefix)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The stored eval metrics take the eval set's own prefix (``eval_<name>_`` with ``eval_on_each_dataset``):
        the toolkit's DPO log writes them as ``eval_*``, where each member's values would overwrite the last's."""
        loss_keys = [k for k in logs if k.startswith("eval_") and k.endswith("_loss")]
        stored = self._stored_metrics.get("eval")
        if "loss" not in logs and len(loss_keys) == 1 and loss_keys[0] != "eval_loss" and stored:
            prefix = loss_keys[0][: -len("loss")]
            self._stored_metrics["eval"] = {prefix + k.removeprefix("eval_"): v for k, v in stored.items()}
        super().log(logs, *args, **kwargs)

    def prediction_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Optional[list[str]] = None
    ) -> tuple[torch.Tensor, None, None]:
        """Evaluation returns the loss only: there are no logits to hand back (they are never built)."""
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self.get_batch_loss_metrics(model, inputs, train_eval="eval")
        self.store_metrics(metrics, train_eval="eval")
        return loss.detach(), None, None
