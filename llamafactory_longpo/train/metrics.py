"""The plugin stages' metrics, named once: the trainer computes them here, the log callback copies them into
``trainer_log.jsonl``, and the loss and reward plots draw them.

Names follow the toolkit's DPO trainer (``rewards/chosen``, ``rewards/accuracies``, ``logps/chosen``, ...), so
LlamaBoard and existing dashboards read them as they read a ``dpo`` run; each stage adds its loss parts.
"""

from __future__ import annotations

from typing import Any

import torch

# each stage's parts of the loss, logged beside ``loss``
LOSS_PARTS = {"solopo": ("po_loss", "align_loss"), "longpo": ("pref_loss", "nll_loss")}
# the reward curves of ``training_rewards.png``: metric -> legend
REWARD_CURVES = {
    "solopo": {
        "rewards/chosen": "short chosen",
        "rewards/rejected": "short rejected",
        "rewards/long_chosen": "long chosen",
        "rewards/distance": "|short - long| (chosen)",
    },
    "longpo": {"rewards/chosen": "long chosen", "rewards/rejected": "long rejected", "rewards/margins": "margin"},
}
# the curves of the toolkit's loss plot (``plot_loss``), one PNG each
PLOT_KEYS = {
    "solopo": ["loss", *LOSS_PARTS["solopo"], "rewards/accuracies", "rewards/distance"],
    "longpo": ["loss", *LOSS_PARTS["longpo"], "rewards/accuracies"],
}
_GROUPS = ("rewards/", "logps/")


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
    if long_rejected:
        m["rewards/long_rejected"] = out.long_rejected_rewards.mean()
        m["logps/long_rejected"] = long["logps"][n:].mean()
    return m


def longpo_metrics(out: Any, policy: dict[str, torch.Tensor], ref: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """LongPO's metrics of one batch: ``out`` a :class:`..losses.LongPOOutput`; ``policy`` the ``[2n]`` long-input
    response log-prob sums (chosen first); ``ref`` the ``[2, n]`` short-input reference sums."""
    return {
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


def logged(metrics: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """The values the trainer stores: floats under the split's prefix (``eval_`` in evaluation)."""
    return {f"{prefix}{k}": v.item() for k, v in metrics.items()}
