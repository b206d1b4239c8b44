"""Resumable JSONL output for long builds: append and flush each record, remember every decision.

``<out>`` holds the records; ``<out>.progress.jsonl`` one line per processed input (``{"key", "status"}``),
so a killed build resumes where it stopped, with no duplicate and no lost record; ``<out>.summary.json``
is written at the end. A half-written last line (killed mid-write) is cut off on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections import Counter
from collections.abc import Iterator
from typing import Any, Optional

from ..errors import RecordError


def record_seed(base: int, key: str) -> int:
    """A per-input seed: the same input gets the same randomness whatever ran before it (so a resumed build
    equals an uninterrupted one)."""
    return int(hashlib.sha256(f"{base}:{key}".encode()).hexdigest()[:8], 16)


def _clean_tail(path: str) -> None:
    """Drop a trailing partial line left by a kill."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return
        fh.truncate(data.rfind(b"\n") + 1)


def _read_own_lines(path: str, required: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a file this module wrote; any other line is an error naming it (never skipped:
    resuming past a line it cannot read would silently redo or lose records)."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                entry = err.msg
            if not isinstance(entry, dict) or any(k not in entry for k in required):
                why = entry if isinstance(entry, str) else "wrong fields"
                raise RecordError(
                    f"{path}: line {lineno}: not a line this build wrote ({why}); fix it, or move the file away to start over"
                )
            yield entry


class ResumableWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self.progress_path = f"{path}.progress.jsonl"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        for p in (path, self.progress_path):
            _clean_tail(p)
        self.done: dict[str, str] = {}
        self.stats: dict[str, dict[str, Any]] = {}  # key -> statistics of a processed input
        if os.path.exists(self.progress_path):
            for entry in _read_own_lines(self.progress_path, ("key", "status")):
                self.done[entry["key"]] = entry["status"]
                if entry.get("stats"):
                    self.stats[entry["key"]] = entry["stats"]
        # a record written just before a kill, whose progress line was not: count it as kept
        self.kept_keys: set[str] = set()
        if os.path.exists(path):
            for entry in _read_own_lines(path, ()):
                key = entry.get("id")
                if key is not None:
                    self.kept_keys.add(str(key))
        for key in self.kept_keys - set(self.done):
            self._progress(key, "kept")
        self._out = open(path, "a", encoding="utf-8")

    def _progress(self, key: str, status: str, stats: Optional[dict[str, Any]] = None) -> None:
        with open(self.progress_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"key": key, "status": status, **({"stats": stats} if stats else {})}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done[key] = status
        if stats:
            self.stats[key] = stats

    def is_done(self, key: str) -> bool:
        return key in self.done

    def keep(self, key: str, record: dict[str, Any], stats: Optional[dict[str, Any]] = None) -> None:
        self._out.write(json.dumps({"id": key, **record}, ensure_ascii=False) + "\n")
        self._out.flush()
        os.fsync(self._out.fileno())
        self._progress(key, "kept", stats)

    def drop(self, key: str, reason: str, stats: Optional[dict[str, Any]] = None) -> None:
        self._progress(key, f"dropped:{reason}", stats)

    def close(self) -> None:
        self._out.close()


def summarize(writer: ResumableWriter, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Kept/dropped counts (per reason), filtered parts (per reason) and statistics (count, total, mean, min,
    max) of the kept records' numbers; written beside the output. Counts come from the progress log, so a
    resumed build sums both runs."""
    statuses = Counter(writer.done.values())
    lengths: dict[str, list[int]] = {}
    filtered: Counter[str] = Counter()
    for key, stats in writer.stats.items():
        for name, value in stats.items():
            if isinstance(value, dict):  # per-reason counts, e.g. turns dropped by a filter
                filtered.update(value)
            elif writer.done.get(key) == "kept":
                lengths.setdefault(name, []).append(value)
    summary: dict[str, Any] = {
        "output": writer.path,
        "kept": statuses.get("kept", 0),
        "dropped": {k.split(":", 1)[1]: v for k, v in sorted(statuses.items()) if k.startswith("dropped:")},
        "lengths": {
            name: {"count": len(v), "total": sum(v), "mean": round(statistics.fmean(v), 1), "min": min(v), "max": max(v)}
            for name, v in lengths.items()
            if v
        },
        **({"filtered": dict(sorted(filtered.items()))} if filtered else {}),
        **(extra or {}),
    }
    with open(f"{writer.path}.summary.json", "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
    return summary


def merge_dataset_info(info_path: str, name: str, data_path: str) -> None:
    """Add or update one short_to_long entry in ``dataset_info.json``, keeping every other entry."""
    info: dict[str, Any] = {}
    if os.path.exists(info_path):
        with open(info_path, encoding="utf-8") as fh:
            info = json.load(fh)
    rel = os.path.relpath(os.path.abspath(data_path), os.path.dirname(os.path.abspath(info_path)))
    info[name] = {"file_name": rel, "formatting": "short_to_long", "ranking": True}
    tmp = f"{info_path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    os.replace(tmp, info_path)
