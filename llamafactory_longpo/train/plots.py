"""Training-time view of the rewards (like the LongPO paper's reward figure), in the toolkit's style:
one PNG with the short-chosen, short-rejected and long-chosen rewards and the reward distance over steps,
each drawn raw (faint) and smoothed with the toolkit's EMA."""

from __future__ import annotations

import json
import os
from typing import Optional

from .metrics import REWARD_CURVES


def plot_rewards(output_dir: str, stage: str) -> Optional[str]:
    """Write ``training_rewards.png`` from ``trainer_state.json``; returns its path (None without data)."""
    import matplotlib.pyplot as plt
    from llamafactory.extras.ploting import smooth

    with open(os.path.join(output_dir, "trainer_state.json"), encoding="utf-8") as fh:
        history = [h for h in json.load(fh)["log_history"] if "loss" in h]
    curves = {k: v for k, v in REWARD_CURVES.get(stage, {}).items() if any(k in h for h in history)}
    if not curves:
        return None
    plt.switch_backend("agg")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (key, label), color in zip(curves.items(), ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")):
        steps = [h["step"] for h in history if key in h]
        values = [h[key] for h in history if key in h]
        ax.plot(steps, values, color=color, alpha=0.3)
        ax.plot(steps, smooth(values), color=color, label=label)
    ax.set_title(f"training rewards ({stage}) of {output_dir}")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.legend()
    path = os.path.join(output_dir, "training_rewards.png")
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    print("Figure saved at:", path)
    return path
