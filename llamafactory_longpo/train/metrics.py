"""The plugin stages' metrics, named once: the trainer computes them here, the log callback copies them into
``trainer_log.jsonl``, and the loss and reward plots draw them.

Names follow the toolkit's DPO trainer (``rewards/chosen``, ``rewards/accuracies``, ``logps/chosen``, ...), so
LlamaBoard and existing dashboards read them as they read a ``dpo`` run; each stage adds its loss parts.
"""

from __future__ import annotations

from typing import Any

import torch

# the names more than one place reads (the trainer's dicts, the plots, the log callback)
PO_LOSS, ALIGN_LOSS, PREF_LOSS, NLL_LOSS = "po_loss", "align_loss", "pref_loss", "nll_loss"
CHOSEN, REJECTED, LONG_CHOSEN = "rewards/chosen", "rewards/rejected", "rewards/long_chosen"
MARGINS, ACCURACIES, DISTANCE = "rewards/margins", "rewards/accuracies", "rewards/distance"
S2LD_DIVERGENCE, S2LD_NLL, S2LD_TEACHER_NLL = "s2ld/divergence", "s2ld/nll", "s2ld/teacher_nll"
# each stage's parts of the loss, logged beside ``loss``
LOSS_PARTS = {"solopo": (PO_LOSS, ALIGN_LOSS), "longpo": (PREF_LOSS, NLL_LOSS), "s2ld": (S2LD_DIVERGENCE, S2LD_NLL)}
# the reward curves of ``training_rewards.png``: metric -> legend (S2LD has no rewards: its loss plots show it)
REWARD_CURVES = {
    "solopo": {
        CHOSEN: "short chosen",
        REJECTED: "short rejected",
        LONG_CHOSEN: "long chosen",
        DISTANCE: "|short - long| (chosen)",
    },
    "longpo": {CHOSEN: "long chosen", REJECTED: "long rejected", MARGINS: "margin"},
}
# the curves of the toolkit's loss plot (``plot_loss``), one PNG each
PLOT_KEYS = {
    "solopo": ["loss", *LOSS_PARTS["solopo"], ACCURACIES, DISTANCE],
    "longpo": ["loss", *LOSS_PARTS["longpo"], ACCURACIES],
    "s2ld": ["loss", *LOSS_PARTS["s2ld"], S2LD_TEACHER_NLL],
}
_GROUPS = ("rewards/", "logps/", "s2ld/")


def is_plugin_metric(key: str) -> bool:
    """A key the plugin adds to a log entry (train or ``eval_``): a loss part, a reward or a log-prob."""
    key = key.removeprefix("eval_")
    return key in {p for parts in LOSS_PARTS.values() for p in parts} or key.startswith(_GROUPS)


def solopo_metrics(
    out: Any, short: dict[str, torch.Tensor], long: dict[str, torch.Tensor], n: int, long_rejected: bool
) -> dict[str, torch.Tensor]:
    """SoLoPO's metrics of one batch: ``out`` a :class:`..losses.SoLoPOOutput`; ``short`` / ``long`` the policy's
    ``[2n]`` / ``[n or 2n]`` response log-prob sums (chosen first)."""
    m = {
        PO_LOSS: out.po_losses.mean(),
        ALIGN_LOSS: out.align_losses.mean(),
        CHOSEN: out.short_chosen_rewards.mean(),
        REJECTED: out.short_rejected_rewards.mean(),
        LONG_CHOSEN: out.long_chosen_rewards.mean(),
        DISTANCE: (out.short_chosen_rewards - out.long_chosen_rewards).abs().mean(),
        ACCURACIES: (out.short_chosen_rewards > out.short_rejected_rewards).float().mean(),
        MARGINS: (out.short_chosen_rewards - out.short_rejected_rewards).mean(),
        "logps/chosen": short["logps"][:n].mean(),
        "logps/rejected": short["logps"][n:].mean(),
        "logps/long_chosen": long["logps"][:n].mean(),
    }
    if long_rejected:
        m["rewards/long_rejected"] = out.long_rejected_rewards.mean()
        m["logps/long_rejected"] = long["logps"][n:].mean()
    return m


def longpo_metrics(out: Any, policy: dict[str, torch.Tensor], ref: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """LongPO's metrics of one batch: ``out`` a :class:`..losses.LongPOOutput`; ``policy`` the ``[2n]`` long-input
    response log-prob sums (chosen first); ``ref`` the ``[2, n]`` short-input reference sums."""
    return {
        PREF_LOSS: out.pref_losses.mean(),
        NLL_LOSS: out.nll,
        CHOSEN: out.chosen_rewards.mean(),
        REJECTED: out.rejected_rewards.mean(),
        ACCURACIES: (out.chosen_rewards > out.rejected_rewards).float().mean(),
        MARGINS: (out.chosen_rewards - out.rejected_rewards).mean(),
        "logps/chosen": policy["logps"][:n].mean(),
        "logps/rejected": policy["logps"][n:].mean(),
        "logps/ref_chosen": ref[0].mean(),
        "logps/ref_rejected": ref[1].mean(),
    }


def logged(metrics: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """The values the trainer stores: floats under the split's prefix (``eval_`` in evaluation)."""
    return {f"{prefix}{k}": v.item() for k, v in metrics.items()}


def s2ld_metrics(out: Any, sums: Any) -> dict[str, torch.Tensor]:
    """S2LD's metrics of one batch: ``out`` a :class:`..losses.S2LDOutput`; ``sums`` the :class:`.distill.DistillSums`
    (the teacher's mean NLL of the same response tokens on the short input: the gap the student closes)."""
    return {
        S2LD_DIVERGENCE: out.divergence,
        S2LD_NLL: out.nll,
        S2LD_TEACHER_NLL: -sums.teacher_logps / sums.tokens.clamp(min=1),
    }
