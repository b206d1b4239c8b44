"""Every example YAML parses with the toolkit's own argument parser (plugin knobs included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

# training configs (examples/builders and examples/eval hold builder and evaluation configs)
EXAMPLES = sorted(p for p in (ROOT / "examples").rglob("*.yaml") if not {"builders", "eval"} & set(p.parts))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses(path: Path) -> None:
    from llamafactory.hparams import parser
    from transformers import HfArgumentParser

    from llamafactory_longpo.attention_kernels import check_attention_kernels

    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config["stage"] in ("solopo", "longpo", "s2ld")
    if "deepspeed" in config:  # DeepSpeed needs torchrun; check the file exists instead of starting it
        assert (ROOT / config.pop("deepspeed")).exists()
    half_precision = config.pop("bf16", False)  # a GPU setting: the parser would refuse it on this machine
    model_args, data_args, _, finetuning_args, _ = HfArgumentParser(parser._TRAIN_ARGS).parse_dict(config)
    check_attention_kernels(  # what training checks before loading: the example runs as written on GPUs
        stage=finetuning_args.stage,
        flash_attn=model_args.flash_attn,
        half_precision=half_precision,
        sequence_parallel_size=finetuning_args.sequence_parallel_size,
        shared_prefix=finetuning_args.s2l_shared_prefix,
    )
    assert finetuning_args.stage == config["stage"]
    assert data_args.cutoff_len == config["cutoff_len"]
    if config["stage"] == "s2ld":  # a frozen teacher runs in every step
        assert finetuning_args.use_ref_model and finetuning_args.s2ld_divergence == config["s2ld_divergence"]
    if config["stage"] == "longpo":
        assert finetuning_args.use_ref_model and finetuning_args.policy_rope_theta in (None, 1.0e7)
