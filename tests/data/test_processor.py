"""Tokenization with the real chat template and tiny tokenizer; separate padding of short/long rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llamafactory_longpo.data.converter import RECORD_COLUMN, TURN_COLUMN
from llamafactory_longpo.data.plan import RowPlan
from llamafactory_longpo.data.record import parse_record
from tests.conftest import ROOT

IGNORE = -100


@pytest.fixture(scope="module")
def setup(tiny_model: Path):
    from llamafactory.data import get_template_and_fix_tokenizer

    from llamafactory_longpo.integration import plugin_argument_classes

    _, data_cls = plugin_argument_classes()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    data_args = data_cls(template="qwen", cutoff_len=4096, short_cutoff_len=1024)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    return tokenizer, template, data_args


def _processor(setup, **overrides):
    from llamafactory_longpo.data.processor import ShortToLongDatasetProcessor

    tokenizer, template, data_args = setup
    import copy

    args = copy.copy(data_args)
    for k, v in overrides.items():
        setattr(args, k, v)
    return ShortToLongDatasetProcessor(template=template, tokenizer=tokenizer, processor=None, data_args=args)


def _records(name: str, n: int) -> list[str]:
    lines = (ROOT / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.dumps(parse_record(json.loads(line)).to_dict()) for line in lines]


def _labels_text(tokenizer, labels: list[int]) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE])


def test_solopo_rows_mask_all_but_assistant(setup) -> None:
    tokenizer = setup[0]
    blobs = _records("solopo_demo", 3)
    proc = _processor(setup, s2l_plan=RowPlan("solopo", long_rejected=True))
    out = proc.preprocess_dataset({RECORD_COLUMN: blobs, TURN_COLUMN: [0, 0, 0]})
    assert len(out["chosen_input_ids"]) == 3
    rec = json.loads(blobs[0])
    turn = rec["turns"][0]
    assert _labels_text(tokenizer, out["chosen_labels"][0]) == turn["chosen"] + "<|im_end|>\n"
    assert _labels_text(tokenizer, out["rejected_labels"][0]) == turn["rejected"] + "<|im_end|>\n"
    # the same response tokens are scored on the short and on the long input
    resp = lambda labels: [t for t in labels if t != IGNORE]  # noqa: E731
    assert resp(out["long_chosen_labels"][0]) == resp(out["chosen_labels"][0])
    assert resp(out["long_rejected_labels"][0]) == resp(out["rejected_labels"][0])
    long_text = tokenizer.decode(out["long_chosen_input_ids"][0])
    assert rec["long_context"] in long_text and turn["instruction"] in long_text and turn["short_context"] not in long_text
    short_text = tokenizer.decode(out["chosen_input_ids"][0])
    assert turn["short_context"] + "\n\n" + turn["instruction"] in short_text
    assert len(out["long_chosen_input_ids"][0]) > 3 * len(out["chosen_input_ids"][0])


def test_longpo_rows_and_reference_turns(setup) -> None:
    tokenizer = setup[0]
    blobs = _records("longpo_demo", 2)
    out = _processor(setup, s2l_plan=RowPlan("longpo")).preprocess_dataset({RECORD_COLUMN: blobs, TURN_COLUMN: [-1, -1]})
    rec = json.loads(blobs[1])
    n = len(rec["turns"])
    assert len(out["ref_chosen_input_ids"][1]) == n == len(out["ref_rejected_labels"][1])
    chosen_labels = _labels_text(tokenizer, out["chosen_labels"][1])
    assert chosen_labels == "".join(t["chosen"] + "<|im_end|>\n" for t in rec["turns"])
    assert _labels_text(tokenizer, out["rejected_labels"][1]) == "".join(t["rejected"] + "<|im_end|>\n" for t in rec["turns"])
    text = tokenizer.decode(out["chosen_input_ids"][1])
    assert text.count(rec["long_context"]) == 1  # the document only in the first user turn
    for i, t in enumerate(rec["turns"]):
        assert _labels_text(tokenizer, out["ref_chosen_labels"][1][i]) == t["chosen"] + "<|im_end|>\n"
        assert t["short_context"] in tokenizer.decode(out["ref_chosen_input_ids"][1][i])


def test_overlong_drop_and_middle_cut(setup, caplog, capsys) -> None:
    tokenizer = setup[0]
    blobs = _records("solopo_demo", 4)
    full = _processor(setup, s2l_plan=RowPlan("solopo")).preprocess_dataset({RECORD_COLUMN: blobs, TURN_COLUMN: [0] * 4})
    lengths = sorted(len(x) for x in full["long_chosen_input_ids"])
    cutoff = lengths[1] + 1  # two samples fit, two do not
    drop = _processor(setup, s2l_plan=RowPlan("solopo"), cutoff_len=cutoff)
    out = drop.preprocess_dataset({RECORD_COLUMN: blobs, TURN_COLUMN: [0] * 4})
    assert len(out["long_chosen_input_ids"]) == 2
    assert "Dropped 2 of 4 solopo samples" in capsys.readouterr().err + caplog.text
    middle = _processor(setup, s2l_plan=RowPlan("solopo"), cutoff_len=cutoff, s2l_overlong="middle")
    out = middle.preprocess_dataset({RECORD_COLUMN: blobs, TURN_COLUMN: [0] * 4})
    assert len(out["long_chosen_input_ids"]) == 4
    for blob, ids, labels in zip(blobs, out["long_chosen_input_ids"], out["long_chosen_labels"]):
        turn = json.loads(blob)["turns"][0]
        assert len(ids) <= cutoff
        text = tokenizer.decode(ids)
        # the instruction, the assistant header and the whole response survive the cut
        assert turn["instruction"] + "<|im_end|>\n<|im_start|>assistant\n" + turn["chosen"] in text
        assert _labels_text(tokenizer, labels) == turn["chosen"] + "<|im_end|>\n"


@pytest.mark.parametrize("target,long_rejected", [("solopo", False), ("solopo", True), ("longpo", False)])
def test_schema_is_stable_when_a_batch_is_all_dropped(setup, target: str, long_rejected: bool) -> None:
    name = "solopo_demo" if target == "solopo" else "longpo_demo"
    blobs = _records(name, 2)
    turns = [0, 0] if target == "solopo" else [-1, -1]
    kept = _processor(setup, s2l_plan=RowPlan(target, long_rejected=long_rejected)).preprocess_dataset(
        {RECORD_COLUMN: blobs, TURN_COLUMN: turns}
    )
    none = _processor(setup, s2l_plan=RowPlan(target, long_rejected=long_rejected), cutoff_len=16).preprocess_dataset(
        {RECORD_COLUMN: blobs, TURN_COLUMN: turns}
    )
    assert set(none) == set(kept) and all(v == [] for v in none.values())
    assert all(len(v) == 2 for v in kept.values())


def test_collator_pads_short_and_long_separately(setup, tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    from llamafactory_longpo.data.collator import ShortToLongDataCollator

    tokenizer, template, _ = setup
    blobs = _records("solopo_demo", 2)
    out = _processor(setup, s2l_plan=RowPlan("solopo")).preprocess_dataset({RECORD_COLUMN: blobs, TURN_COLUMN: [0, 0]})
    features = [{k: v[i] for k, v in out.items()} for i in range(2)]
    collator = ShortToLongDataCollator(
        plan=RowPlan("solopo"),
        template=template,
        model=AutoModelForCausalLM.from_pretrained(tiny_model),
        pad_to_multiple_of=8,
        label_pad_token_id=IGNORE,
        tokenizer=tokenizer,
        processor=None,
    )
    batch = collator(features)
    short_max = max(len(x) for x in out["chosen_input_ids"] + out["rejected_input_ids"])
    long_max = max(len(x) for x in out["long_chosen_input_ids"])
    assert batch["input_ids"].shape == (4, -(-short_max // 8) * 8)
    assert batch["long_input_ids"].shape == (2, -(-long_max // 8) * 8)
    assert batch["long_input_ids"].shape[1] > 2 * batch["input_ids"].shape[1]
    assert batch["long_labels"][0, : len(out["long_chosen_labels"][0])].tolist() == out["long_chosen_labels"][0]
