"""``llamafactory-longpo eval ruler config.yaml``: RULER-style tasks at several lengths and depths,
generated through the toolkit's engines, scored by substring / sub-EM, written as JSON and two plots.

Config keys: ``model`` (``llamafactory-cli chat`` keys), ``output_dir``, ``tasks``, ``lengths``,
``depths``, ``samples_per_cell``, ``seed``, ``max_new_tokens``, ``musique`` (MuSiQue-format JSONL for
``qa_haystack``), ``batch_size`` (requests sent to the engine at once).
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ConfigError
from .tasks import TASKS, make_samples, score

QUESTION_SUFFIX = "\n\nAnswer with the requested value(s) only."


@dataclass
class RulerConfig:
    model: dict[str, Any]
    output_dir: str
    tasks: list[str] = field(default_factory=lambda: [t for t in TASKS if t != "qa_haystack"])
    lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384, 32768])
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples_per_cell: int = 5
    seed: int = 42
    max_new_tokens: int = 64
    musique: Optional[str] = None
    batch_size: int = 16


def run_ruler(config: RulerConfig, generator: Any = None, log: Any = print) -> dict[str, Any]:
    """Build the samples, generate, score; write ``scores.json``, ``samples.jsonl`` and the two plots."""
    from tqdm import tqdm

    unknown = [t for t in config.tasks if t not in TASKS]
    if unknown:  # before the model is loaded
        raise ConfigError(f"tasks: {unknown[0]!r} is not one of {', '.join(TASKS)}")
    options: dict[str, Any] = {}
    if "qa_haystack" in config.tasks:
        from ..text.musique import read_musique

        if not config.musique:
            raise ConfigError("tasks: qa_haystack needs 'musique' (a MuSiQue-format JSONL file)")
        options["records"] = read_musique(config.musique, strict=False, log=log)[0]
    if generator is None:
        from ..text.generate import Generator

        generator = Generator(config.model)
    samples = make_samples(
        generator.tokenizer, config.tasks, config.lengths, config.depths, config.samples_per_cell, config.seed, **options
    )
    os.makedirs(config.output_dir, exist_ok=True)
    predictions: list[str] = []
    for start in tqdm(range(0, len(samples), config.batch_size), desc="RULER", unit="batch", file=sys.stderr):
        batch = samples[start : start + config.batch_size]
        requests = [([{"role": "user", "content": f"{s.context}\n\n{s.question}{QUESTION_SUFFIX}"}], None) for s in batch]
        outs = generator.generate(
            requests, seeds=[config.seed + start + i for i in range(len(batch))], max_new_tokens=config.max_new_tokens
        )
        predictions += [o[0] for o in outs]

    cells: dict[str, dict[int, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    with open(os.path.join(config.output_dir, "samples.jsonl"), "w", encoding="utf-8") as fh:
        for s, pred in zip(samples, predictions):
            value = score(s, pred)
            cells[s.task][s.length][s.depth].append(value)
            row = {k: v for k, v in s.to_dict().items() if k != "context"}
            fh.write(json.dumps({**row, "prediction": pred, "score": value}, ensure_ascii=False) + "\n")
    mean = lambda xs: 100.0 * sum(xs) / len(xs)  # noqa: E731
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(config).items() if k != "model"},
        "model": config.model,
        "tasks": {},
        "by_length": {},
    }
    for task, by_len in cells.items():
        result["tasks"][task] = {
            str(length): {
                "score": mean([x for d in by_depth.values() for x in d]),
                "by_depth": {str(depth): mean(xs) for depth, xs in sorted(by_depth.items())},
            }
            for length, by_len_depth in sorted(by_len.items())
            for by_depth in [by_len_depth]
        }
    for length in config.lengths:
        scores = [result["tasks"][t][str(length)]["score"] for t in result["tasks"]]
        result["by_length"][str(length)] = sum(scores) / len(scores)
    result["average"] = sum(result["by_length"].values()) / len(result["by_length"])
    with open(os.path.join(config.output_dir, "scores.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    from .plots import plot_heatmap, plot_lines

    plot_heatmap(result, config.lengths, config.depths, os.path.join(config.output_dir, "ruler_heatmap.png"))
    plot_lines(result, config.lengths, os.path.join(config.output_dir, "ruler_lengths.png"))
    log(f"[eval ruler] average {result['average']:.1f}; by length {json.dumps(result['by_length'])}")
    return result
