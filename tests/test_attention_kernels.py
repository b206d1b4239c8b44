"""Attention settings that cannot run stop before anything is loaded, in one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import base_config, run_cli, write_yaml

OK = dict(stage="longpo", flash_attn="sdpa", half_precision=False, sequence_parallel_size=1, shared_prefix=True)
BAD = {
    "fa2-in-fp32": (dict(flash_attn="fa2"), "flash_attn: fa2 runs in bf16 or fp16 only"),
    "fa3-in-fp32": (dict(flash_attn="fa3", stage="solopo"), "flash_attn: fa3 runs in bf16 or fp16 only"),
    "eager-with-sequence-parallel": (
        dict(flash_attn="disabled", sequence_parallel_size=2),
        "flash_attn: disabled (eager) cannot run sequence_parallel_size: 2; use sdpa or fa2 or fa3",
    ),
    "fa3-shared-prefix": (dict(flash_attn="fa3", half_precision=True), "flash_attn: fa3 cannot run LongPO's shared prefix"),
}
GOOD = {
    "fa2-bf16-sp4": dict(flash_attn="fa2", half_precision=True, sequence_parallel_size=4),
    "eager-shared-prefix": dict(flash_attn="disabled"),
    "fa3-two-rows": dict(flash_attn="fa3", half_precision=True, shared_prefix=False),
    "fa3-solopo": dict(flash_attn="fa3", half_precision=True, stage="solopo"),
    "auto": dict(flash_attn="auto"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_impossible_kernel_settings_fail(name: str) -> None:
    from llamafactory_longpo.attention_kernels import check_attention_kernels
    from llamafactory_longpo.errors import ConfigError

    change, message = BAD[name]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_attention_kernels(**{**OK, **change})


@pytest.mark.parametrize("name", list(GOOD))
def test_possible_kernel_settings_pass(name: str) -> None:
    from llamafactory_longpo.attention_kernels import check_attention_kernels

    check_attention_kernels(**{**OK, **GOOD[name]})


def test_cli_stops_before_loading(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "out"
    config = base_config(tiny_model, out, stage="longpo", pref_loss="sigmoid", dataset="longpo_demo", flash_attn="fa2")
    proc = run_cli(["train", str(write_yaml(tmp_path / "c.yaml", config))], cwd=tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stdout.splitlines() if line.startswith("[llamafactory-longpo] error:")]
    assert len(errors) == 1 and BAD["fa2-in-fp32"][1] in errors[0]
    assert "Traceback" not in proc.stdout and "Loading weights" not in proc.stdout and not out.exists()
