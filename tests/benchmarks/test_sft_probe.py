"""The SFT probe (benchmarks/sft_probe.py): the answer's names get the right roles under the replication's
own tokenizer, and a two-step run prints accuracy and the per-role losses (no value asserted: two steps
teach nothing)."""

from __future__ import annotations

import random
import sys

from tests.conftest import ROOT, run_command

sys.path.insert(0, str(ROOT / "benchmarks"))

import kv_hops as kv  # noqa: E402
import sft_probe  # noqa: E402

from llamafactory_longpo.tiny import train_tokenizer  # noqa: E402


def test_name_roles_mark_the_two_lookups_and_the_copies():
    tokenizer = train_tokenizer(kv.tokenizer_corpus(0), 1024)
    item = kv.make_item("t", random.Random(3))
    roles = sft_probe.name_roles(tokenizer, item)
    tokens = tokenizer(item.response, add_special_tokens=False)["input_ids"]
    names = {i: tokenizer.decode([tokens[i]]).strip() for i in roles}
    # "The key of A is B. The key of B is C. Final answer: C": A copy, B hop 1, B copy, C hop 2, C copy
    assert [roles[i] for i in sorted(roles)] == ["copy", "hop 1", "copy", "hop 2", "copy"]
    assert [names[i] for i in sorted(names)] == [item.chain[0], item.chain[1], item.chain[1], item.chain[2], item.chain[2]]


def test_probe_runs_and_reports(tmp_path):
    args = ["--steps", "2", "--every", "2", "--hidden", "32"]
    proc = run_command([sys.executable, str(ROOT / "benchmarks" / "sft_probe.py"), *args], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("[probe] step 2 ")]
    assert line and "short accuracy" in line[0] and "lookup hop 1" in line[0] and "lookup hop 2" in line[0] and "copy" in line[0]
