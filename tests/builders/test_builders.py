"""Data builders end to end: SoLoPO from a MuSiQue-format sample, LongPO self-instruct, self-evolution.

The SoLoPO builder runs the real tiny model through the toolkit's huggingface engine. A random tiny
model cannot answer questions, so the sample (data/musique_sample.jsonl, written for this
project) gives each question a one-letter alias that sampled text contains by chance about half the
time: the split into chosen (scores correct) and rejected (scores incorrect) is then exercised for real.

The LongPO builder and the evolution loop need a model that follows instructions (writes numbered
questions, answers them); none can exist here (no hub), so those tests use a scripted generator,
marked as such, in place of the engine. Everything else (chunking, filters, resume, dataset_info,
training with ``llamafactory-cli``) is real.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from llamafactory_longpo.data.record import load_records
from llamafactory_longpo.errors import ConfigError
from llamafactory_longpo.text.scoring import extract_final_answer, sub_em
from tests.conftest import VENV_BIN, cli_env

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "musique_sample.jsonl"


def _solopo_config(tmp: Path, tiny: Path, **kw) -> Path:
    info = tmp / "dataset_info.json"
    if not info.exists():
        info.write_text(json.dumps({"keep_me": {"file_name": "other.json"}}))
    cfg = {
        "input": str(SAMPLE),
        "output": str(tmp / "solopo.jsonl"),
        "model": {"model_name_or_path": str(tiny), "template": "qwen", "infer_backend": "huggingface"},
        "target_tokens": 600,
        "num_samples": 6,
        "temperature": 1.0,
        "max_new_tokens": 24,
        "seed": 7,
        "dataset_info": str(info),
        "dataset_name": "solopo_sample",
        **kw,
    }
    path = tmp / "build.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _build(cfg: Path, *extra: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "llamafactory-longpo"), "build", "solopo", str(cfg), *extra],
        env=cli_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def solopo_build(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    tmp = tmp_path_factory.mktemp("solopo_build")
    proc = _build(_solopo_config(tmp, tiny_model))
    assert proc.returncode == 0, proc.stdout[-3000:]
    return tmp


def test_solopo_records(solopo_build: Path, tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    items = {json.loads(line)["id"]: json.loads(line) for line in SAMPLE.read_text().splitlines()}
    lines = [json.loads(line) for line in (solopo_build / "solopo.jsonl").read_text().splitlines()]
    records = load_records(solopo_build / "solopo.jsonl")
    assert records, "no record kept"
    for raw, record in zip(lines, records):
        item = items[raw["id"]]
        turn = record.turns[0]
        for p in item["paragraphs"]:
            if p["is_supporting"]:
                assert p["paragraph_text"] in turn.short_context and p["paragraph_text"] in record.long_context
        n = len(tok.encode(record.long_context, add_special_tokens=False))
        assert abs(n - 600) <= 30
        golds = [item["answer"], *item["answer_aliases"]]
        assert sub_em(extract_final_answer(turn.chosen), golds)
        assert not sub_em(extract_final_answer(turn.rejected), golds)
    summary = json.loads((solopo_build / "solopo.jsonl.summary.json").read_text())
    assert summary["kept"] == len(records)
    assert summary["kept"] + sum(summary["dropped"].values()) == 10
    assert summary["skipped_input"] == {"unanswerable": 1}
    assert summary["lengths"]["long_tokens"]["count"] == len(records)
    info = json.loads((solopo_build / "dataset_info.json").read_text())
    assert info["keep_me"] == {"file_name": "other.json"}
    assert info["solopo_sample"]["formatting"] == "short_to_long" and info["solopo_sample"]["file_name"] == "solopo.jsonl"


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_file(solopo_build: Path, tiny_model: Path, tmp_path: Path) -> None:
    cfg = _solopo_config(tmp_path, tiny_model)
    proc = subprocess.Popen(
        [str(VENV_BIN / "llamafactory-longpo"), "build", "solopo", str(cfg)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    progress = tmp_path / "solopo.jsonl.progress.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if progress.exists() and len(progress.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(progress.read_text().splitlines())
    assert done_before < 10, "the build finished before it could be killed"
    resumed = _build(cfg)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert (tmp_path / "solopo.jsonl").read_bytes() == (solopo_build / "solopo.jsonl").read_bytes()
    keys = [json.loads(line)["key"] for line in progress.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 10


@pytest.mark.slow
def test_bad_input_lines_and_short_target(tmp_path: Path, tiny_model: Path) -> None:
    lines = SAMPLE.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    broken = json.loads(lines[1])
    broken.pop("paragraphs")
    nosupport = json.loads(lines[2])
    for p in nosupport["paragraphs"]:
        p["is_supporting"] = False
    bad.write_text("\n".join([lines[0], json.dumps(broken), json.dumps(nosupport), "{not json", lines[3]]) + "\n")
    cfg = _solopo_config(tmp_path, tiny_model, input=str(bad), num_samples=2)
    proc = _build(cfg)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "bad.jsonl: line 2: field 'paragraphs' is missing or empty" in proc.stdout
    assert "bad.jsonl: line 3: no paragraph has 'is_supporting': true" in proc.stdout
    assert "bad.jsonl: line 4: invalid JSON" in proc.stdout
    summary = json.loads((tmp_path / "solopo.jsonl.summary.json").read_text())
    assert summary["skipped_input"] == {"malformed": 3}
    assert summary["kept"] + sum(summary["dropped"].values()) == 2

    (tmp_path / "s").mkdir()
    strict = _build(
        _solopo_config(tmp_path / "s", tiny_model, input=str(bad), output=str(tmp_path / "s" / "out.jsonl")), "--strict"
    )
    assert strict.returncode == 1 and "error: " in strict.stdout and "line 2" in strict.stdout
    assert not (tmp_path / "s" / "out.jsonl").exists()

    short = _build(_solopo_config(tmp_path / "s", tiny_model, target_tokens=20, output=str(tmp_path / "s" / "o2.jsonl")))
    assert short.returncode == 1 and "target_tokens: 20 is shorter than the evidence" in short.stdout
    assert not (tmp_path / "s" / "o2.jsonl").exists()


class ScriptedGenerator:
    """Stands in for an instruction-following model (none can exist offline): numbered questions for a
    self-instruct prompt, and an answer quoting the first sentence of whatever context it was given
    (with its length, so the chunk's answer and the whole document's differ). Planted bad answers: a
    refusal for every chunk of the gazetteer of Calderon, and a repetitive answer for every
    whole-document answer of the gazetteer of Ostmark."""

    def __init__(self, tokenizer, documents: list[str]) -> None:
        self.tokenizer = tokenizer
        self.documents = documents

    def generate(self, requests, *, seeds=None, n=1, temperature=0.0, top_p=1.0, max_new_tokens=512):
        out = []
        for messages, _ in requests:
            text = messages[-1]["content"]
            whole_document = any(text.startswith(doc + "\n\n") for doc in self.documents)
            if "numbered 1." in text:
                out.append(
                    [
                        "1. Who founded the firm described here?\n2. Where was its founder born?\n"
                        "3. When was the firm founded, and by whom?\n4. ok"
                    ]
                )
            elif not whole_document and any(text.split("\n\n")[0] in doc and "Calderon" in doc[:40] for doc in self.documents):
                out.append(["I'm sorry, as an AI I cannot help with that."])
            elif whole_document and text.startswith("A gazetteer of Ostmark"):
                out.append([" ".join(["founder"] * 30)])
            else:
                first = text.split(". ")[0]
                out.append([f"Reading {len(text)} characters of context: {first}."])
        return out


def _documents() -> list[str]:
    from llamafactory_longpo import demo

    return [r["long_context"] for r in demo.build()["longpo_demo"][:4]]


def _corpus(path: Path) -> Path:
    docs = _documents()
    docs.append("too short")
    path.write_text("\n".join(json.dumps({"id": f"doc{i}", "text": d}) for i, d in enumerate(docs)) + "\n{broken\n")
    return path


def _longpo_config(tmp_path: Path, **overrides):
    """The builder over the demo's gazetteers, with chunks and documents sized for them."""
    from llamafactory_longpo.builders.longpo import LongPOBuildConfig

    sizes = dict(min_doc_tokens=200, max_doc_tokens=4000, chunk_min_tokens=60, chunk_max_tokens=200, max_turns=2)
    corpus, output = str(_corpus(tmp_path / "corpus.jsonl")), str(tmp_path / "longpo.jsonl")
    return LongPOBuildConfig(input=corpus, output=output, model={}, **sizes, **overrides)


def test_longpo_builder(tmp_path: Path, tiny_model: Path) -> None:
    from llamafactory_longpo.builders.longpo import build_longpo

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = _longpo_config(tmp_path, dataset_info=str(tmp_path / "dataset_info.json"))
    logs: list[str] = []
    summary = build_longpo(cfg, generator=ScriptedGenerator(tok, _documents()), log=logs.append)
    assert any("line 6: invalid JSON" in line for line in logs)
    assert summary["skipped_input"] == {"malformed": 1}
    assert summary["dropped"].get("outside_token_window") == 1
    records = load_records(tmp_path / "longpo.jsonl")
    assert records and summary["kept"] == len(records)
    assert any(len(r.turns) == 2 for r in records)  # multi-turn records
    assert summary["filtered"]["turn_refusal"] >= 1 and summary["filtered"]["turn_repetitive"] >= 1
    assert summary["dropped"]["refusal"] == 1 and summary["dropped"]["repetitive"] == 1
    for record in records:  # every turn of these two was filtered out
        assert not record.long_context.startswith(("A gazetteer of Ostmark", "A gazetteer of Calderon"))
        assert 1 <= len(record.turns) <= 2
        for turn in record.turns:
            assert turn.short_context in record.long_context
            n = len(tok.encode(turn.short_context, add_special_tokens=False))
            assert 60 <= n <= 200 or "\n\n" not in turn.short_context
            assert turn.instruction.startswith(("Who founded", "Where was", "When was"))
            assert turn.chosen != turn.rejected
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info["longpo_selfinstruct"]["ranking"] is True


def test_longpo_builder_with_given_instructions(tmp_path: Path, tiny_model: Path) -> None:
    """The instruction hook replaces the self-instruct step only: the model is never asked to write questions,
    each turn's instruction is one of its chunk's given pool, and both answers still come from the model."""
    from llamafactory_longpo.builders.longpo import build_longpo

    tok = AutoTokenizer.from_pretrained(tiny_model)
    asked: list[str] = []

    class Recording(ScriptedGenerator):
        def generate(self, requests, **kwargs):
            asked.extend(messages[-1]["content"] for messages, _ in requests)
            return super().generate(requests, **kwargs)

    def pools(chunks: list[str]) -> list[list[str]]:
        return [[f"Task question {i} about {c.split()[0]}?", f"Other question {i}?"] for i, c in enumerate(chunks)]

    cfg = _longpo_config(tmp_path)
    summary = build_longpo(cfg, generator=Recording(tok, _documents()), log=lambda _: None, instructions=pools)
    records = load_records(tmp_path / "longpo.jsonl")
    assert records and summary["kept"] == len(records)
    assert asked and not [a for a in asked if "numbered 1." in a]
    for record in records:
        for turn in record.turns:
            assert re.fullmatch(
                rf"(Task question \d+ about {re.escape(turn.short_context.split()[0])}|Other question \d+)\?", turn.instruction
            )
            assert turn.chosen.startswith("Reading ") and turn.chosen != turn.rejected

    with pytest.raises(ConfigError, match="instructions: 0 pools returned for"):
        build_longpo(
            dataclasses.replace(cfg, output=str(tmp_path / "o2.jsonl")),
            Recording(tok, _documents()),
            lambda _: None,
            lambda c: [],
        )


def test_longpo_builder_counts_turns_whose_answers_agree(tmp_path: Path, tiny_model: Path) -> None:
    """A model that answers a question the same from the chunk as from the whole document gives a pair with
    chosen = rejected, whose preference term is constant: the summary and the log count such turns."""
    from llamafactory_longpo.builders.longpo import build_longpo

    class ContextFree(ScriptedGenerator):  # answers "Where was ..." without reading the context
        def generate(self, requests, **kwargs):
            out = super().generate(requests, **kwargs)
            for i, (messages, _) in enumerate(requests):
                if messages[-1]["content"].endswith("Where was its founder born?"):
                    out[i] = ["The founder was born in a town by the river."]
            return out

    tok = AutoTokenizer.from_pretrained(tiny_model)
    logs: list[str] = []
    summary = build_longpo(_longpo_config(tmp_path), generator=ContextFree(tok, _documents()), log=logs.append)
    turns = [t for r in load_records(tmp_path / "longpo.jsonl") for t in r.turns]
    same = sum(t.chosen == t.rejected for t in turns)
    assert 0 < same < len(turns)
    assert summary["lengths"]["same_answer_turns"]["total"] == same
    assert f"[build longpo] {same} of {len(turns)} turns: the answer from the whole document equals" in "\n".join(logs)


@pytest.mark.slow
def test_evolution_rounds_train_and_skip_when_done(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamafactory_longpo.builders.evolve import run_recipe

    tok = AutoTokenizer.from_pretrained(tiny_model)
    recipe = {
        "base_model": str(tiny_model),
        "corpus": str(_corpus(tmp_path / "corpus.jsonl")),
        "work_dir": str(tmp_path / "evo"),
        "engine": {"template": "qwen"},
        "build": {"min_doc_tokens": 200, "chunk_min_tokens": 60, "chunk_max_tokens": 200, "max_turns": 2},
        "train": {
            "finetuning_type": "full",
            "template": "qwen",
            "pref_loss": "sigmoid",
            "max_steps": 1,
            "per_device_train_batch_size": 1,
            "report_to": "none",
            "short_cutoff_len": 512,
            "save_strategy": "no",
            "overwrite_output_dir": True,
            "s2l_ref_cache_dir": str(tmp_path / "cache"),
        },
        "rounds": [{"length": 1500}, {"length": 3000, "policy_rope_theta": 1.0e5}],
    }
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")  # the rounds run llamafactory-cli
    models = run_recipe(recipe, log=lambda *_: None, generator_factory=lambda args: ScriptedGenerator(tok, _documents()))
    assert models == [str(tmp_path / "evo" / f"round_{k}" / "model") for k in (0, 1)]
    second = yaml.safe_load((tmp_path / "evo" / "round_1" / "train.yaml").read_text())
    assert second["model_name_or_path"] == models[0] and second["policy_rope_theta"] == 1.0e5
    config = json.loads((tmp_path / "evo" / "round_1" / "model" / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 1.0e5
    seen: list[str] = []
    again = run_recipe(recipe, log=seen.append, generator_factory=lambda args: pytest.fail("a finished round was redone"))
    assert again == models and sum("already done" in line for line in seen) == 2
