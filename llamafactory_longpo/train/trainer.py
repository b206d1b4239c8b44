"""Trainer of the ``solopo`` and ``longpo`` stages, over LLaMA-Factory's DPO trainer.

The toolkit's trainer keeps what users rely on (optimizers, schedulers, LoRA/freeze/full, DeepSpeed,
bf16, checkpointing, metric logging); this class only replaces "batch -> log-probs -> loss": log-probs
come from :mod:`.logps` (response positions only) and the losses from :mod:`llamafactory_longpo.losses`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal, Optional

import torch
from llamafactory.train.dpo.trainer import CustomDPOTrainer

from ..losses import longpo_loss, solopo_loss
from .logps import DEFAULT_CHUNK, sequence_logps
from .rope import rope_theta_override


class ShortToLongTrainer(CustomDPOTrainer):
    """One trainer for both stages; ``finetuning_args.stage`` picks the loss."""

    def __init__(self, *args: Any, logits_chunk_size: int = DEFAULT_CHUNK, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage: str = self.finetuning_args.stage
        self.logits_chunk_size = logits_chunk_size
        self.original_rope_theta: Optional[float] = None  # set by the workflow when the policy's theta was raised

    # ------------------------------------------------------------------ log-probs
    def _head(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model).get_output_embeddings()

    def _softcap(self, model: torch.nn.Module) -> Optional[float]:
        return getattr(self.accelerator.unwrap_model(model).config, "final_logit_softcapping", None)

    def _logps(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str = "", **kw: Any
    ) -> dict[str, torch.Tensor]:
        return sequence_logps(
            model,
            self._head(model),
            batch[f"{prefix}input_ids"],
            batch[f"{prefix}attention_mask"],
            batch[f"{prefix}labels"],
            chunk_size=self.logits_chunk_size,
            softcap=self._softcap(model),
            **kw,
        )

    def _reference_context(self, model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
        """Frozen reference: a separate model, or the policy with its adapters disabled (LoRA)."""
        if self.ref_model is not None:
            return self.ref_model, nullcontext()
        unwrapped = self.accelerator.unwrap_model(model)
        ctx = unwrapped.disable_adapter()
        if self.original_rope_theta is not None:  # the reference keeps its original RoPE (SPEC 2)
            from contextlib import ExitStack

            stack = ExitStack()
            stack.enter_context(ctx)
            stack.enter_context(rope_theta_override(unwrapped, self.original_rope_theta))
            ctx = stack
        return model, ctx

    @torch.no_grad()
    def reference_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        ref_model, ctx = self._reference_context(model)
        with ctx:
            return self._logps(ref_model, batch, prefix)["logps"]

    # ------------------------------------------------------------------ losses
    def _solopo(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str
    ) -> tuple[torch.Tensor, dict[str, float]]:
        fa = self.finetuning_args
        n = batch["input_ids"].size(0) // 2
        short = self._logps(model, batch)
        long = self._logps(model, batch, "long_")
        both = long["logps"].size(0) == 2 * n
        refs: dict[str, Optional[torch.Tensor]] = {}
        if fa.pref_loss == "sigmoid":
            ref_short = self.reference_logps(model, batch, "")
            refs["ref_short_chosen_logps"], refs["ref_short_rejected_logps"] = ref_short[:n], ref_short[n:]
            if fa.solopo_long_reference == "long":
                ref_long = self.reference_logps(model, batch, "long_")
                refs["ref_long_chosen_logps"] = ref_long[:n]
                if both:
                    refs["ref_long_rejected_logps"] = ref_long[n:]
        out = solopo_loss(
            short["logps"][:n],
            short["logps"][n:],
            long["logps"][:n],
            short["lengths"][:n],
            short["lengths"][n:],
            long["lengths"][:n],
            pref_loss=fa.pref_loss,
            beta=fa.pref_beta,
            alpha=fa.solopo_alpha,
            gamma=fa.simpo_gamma,
            distance=fa.solopo_distance,
            long_rejected_logps=long["logps"][n:] if both else None,
            long_rejected_lengths=long["lengths"][n:] if both else None,
            **refs,
        )
        m = {
            "po_loss": out.po_losses.mean(),
            "align_loss": out.align_losses.mean(),
            "rewards/chosen": out.short_chosen_rewards.mean(),
            "rewards/rejected": out.short_rejected_rewards.mean(),
            "rewards/long_chosen": out.long_chosen_rewards.mean(),
            "rewards/distance": (out.short_chosen_rewards - out.long_chosen_rewards).abs().mean(),
            "rewards/accuracies": (out.short_chosen_rewards > out.short_rejected_rewards).float().mean(),
            "rewards/margins": (out.short_chosen_rewards - out.short_rejected_rewards).mean(),
            "logps/chosen": short["logps"][:n].mean(),
            "logps/rejected": short["logps"][n:].mean(),
            "logps/long_chosen": long["logps"][:n].mean(),
        }
        return out.loss, {f"{prefix}{k}": v.item() for k, v in m.items()}

    def _longpo(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str
    ) -> tuple[torch.Tensor, dict[str, float]]:
        fa = self.finetuning_args
        n = batch["input_ids"].size(0) // 2
        policy = self._logps(model, batch, nll_rows=n, nll_scope=fa.longpo_nll_scope)
        ref_rows = self.reference_logps(model, batch, "ref_")
        owner = batch["ref_sample"]
        half = owner.size(0) // 2  # chosen turns of every sample, then rejected turns
        ref = torch.zeros(2, n, dtype=ref_rows.dtype, device=ref_rows.device)
        ref[0].index_add_(0, owner[:half], ref_rows[:half])
        ref[1].index_add_(0, owner[half:], ref_rows[half:])
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
        m = {
            "pref_loss": out.pref_losses.mean(),
            "nll_loss": out.nll,
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean(),
            "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean(),
            "logps/chosen": policy["logps"][:n].mean(),
            "logps/rejected": policy["logps"][n:].mean(),
            "logps/ref_chosen": ref[0].mean(),
            "logps/ref_rejected": ref[1].mean(),
        }
        return out.loss, {f"{prefix}{k}": v.item() for k, v in m.items()}

    def get_batch_loss_metrics(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], train_eval: Literal["train", "eval"] = "train"
    ) -> tuple[torch.Tensor, dict[str, float]]:
        prefix = "eval_" if train_eval == "eval" else ""
        if self.stage == "solopo":
            return self._solopo(model, batch, prefix)
        return self._longpo(model, batch, prefix)

    def prediction_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Optional[list[str]] = None
    ) -> tuple[torch.Tensor, None, None]:
        """Evaluation returns the loss only: there are no logits to hand back (they are never built)."""
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self.get_batch_loss_metrics(model, inputs, train_eval="eval")
        self.store_metrics(metrics, train_eval="eval")
        return loss.detach(), None, None
