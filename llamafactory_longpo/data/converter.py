"""``"formatting": "short_to_long"``: validate the files, then turn records into rows for a stage.

One raw record becomes one or more rows, depending on what the stage trains on:

- ``solopo``, ``s2ld``: one row per turn (each turn is an independent example, as in SoLoPO);
- ``longpo``: one row per record (the multi-turn long conversation, as in LongPO);
- ``pair`` (the toolkit's ``dpo``/``rm``): one row per turn in LLaMA-Factory's pairwise shape,
  long view (multi-turn history of chosen answers) or short view;
- ``sft`` (the toolkit's ``sft``): chosen responses only; long view = the whole chosen conversation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

from .record import (
    ALL_FIELDS,
    TURN_FIELDS,
    Record,
    RecordError,
    assistant_message,
    iter_raw_records,
    long_conversation,
    parse_record,
    short_prompt,
)

FORMATTING = "short_to_long"
PLUGIN_TARGETS = ("solopo", "longpo", "s2ld")
RECORD_COLUMN = "_s2l"
TURN_COLUMN = "_s2l_turn"
# file extensions LLaMA-Factory loads as JSON
_JSON_EXTS = (".json", ".jsonl")


def column_map(columns: Optional[Mapping[str, str]]) -> dict[str, str]:
    """Keep only the renamings that concern short-to-long fields."""
    return {k: v for k, v in (columns or {}).items() if k in ALL_FIELDS}


def dataset_files(dataset_dir: str, file_name: str) -> list[str]:
    """The JSON/JSONL files behind a ``file_name`` entry (a file or a folder of files)."""
    path = os.path.join(dataset_dir, file_name)
    if os.path.isdir(path):
        return sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(_JSON_EXTS))
    return [path] if os.path.isfile(path) else []


def validate_files(
    paths: list[str], columns: Optional[Mapping[str, str]] = None, warn: Optional[Callable[[str], None]] = None
) -> int:
    """Validate every record of every file before the toolkit loads them; returns the record count.

    Done up front so a bad file fails with its own line number, before anything is tokenized or written.
    Valid but suspicious data (an empty file beside others, chosen == rejected, a long context shorter
    than its short one, duplicate records) is counted and reported through ``warn``, one line per kind;
    every pair identical is a warning too: the preference term then learns nothing, but LongPO's NLL term,
    SoLoPO's alignment term and the ``sft`` view still train.
    """
    count = 0
    seen: set[str] = set()
    odd: dict[str, list[str]] = {}  # kind -> where each case is

    def note(kind: str, where: str) -> None:
        odd.setdefault(kind, []).append(where)

    turns = same = 0
    for path in paths:
        if not path.endswith(_JSON_EXTS):
            raise RecordError(f"{path}: short_to_long datasets must be .json or .jsonl files")
        in_file = 0
        for index, line, raw in iter_raw_records(path):
            record = parse_record(raw, source=path, index=index, line=line, columns=columns)
            where = f"{path}: record {index}" + (f" (line {line})" if line is not None else "")
            digest = hashlib.sha256(json.dumps(record.to_dict(), sort_keys=True).encode()).hexdigest()
            if digest in seen:
                note("duplicate", where)
            seen.add(digest)
            texts = [record.system or "", record.long_context, *(v for turn in record.turns for v in vars(turn).values())]
            if any("\x00" in text for text in texts):
                note("nul", where)
            for t, turn in enumerate(record.turns):
                turns += 1
                if turn.chosen.strip() == turn.rejected.strip():
                    same += 1
                    note("same", f"{where}, turn {t}")
                if len(record.long_context) < len(turn.short_context):
                    note("shorter", f"{where}, turn {t}")
            in_file += 1
        if in_file == 0:
            note("empty", path)
        count += in_file
    if count == 0:
        raise RecordError(
            f"{paths[0]}: the file holds no records" if len(paths) == 1 else f"{', '.join(paths)}: no file holds a record"
        )
    messages = {
        "empty": "file(s) hold no records",
        "same": f"of {turns} turns have chosen == rejected (nothing to prefer"
        + ("; with every pair identical the preference term learns nothing" if same == turns else "; they only add noise")
        + ")",
        "shorter": "turn(s) have a long_context shorter than their short_context (the long input should contain the short one)",
        "duplicate": f"of {count} records repeat an earlier record (they weigh twice)",
        "nul": f"of {count} records hold NUL characters (\\u0000; the tokenizer reads them as text)",
    }
    for kind, places in odd.items():
        if warn is not None:
            warn(f"short_to_long data: {len(places)} {messages[kind]}; first: {places[0]}")
    return count


def load_files(paths: list[str], columns: Mapping[str, str], cache_dir: Optional[str] = None) -> Any:
    """The records of validated files as a ``datasets.Dataset`` holding only the fields the converter reads.

    Loading whole files with ``datasets``' JSON reader makes every extra field part of one Arrow schema, so an
    ``id`` that is an int in one record and a string in another fails the load; the fields kept here are all
    validated strings. The file sizes and times are arguments, so an edited file is not read from the cache.
    """
    import datasets

    cols = {name: columns.get(name, name) for name in ALL_FIELDS}
    turn = {cols[name]: datasets.Value("string") for name in TURN_FIELDS}
    features = datasets.Features(
        {cols["system"]: datasets.Value("string"), cols["long_context"]: datasets.Value("string"), cols["turns"]: [turn]}
    )
    stamps = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]
    return datasets.Dataset.from_generator(
        _canonical_records, features=features, gen_kwargs={"stamps": stamps, "cols": cols}, cache_dir=cache_dir
    )


def _canonical_records(stamps: list[tuple[str, int, int]], cols: dict[str, str]) -> Iterator[dict[str, Any]]:
    for path, _, _ in stamps:
        for _, _, raw in iter_raw_records(path):
            yield {
                cols["system"]: raw.get(cols["system"]),
                cols["long_context"]: raw[cols["long_context"]],
                cols["turns"]: [{cols[name]: t[cols[name]] for name in TURN_FIELDS} for t in raw[cols["turns"]]],
            }


def _rows_for(record: Record, target: str, view: str, joiner: str) -> list[dict[str, Any]]:
    """Rows of one record for a target (see module docstring)."""
    blob = json.dumps(record.to_dict(), ensure_ascii=False)
    turns = range(len(record.turns))
    if target == "longpo":
        return [{RECORD_COLUMN: blob, TURN_COLUMN: -1}]
    if target in ("solopo", "s2ld"):
        return [{RECORD_COLUMN: blob, TURN_COLUMN: i} for i in turns]

    def std(prompt: list[dict[str, str]], responses: list[str]) -> dict[str, Any]:
        return {
            "_prompt": prompt,
            "_response": [assistant_message(r) for r in responses],
            "_system": record.system or "",
            "_tools": "",
            "_images": None,
            "_videos": None,
            "_audios": None,
        }

    if target == "pair":
        rows = []
        for i in turns:
            t = record.turns[i]
            prompt = (
                long_conversation(record, "chosen", upto=i, joiner=joiner) if view == "long" else short_prompt(record, i, joiner)
            )
            rows.append(std(prompt, [t.chosen, t.rejected]))
        return rows
    if target == "sft":
        if view == "long":
            conversation = long_conversation(record, "chosen", joiner=joiner)
            return [std(conversation[:-1], [record.turns[-1].chosen])]
        return [std(short_prompt(record, i, joiner), [record.turns[i].chosen]) for i in turns]
    raise RecordError(f"unknown short_to_long target {target!r}")


def convert_batch(
    batch: Mapping[str, list[Any]],
    indices: list[int],
    *,
    source: str,
    columns: Mapping[str, str],
    target: str,
    view: str,
    joiner: str,
) -> dict[str, list[Any]]:
    """Batched ``datasets.map`` function: raw records in, stage rows out (row count may change)."""
    keys = list(batch.keys())
    out: dict[str, list[Any]] = {}
    for pos, index in enumerate(indices):
        raw = {k: batch[k][pos] for k in keys}
        record = parse_record(raw, source=source, index=index, columns=columns)
        for row in _rows_for(record, target, view, joiner):
            for k, v in row.items():
                out.setdefault(k, []).append(v)
    if not out:  # keep the schema even for an empty batch
        names = (
            [RECORD_COLUMN, TURN_COLUMN]
            if target in PLUGIN_TARGETS
            else ["_prompt", "_response", "_system", "_tools", "_images", "_videos", "_audios"]
        )
        out = {k: [] for k in names}
    return out


def align_short_to_long(
    dataset: Any, columns: Mapping[str, str], data_args: Any, training_args: Any, target: str, *, source: str
) -> Any:
    """Convert a loaded short-to-long dataset for ``target`` (plays LLaMA-Factory's ``align_dataset``); ``columns``:
    the dataset_info.json renamings of its fields; ``source``: how errors name the dataset.

    Rows of the plugin's stages carry their whole record as one JSON string (:data:`RECORD_COLUMN`), decoded by the
    processor: a LongPO row needs every turn's short context, and a string keeps the Arrow schema fixed whatever
    the record holds (an optional system prompt, any number of turns)."""
    from functools import partial

    column_names = list(next(iter(dataset)).keys())
    kwargs: dict[str, Any] = {}
    if not data_args.streaming:
        kwargs = dict(
            num_proc=data_args.preprocessing_num_workers,
            load_from_cache_file=(not data_args.overwrite_cache) or (training_args.local_process_index != 0),
            desc=f"Converting short_to_long records ({target})",
        )
    fn = partial(
        convert_batch,
        source=source,
        columns=columns,
        target=target,
        view=data_args.s2l_view,
        joiner=data_args.s2l_joiner,
    )
    return dataset.map(fn, batched=True, with_indices=True, remove_columns=column_names, **kwargs)
