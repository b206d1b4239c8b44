"""The short-to-long record: validation messages name file, record (line) and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamafactory_longpo.data.record import RecordError, load_records, long_conversation, parse_record, short_prompt

GOOD = {
    "system": "sys",
    "long_context": "LONG DOC",
    "turns": [
        {"short_context": "chunk one", "instruction": "q1", "chosen": "a1", "rejected": "b1"},
        {"short_context": "chunk two", "instruction": "q2", "chosen": "a2", "rejected": "b2"},
    ],
}


def _write(tmp_path: Path, rows: list, name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _mutated(fn) -> dict:
    rec = json.loads(json.dumps(GOOD))
    fn(rec)
    return rec


@pytest.mark.parametrize(
    "mutate,expected",
    [
        (lambda r: r.pop("long_context"), "record 1 (line 2): field 'long_context' is missing"),
        (lambda r: r.update(longcontext=r.pop("long_context")), "field 'long_context' is missing (found 'longcontext'"),
        (lambda r: r.update(turns=[]), "field 'turns' is empty"),
        (lambda r: r["turns"][1].pop("short_context"), "field 'turns[1].short_context' is missing"),
        (lambda r: r["turns"][0].update(chosen=""), "field 'turns[0].chosen' is empty"),
        (lambda r: r["turns"][0].update(rejected=3), "field 'turns[0].rejected' must be a string, got int"),
        (lambda r: r.update(turns="x"), "field 'turns' must be a list"),
    ],
)
def test_bad_records_name_file_record_field(tmp_path: Path, mutate, expected: str) -> None:
    path = _write(tmp_path, [GOOD, _mutated(mutate)])
    with pytest.raises(RecordError) as err:
        load_records(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_non_utf8_and_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"long_context": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(RecordError, match=r"latin.jsonl: line 2: not valid UTF-8"):
        load_records(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(RecordError, match=r"record 1 \(line 2\): invalid JSON"):
        load_records(bad)


def test_json_array_and_renamed_columns(tmp_path: Path) -> None:
    renamed = {"doc": "LONG", "qa": [{"evidence": "e", "q": "q", "good": "g", "bad": "b"}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([renamed, renamed]), encoding="utf-8")
    cols = {
        "long_context": "doc",
        "turns": "qa",
        "short_context": "evidence",
        "instruction": "q",
        "chosen": "good",
        "rejected": "bad",
    }
    records = load_records(path, columns=cols)
    assert len(records) == 2 and records[1].turns[0].chosen == "g" and records[0].long_context == "LONG"
    with pytest.raises(RecordError, match=r"d.json: record 0: field 'long_context' is missing"):
        load_records(path)


def test_views() -> None:
    rec = parse_record(GOOD)
    assert short_prompt(rec, 1) == [{"role": "user", "content": "chunk two\n\nq2"}]
    conv = long_conversation(rec, "rejected")
    assert [m["content"] for m in conv] == ["LONG DOC\n\nq1", "b1", "q2", "b2"]
    prompt = long_conversation(rec, "chosen", upto=1)
    assert [m["content"] for m in prompt] == ["LONG DOC\n\nq1", "a1", "q2"]
