"""``llamafactory-longpo eval kv config.yaml``: accuracy vs context length on the key-value task
(:mod:`llamafactory_longpo.eval.kv_hops`), for several models, with 95% Wilson intervals.

Why this exists: the short-to-long methods claim to carry a skill the model has on SHORT inputs over to
LONG ones. This evaluation measures exactly that, per length: each held-out question is asked over its
short context (the two evidence paragraphs) and over the same evidence hidden among filler
paragraphs (the project's token-exact haystack, :func:`llamafactory_longpo.text.haystack.build_haystack`)
at 2x, 4x, 8x the short length. Two tasks: ``two-hop`` (follow the keys twice: the reasoning) and
``single`` (one key's value: reading). A model that reads long inputs but reasons worse over them scores
high on ``single`` at every length and lower on ``two-hop`` at the long ones.

Answers are greedy, through the toolkit's own engine (``Generator``: its template, model and stop
tokens), scored by sub-EM of the ``Final answer:`` line (the builders' scoring).

Config keys: ``models`` (name -> model folder, in table order), ``output_dir``, ``items`` (questions per
length and task), ``seed``, ``mults`` (lengths as multiples of the short context; 1 = short),
``tasks``, ``facts_per_paragraph``, ``hops``, ``max_new_tokens``, ``batch_size``, ``template``,
``system``. Writes ``kv_eval.json`` (every count and interval), ``kv_samples.jsonl`` (every prediction),
``kv_eval.md`` (the table) and ``accuracy_vs_length.png``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..checks import check_model_folder
from ..errors import ConfigError
from . import kv_hops as kv

TASKS = ("two-hop", "single")


@dataclass
class KVEvalConfig:
    models: dict[str, str]
    output_dir: str
    items: int = 300
    seed: int = 4
    mults: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    facts_per_paragraph: int = 2
    hops: int = 2
    max_new_tokens: int = 32
    batch_size: int = 64
    template: str = "qwen"
    system: str = kv.SYSTEM

    def check(self) -> None:
        """Refuse bad values before any model is loaded (one line each)."""
        if not self.models:
            raise ConfigError("models: give at least one name: model folder")
        for name, path in self.models.items():
            if not os.path.isdir(str(path)):
                raise ConfigError(f"models: {name}: {path!r} is not a folder")
            check_model_folder(str(path), f"models: {name}")
        if self.items < 1:
            raise ConfigError(f"items: {self.items} must be at least 1")
        if not self.mults or any(not isinstance(m, int) or m < 1 for m in self.mults):
            raise ConfigError(f"mults: {self.mults!r} must be positive integers (1 = the short context)")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"tasks: {unknown[0] if unknown else '[]'!r} is not one of {', '.join(TASKS)}")
        if self.hops not in kv.HOP_WORDS:
            raise ConfigError(f"hops: {self.hops} is not one of {', '.join(map(str, kv.HOP_WORDS))}")
        if self.facts_per_paragraph < 1:
            raise ConfigError(f"facts_per_paragraph: {self.facts_per_paragraph} must be at least 1")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError("batch_size and max_new_tokens must be at least 1")


def wilson(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion, in percent: unlike the normal approximation it stays
    inside [0, 100] and is honest at 0 or n correct, where the short-to-long numbers often sit."""
    if n == 0:
        return 0.0, 100.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # the interval always holds p (rounding can put centre - half a hair above 0 when p = 0)
    return 100.0 * max(0.0, min(p, centre - half)), 100.0 * min(1.0, max(p, centre + half))


def others_needed(short_tokens: int, para_tokens: int, mult: int) -> int:
    """Distractor paragraphs an item needs for a context of ``mult`` x the short one (with a margin)."""
    return int((mult - 1) * short_tokens / max(1, para_tokens)) + 3


def short_length(tokenizer: Any, facts_per_paragraph: int, hops: int, seed: int) -> tuple[int, int]:
    """Median tokens of a short context and of one filler paragraph (the unit every length is a multiple of)."""
    items = kv.make_items("probe", 50, seed, hops=hops, facts_per_paragraph=facts_per_paragraph, other_paragraphs=1)
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    return int(statistics.median(count(it.short_context) for it in items)), int(
        statistics.median(count(it.others[0]) for it in items)
    )


def make_samples(
    tokenizer: Any,
    *,
    items: int,
    seed: int,
    mults: list[int],
    tasks: list[str],
    facts_per_paragraph: int = 2,
    hops: int = 2,
    short_tokens: Optional[int] = None,
) -> list[dict[str, Any]]:
    """Held-out questions, each asked at every length: the same evidence at 1x (short) and hidden among the
    item's own filler paragraphs at ``m`` x the short length (evidence at random depths). The single-hop
    question asks for the key of one evidence fact, the same one at every length, so the lengths compare the
    same questions."""
    from ..text.haystack import build_haystack

    short, para = short_length(tokenizer, facts_per_paragraph, hops, seed + 5)
    short = short_tokens or short
    rows = kv.make_items(
        "eval",
        items,
        seed,
        hops=hops,
        facts_per_paragraph=facts_per_paragraph,
        other_paragraphs=others_needed(short, para, max(mults)),
    )
    pick = random.Random(seed + 1)
    samples = []
    for i, it in enumerate(rows):
        key, value = pick.choice(kv.context_facts(it.short_context))
        questions = {"two-hop": (it.question, it.answer), "single": (kv.single_question(key), value)}
        for mult in mults:
            if mult == 1:
                context, tokens = it.short_context, len(tokenizer.encode(it.short_context, add_special_tokens=False))
            else:
                hay = build_haystack(tokenizer, it.supporting, it.others, mult * short, seed=1000 * seed + i)
                context, tokens = hay.text, hay.tokens
            for task in tasks:
                question, answer = questions[task]
                samples.append(
                    {
                        "id": it.key,
                        "task": task,
                        "mult": mult,
                        "tokens": tokens,
                        "prompt": f"{context}\n\n{question}",
                        "answer": answer,
                    }
                )
    return samples


def answer(generator: Any, samples: list[dict[str, Any]], max_new_tokens: int, batch_size: int) -> list[dict[str, Any]]:
    """Greedy answers (batched through the engine's own template and model) scored by sub-EM of ``Final answer:``."""
    from ..text.scoring import extract_final_answer, sub_em

    requests = [([{"role": "user", "content": x["prompt"]}], None) for x in samples]
    outs = generator.greedy(requests, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [
        {
            **{k: v for k, v in x.items() if k != "prompt"},
            "prediction": out,
            "correct": sub_em(extract_final_answer(out), [x["answer"]]),
        }
        for x, out in zip(samples, outs)
    ]


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """model -> task -> mult -> {n, correct, accuracy, low, high} (percent; 95% Wilson interval)."""
    cells: dict[tuple[str, str, int], list[bool]] = {}
    for r in rows:
        cells.setdefault((r["model"], r["task"], r["mult"]), []).append(bool(r["correct"]))
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for (model, task, mult), values in cells.items():
        low, high = wilson(sum(values), len(values))
        out.setdefault(model, {}).setdefault(task, {})[str(mult)] = {
            "n": len(values),
            "correct": sum(values),
            "accuracy": 100.0 * sum(values) / len(values),
            "low": low,
            "high": high,
        }
    return out


def table(summary: dict[str, Any], lengths: dict[str, int], task: str) -> str:
    """A markdown table: one row per model, one column per length, ``accuracy [low, high]`` in percent."""
    mults = sorted(lengths, key=int)
    head = ["model"] + [f"{'short' if m == '1' else m + 'x'} ({lengths[m]} tok)" for m in mults]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for model, by_task in summary.items():
        if task not in by_task:
            continue
        cells = [by_task[task][m] for m in mults]
        lines.append(
            "| " + " | ".join([model] + [f"{c['accuracy']:.1f} [{c['low']:.1f}, {c['high']:.1f}]" for c in cells]) + " |"
        )
    return "\n".join(lines)


def plot(summary: dict[str, Any], lengths: dict[str, int], path: str, title: str = "") -> str:
    """Accuracy vs context length (log2 axis), one line per model, two-hop solid and single-hop dashed,
    with the 95% intervals as error bars."""
    import matplotlib.pyplot as plt

    plt.switch_backend("agg")
    mults = sorted(lengths, key=int)
    xs = [lengths[m] for m in mults]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (model, by_task) in enumerate(summary.items()):
        for task, style in (("two-hop", "-"), ("single", ":")):
            if task not in by_task:
                continue
            cells = [by_task[task][m] for m in mults]
            ys = [c["accuracy"] for c in cells]
            err = [[y - c["low"] for y, c in zip(ys, cells)], [c["high"] - y for y, c in zip(ys, cells)]]
            ax.errorbar(xs, ys, yerr=err, fmt="o" + style, color=colors[i % len(colors)], capsize=3, label=f"{model} ({task})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x}\n({'short' if m == '1' else m + 'x'})" for x, m in zip(xs, mults)])
    ax.set_ylim(-5, 105)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy (sub-EM, %), 95% interval")
    ax.set_title(title or "key-value questions: accuracy vs context length")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_kv_eval(config: KVEvalConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every model answers the same held-out questions at every length; writes the JSON, table, samples, plot."""
    import contextlib
    import io

    from ..text.generate import Generator

    config.check()
    os.makedirs(config.output_dir, exist_ok=True)
    samples: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for name, path in config.models.items():
        engine = {"model_name_or_path": str(path), "template": config.template, "default_system": config.system}
        with contextlib.redirect_stdout(io.StringIO()):  # the engine's loading chatter
            generator = Generator({**engine, "infer_backend": "huggingface"})
        if not samples:  # every model shares the task's tokenizer (the demo's and the benchmark's models do)
            samples = make_samples(
                generator.tokenizer,
                items=config.items,
                seed=config.seed,
                mults=list(config.mults),
                tasks=list(config.tasks),
                facts_per_paragraph=config.facts_per_paragraph,
                hops=config.hops,
            )
        rows += [{"model": name, **r} for r in answer(generator, samples, config.max_new_tokens, config.batch_size)]
        del generator
        gc.collect()
        log(f"[eval kv] {name}: {len(samples)} answers")
    lengths = {str(m): int(statistics.median(x["tokens"] for x in samples if x["mult"] == m)) for m in config.mults}
    summary = summarize(rows)
    result = {"config": asdict(config), "lengths": lengths, "accuracy": summary}
    with open(os.path.join(config.output_dir, "kv_eval.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    kv.write_jsonl(os.path.join(config.output_dir, "kv_samples.jsonl"), rows)
    text = "\n\n".join(
        f"{task} ({config.items} questions per length; accuracy % [95% interval])\n\n{table(summary, lengths, task)}"
        for task in config.tasks
    )
    with open(os.path.join(config.output_dir, "kv_eval.md"), "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    plot(summary, lengths, os.path.join(config.output_dir, "accuracy_vs_length.png"))
    log("\n" + text + "\n")
    return result
