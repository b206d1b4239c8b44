"""The suite's two xdist workers (scripts/test.sh): the tests that open ports must all run on one of them."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

PORT_TESTS = [
    "tests/test_bootstrap.py::test_plain_python_pays_nothing",
    "tests/e2e/test_zero3.py::test_nan_gradient_stops_a_zero3_run_before_its_checkpoint",
]
OTHER_TEST = "tests/eval/test_kv_hops.py::test_answers_quote_pair_facts"


def test_port_opening_tests_form_one_xdist_group() -> None:
    # --setup-plan: the workers collect and the scheduler groups, but no test runs (and no port opens)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "--dist", "loadgroup"]
    proc = subprocess.run(
        [*cmd, "--setup-plan", "-v", *PORT_TESTS, OTHER_TEST], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = {line.split()[0] for line in proc.stdout.splitlines() if "::" in line and line.startswith("tests/")}
    # xdist's loadgroup scheduler sends every test whose id ends in the same @group to one worker
    assert ids == {f"{t}@ports" for t in PORT_TESTS} | {OTHER_TEST}
