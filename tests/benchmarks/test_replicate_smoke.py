"""The replication benchmark (benchmarks/replicate_small.py) end to end in its smallest configuration, as a
real subprocess: SFT from scratch, both builders, the nine methods through ``llamafactory-cli train``, the
evaluation and the report. No accuracy is asserted (a few steps teach the model nothing)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.conftest import ROOT, run_command

pytestmark = pytest.mark.slow  # multi-minute end-to-end runs (CI runs them; -m 'not slow' skips them)

METHODS = [
    *("SFT-long", "Long-DPO", "LongPO", "LongPO (NLL on answers)", "SoLo-DPO", "SoLo-SimPO", "SoLo-ORPO"),
    *("S2LD off-policy", "S2LD on-policy"),
]


def test_replicate_smallest_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "replicate"
    start = time.perf_counter()
    script = str(ROOT / "benchmarks" / "replicate_small.py")
    proc = run_command([sys.executable, script, "--smallest", "--out", str(out)], ROOT, timeout=1200)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-4000:]
    print(f"replicate_small.py --smallest: {wall:.0f} s")

    # the table, printed and written
    header = "| method | stage | short ("
    assert header in proc.stdout
    table = (out / "results.md").read_text()
    assert table.startswith("two-hop, accuracy % [95% interval]\n\n" + header)  # two tables: two-hop, then single-hop
    assert "single, accuracy % [95% interval]\n\n" + header in table
    for name in ["SFT start", *METHODS]:
        assert table.count(f"| {name} |") == 2

    # the JSON: every method evaluated at every length, trained with a recorded wall time
    result = json.loads((out / "results.json").read_text())
    assert list(result["methods"]) == ["SFT start", *METHODS]
    for name, r in result["methods"].items():
        assert set(r["accuracy"]) == {"1", "2", "4", "8"}
        assert all(0.0 <= a <= 100.0 for a in r["accuracy"].values())
        if name != "SFT start":
            assert r["train"]["wall_s"] > 0
    lengths = result["lengths"]
    assert lengths["1"] < lengths["2"] < lengths["4"] < lengths["8"]
    # what was built how: SoLoPO by the CLI builder, LongPO attempted unchanged, then with the task's questions
    data = result["data"]
    assert data["solopo"]["summary"]["kept"] > 0
    assert "attempt" in data["longpo"] and data["longpo"]["summary"]["kept"] > 0
    # the task's questions reached the builder through its instructions hook, one pool per chunk
    assert 0 <= data["longpo"]["pool_misses"] < data["longpo"]["pool_requests"]
    samples = (out / "samples.jsonl").read_text().splitlines()
    assert len(samples) == (1 + len(METHODS)) * 4 * 2 * result["eval_items"]  # two tasks (two-hop, single-hop) at four lengths
    for r in result["methods"].values():  # each cell with its 95% interval
        for cells in r["by_task"].values():
            assert all(c["low"] <= c["accuracy"] <= c["high"] and c["n"] == result["eval_items"] for c in cells.values())

    # the plot
    png = out / "accuracy_vs_length.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
