"""Plots of a RULER run: a length x depth heatmap (mean over tasks) and score vs length per task."""

from __future__ import annotations

from typing import Any


def plot_heatmap(result: dict[str, Any], lengths: list[int], depths: list[float], path: str) -> str:
    import matplotlib.pyplot as plt

    plt.switch_backend("agg")
    tasks = list(result["tasks"])
    grid = [[sum(result["tasks"][t][str(n)]["by_depth"][str(d)] for t in tasks) / len(tasks) for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.6 * len(depths) + 2))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{int(100 * d)}%" for d in depths])
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("evidence depth")
    ax.set_title("RULER-style score (mean over tasks)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_lines(result: dict[str, Any], lengths: list[int], path: str) -> str:
    import matplotlib.pyplot as plt

    plt.switch_backend("agg")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for task, by_length in result["tasks"].items():
        ax.plot(lengths, [by_length[str(n)]["score"] for n in lengths], marker="o", label=task)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in lengths])
    ax.set_ylim(-5, 105)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("score")
    ax.set_title("score vs length per task")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
