"""The key-value evaluation by length (``llamafactory-longpo eval kv``) and the demo that prints its table.

Real components throughout: the shipped start model (``examples/demo_model``), the toolkit's engine,
``llamafactory-cli train`` subprocesses in the demo. Nothing here requires any method to win: the demo
test runs two training steps and checks the evaluation path and its table, not the accuracies."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import yaml

from llamafactory_longpo.eval import kv_hops as kv
from llamafactory_longpo.eval.kv_eval import make_samples, summarize, table, wilson
from tests.conftest import ROOT, VENV_BIN, run_command

DEMO_MODEL = ROOT / "examples" / "demo_model"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def test_wilson_interval_matches_the_formula_at_known_points() -> None:
    # reference values of the 95% Wilson score interval (z = 1.96)
    assert wilson(0, 10) == pytest.approx((0.0, 27.75), abs=0.01)
    assert wilson(5, 10) == pytest.approx((23.66, 76.34), abs=0.01)
    assert wilson(10, 10) == pytest.approx((72.25, 100.0), abs=0.01)
    low, high = wilson(150, 300)
    assert low == pytest.approx(44.38, abs=0.01) and high == pytest.approx(55.62, abs=0.01)
    # the interval holds the proportion itself at every count (the plot's error bars are never negative)
    for n in (1, 6, 300):
        for correct in range(n + 1):
            low, high = wilson(correct, n)
            assert 0.0 <= low <= 100.0 * correct / n <= high <= 100.0


def test_shipped_start_model_is_small_bf16_and_loads(tok) -> None:
    from safetensors import safe_open

    weights = DEMO_MODEL / "model.safetensors"
    assert weights.stat().st_size < 2_000_000
    with safe_open(str(weights), "pt") as fh:
        dtypes = {str(fh.get_tensor(name).dtype) for name in fh.keys()}
    assert dtypes == {"torch.bfloat16"}
    # every name of the task is one token of the shipped tokenizer (the lookups are one-token predictions)
    assert all(len(tok.encode(f" {name}", add_special_tokens=False)) == 1 for name in kv.NAMES[:20])


def test_samples_ask_the_same_questions_at_growing_lengths_over_their_evidence(tok) -> None:
    samples = make_samples(tok, items=6, seed=4, mults=[1, 2, 4, 8], tasks=["two-hop", "single"])
    assert len(samples) == 6 * 4 * 2
    by_id: dict[str, list[dict]] = {}
    for x in samples:
        by_id.setdefault(x["id"], []).append(x)
    for rows in by_id.values():
        for task in ("two-hop", "single"):
            cells = sorted((x for x in rows if x["task"] == task), key=lambda x: x["mult"])
            assert len({x["prompt"].rsplit("\n\n", 1)[1] for x in cells}) == 1  # one question, four lengths
            assert len({x["answer"] for x in cells}) == 1
            tokens = [x["tokens"] for x in cells]
            assert tokens == sorted(tokens) and tokens[-1] > 6 * tokens[0]
            short_context = cells[0]["prompt"].rsplit("\n\n", 1)[0]
            facts = dict(kv.context_facts(short_context))
            for x in cells[1:]:  # the evidence, whole, inside every long context
                assert all(p in x["prompt"] for p in short_context.split("\n\n"))
        two = next(x for x in rows if x["task"] == "two-hop")
        start = re.search(r"from (\w+) two", two["prompt"]).group(1)
        assert facts[facts[start]] == two["answer"]  # the answer follows the evidence's keys twice
        single = next(x for x in rows if x["task"] == "single")
        asked = re.search(r"What is the key of (\w+)\?", single["prompt"]).group(1)
        assert facts[asked] == single["answer"]


def test_summary_counts_and_table_cells() -> None:
    rows = [{"model": "m", "task": "two-hop", "mult": 1, "correct": c} for c in [True, True, False, True]] + [
        {"model": "m", "task": "two-hop", "mult": 8, "correct": c} for c in [False, False, True, False]
    ]
    summary = summarize(rows)
    cell = summary["m"]["two-hop"]["1"]
    assert (cell["n"], cell["correct"], cell["accuracy"]) == (4, 3, 75.0)
    assert (cell["low"], cell["high"]) == pytest.approx(wilson(3, 4))
    text = table(summary, {"1": 30, "8": 240}, "two-hop")
    lines = text.splitlines()
    assert lines[0] == "| model | short (30 tok) | 8x (240 tok) |"
    low, high = wilson(1, 4)
    assert lines[2] == f"| m | 75.0 [{cell['low']:.1f}, {cell['high']:.1f}] | 25.0 [{low:.1f}, {high:.1f}] |"


def test_batched_greedy_answers_equal_the_engines_own_chat(tok) -> None:
    from llamafactory_longpo.text.generate import Generator

    generator = Generator({"model_name_or_path": str(DEMO_MODEL), "template": "qwen", "default_system": kv.SYSTEM})
    samples = make_samples(tok, items=3, seed=11, mults=[1, 4], tasks=["two-hop", "single"])
    requests = [([{"role": "user", "content": x["prompt"]}], None) for x in samples]
    batched = generator.greedy(requests, max_new_tokens=24, batch_size=5)  # mixed lengths: left padding in play
    one_by_one = [out[0] for out in generator.generate(requests, max_new_tokens=24)]
    assert batched == one_by_one
    assert any("Final answer:" in b for b in batched)  # the shipped model answers in the task's format


def test_eval_kv_refuses_a_missing_model_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "kv.yaml"
    config.write_text(yaml.safe_dump({"models": {"start": str(DEMO_MODEL)}, "output_dir": str(tmp_path / "out")}))
    proc = run_command(
        [str(VENV_BIN / "llamafactory-longpo"), "eval", "kv", str(config), "models.other=/nowhere"], tmp_path, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stdout.strip() == "llamafactory-longpo: error: models: other: '/nowhere' is not a folder"
    proc = run_command([str(VENV_BIN / "llamafactory-longpo"), "eval", "kv", str(config), "items"], tmp_path, timeout=120)
    assert proc.returncode == 1 and proc.stdout.strip() == "llamafactory-longpo: error: 'items': expected KEY=VALUE"


@pytest.mark.slow  # two llamafactory-cli train runs and three models evaluated: about a minute or two
def test_demo_shortened_trains_both_methods_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_command(
        ["bash", str(ROOT / "scripts" / "demo.sh")], ROOT, timeout=900, DEMO_STEPS="2", DEMO_ITEMS="6", DEMO_OUT=str(out)
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    # both methods went through llamafactory-cli train, from the shipped model, and left their loss plots
    for method in ("solo_orpo", "longpo"):
        assert (out / method / "training_loss.png").read_bytes()[:4] == b"\x89PNG"
        assert json.loads((out / method / "all_results.json").read_text())["epoch"] > 0
        assert f"examples/demo/{method}_kv.yaml" in proc.stdout
    # the before/after table: the three models, four lengths, an interval in every cell
    for task in ("two-hop", "single"):
        block = proc.stdout.split(f"{task} (6 questions per length")[1].split("\n\n")[1]
        lines = block.strip().splitlines()
        assert lines[0].startswith("| model | short (") and "| 8x (" in lines[0]
        assert [line.split(" | ")[0] for line in lines[2:]] == ["| start", "| SoLo-ORPO", "| LongPO"]
        for line in lines[2:]:
            cells = re.findall(r"(\d+\.\d) \[(\d+\.\d), (\d+\.\d)\]", line)
            assert len(cells) == 4 and all(float(lo) <= float(a) <= float(hi) for a, lo, hi in cells)
    result = json.loads((out / "kv_eval.json").read_text())
    assert list(result["accuracy"]) == ["start", "SoLo-ORPO", "LongPO"]
    for by_task in result["accuracy"].values():
        for cells in by_task.values():
            assert {m: c["n"] for m, c in cells.items()} == {"1": 6, "2": 6, "4": 6, "8": 6}
            assert all(math.isclose(c["accuracy"], 100 * c["correct"] / 6) for c in cells.values())
    samples = (out / "kv_samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 6 * 4 * 2
    assert (out / "accuracy_vs_length.png").read_bytes()[:4] == b"\x89PNG"
    assert os.path.exists(out / "logs" / "eval.log")
