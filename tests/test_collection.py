"""Every test file under ``tests/`` is collected by ``pytest tests``, the command CI runs.

pytest silently skips folders named ``build``, ``dist``, ``venv``, ``node_modules`` and dot-folders (its default
``norecursedirs``), so a test file there never runs and nothing says so; this test says so.
"""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_pytest_collects_every_test_file_on_disk() -> None:
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")}
    assert on_disk, "no test files found"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    collected = {line.split("::", 1)[0] for line in out.stdout.splitlines() if "::" in line}
    assert on_disk - collected == set(), f"test files pytest does not collect: {sorted(on_disk - collected)}"
