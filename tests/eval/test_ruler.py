"""RULER-style tasks and the eval runner."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from llamafactory_longpo.eval.tasks import GENERATORS, TASKS, Sample, make_samples, score
from tests.conftest import VENV_BIN, run_command

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "musique_sample.jsonl"


@pytest.fixture(scope="module")
def tok(tiny_model: Path):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "doc_qa_single"])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_needle_once_at_depth_and_length(tok, task: str, depth: float) -> None:
    sample = GENERATORS[task](tok, 2000, depth, random.Random(1))
    n = len(tok.encode(sample.context, add_special_tokens=False))
    assert n == sample.tokens and abs(n - 2000) <= 0.02 * 2000
    answer = sample.answers[0]
    assert sample.context.count(answer) >= 1
    if task != "doc_qa_single":  # a magic number appears exactly once, at the requested depth
        assert sample.context.count(answer) == 1
        where = sample.context.index(answer) / len(sample.context)
        assert abs(where - depth) < 0.2


def test_variable_tracking_hops(tok) -> None:
    for hops in (2, 5):
        sample = GENERATORS["variable_tracking"](tok, 1500, 0.5, random.Random(hops), hops=hops)
        assert len(sample.answers) == hops + 1 and len(sample.meta["chain"]) == hops + 1
        for line in sample.meta["chain"]:
            assert sample.context.count(line) == 1
        assert abs(sample.tokens - 1500) <= 30


def test_same_seed_same_samples(tok) -> None:
    a = make_samples(tok, ["niah_multivalue", "doc_qa_multi"], [800], [0.5], 2, seed=3)
    b = make_samples(tok, ["niah_multivalue", "doc_qa_multi"], [800], [0.5], 2, seed=3)
    c = make_samples(tok, ["niah_multivalue", "doc_qa_multi"], [800], [0.5], 2, seed=4)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b] != [s.to_dict() for s in c]


def test_scoring() -> None:
    any_sample = Sample("t", 1, 0.0, "", "", ["The Eiffel Tower", "eiffel"])
    assert score(any_sample, "It is the eiffel tower!") == 1.0 and score(any_sample, "Louvre") == 0.0
    all_sample = Sample("t", 1, 0.0, "", "", ["123", "456", "789"], match="all")
    assert score(all_sample, "123 and 789") == pytest.approx(2 / 3)


class AnswerGivenGenerator:
    """A stub engine that is handed the answers (a model that knows them): it must score 100%."""

    def __init__(self, tokenizer, samples) -> None:
        self.tokenizer = tokenizer
        self.answers = {s.question: s.answers for s in samples}

    def generate(self, requests, **kw):
        out = []
        for messages, _ in requests:
            question = messages[-1]["content"].rsplit("\n\n", 2)[-2]
            out.append([", ".join(self.answers[question])])
        return out


@pytest.mark.slow
def test_eval_ruler_cli_and_perfect_stub(tmp_path: Path, tiny_model: Path, tok) -> None:
    cfg = {
        "model": {"model_name_or_path": str(tiny_model), "template": "qwen", "infer_backend": "huggingface"},
        "output_dir": str(tmp_path / "ruler"),
        "tasks": list(TASKS),
        "lengths": [512, 1024],
        "depths": [0.0, 1.0],
        "samples_per_cell": 1,
        "max_new_tokens": 8,
        "musique": str(SAMPLE),
        "batch_size": 4,
    }
    path = tmp_path / "ruler.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_command([str(VENV_BIN / "llamafactory-longpo"), "eval", "ruler", str(path)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads((tmp_path / "ruler" / "scores.json").read_text())
    assert set(result["tasks"]) == set(TASKS) and set(result["by_length"]) == {"512", "1024"}
    for name in ("ruler_heatmap.png", "ruler_lengths.png"):
        assert (tmp_path / "ruler" / name).stat().st_size > 1000

    from llamafactory_longpo.eval.ruler import RulerConfig, run_ruler
    from llamafactory_longpo.text.musique import read_musique

    config = RulerConfig(**{**cfg, "output_dir": str(tmp_path / "stub")})
    samples = make_samples(
        tok,
        config.tasks,
        config.lengths,
        config.depths,
        1,
        config.seed,
        records=read_musique(str(SAMPLE), strict=False, log=lambda *_: None)[0],
    )
    perfect = run_ruler(config, generator=AnswerGivenGenerator(tok, samples), log=lambda *_: None)
    assert perfect["average"] == 100.0
