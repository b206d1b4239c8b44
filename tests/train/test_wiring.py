"""One wiring for training and the planner: what it changes process-wide is put back, and train/ stands alone."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import ROOT

PACKAGE = ROOT / "llamafactory_longpo"


def _imports(path: Path) -> set[str]:
    """Absolute names of the package's own modules that ``path`` imports (relative imports resolved)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("llamafactory_longpo")}


def test_train_does_not_import_the_planner() -> None:
    """Imports run one way: the planner traces the trainer, never the reverse."""
    offenders = {
        str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n.startswith("llamafactory_longpo.planner"))
        for p in (PACKAGE / "train").glob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_a_traced_step_leaves_the_attention_registry_as_it_found_it(tmp_path: Path, tiny_model: Path) -> None:
    """The planner wires its traced copy as training does (LongPO's shared prefix replaces the sdpa entry of
    transformers' process-wide registry); the next model in the process must see the registry unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from llamafactory_longpo.planner.plan import estimate
    from llamafactory_longpo.planner.step import Lengths, load_run_config, step_setup

    raw = yaml.safe_load((ROOT / "examples" / "tiny" / "longpo_tiny.yaml").read_text())
    raw.update(model_name_or_path=str(tiny_model))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    before = dict(ALL_ATTENTION_FUNCTIONS.items())
    run = load_run_config(str(config))
    with step_setup(run, 2, Lengths(long=64, short=32, response=8), "sdpa"):  # the step the estimate traces
        wired = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert getattr(wired, "shared_prefix_kernel", None) == "sdpa", "the traced step was not wired as training is"
    assert estimate(run, 256, 1).total > 0
    after = dict(ALL_ATTENTION_FUNCTIONS.items())
    assert {k for k in before if after.get(k) is not before[k]} == set()
