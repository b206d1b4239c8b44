"""One training step of a run's own code path, set up from its YAML on a model of reduced depth.

The YAML goes through the toolkit's argument parser with the plugin's classes (the same validation, the
same one-line errors as ``llamafactory-cli train``). The model is built from ``config.json`` alone with
the toolkit's own ``prepare_model_for_training`` (gradient checkpointing) and ``init_adapter`` (full,
freeze, LoRA), and the step is the trainer's own ``training_step``: :class:`ShortToLongTrainer` for the
plugin's stages, the toolkit's DPO and SFT trainers for ``dpo`` and ``sft``.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ConfigError
from ..hparams import PLUGIN_STAGES
from ..train.offload import OffloadLedger, settle_checkpointing
from ..train.spec import RunSpec, separate_reference_model
from ..train.zero3 import ZeroConfig

SHAPES_DIR = Path(__file__).with_name("shapes")
STAGES = (*PLUGIN_STAGES, "dpo", "sft")
DEFAULT_RESPONSE_TOKENS = 512


@dataclass
class RunConfig:
    """A parsed training YAML plus what the planner needs beside it."""

    path: str
    model_args: Any
    data_args: Any
    training_args: Any
    finetuning_args: Any
    zero: ZeroConfig
    model_config: Any  # transformers PretrainedConfig at full depth
    model_source: str
    tmp: Any = field(default=None, repr=False)  # keeps the scratch output_dir alive

    @property
    def stage(self) -> str:
        return self.finetuning_args.stage

    @property
    def dtype(self) -> torch.dtype:
        return self.model_args.compute_dtype

    @property
    def spec(self) -> Optional[RunSpec]:
        """The plugin stage's run spec, made as training makes it (``None`` for the toolkit's own stages)."""
        if self.stage not in PLUGIN_STAGES:
            return None
        return RunSpec.from_args(self.finetuning_args, do_train=True, zero_stage=self.zero.stage)


def shipped_shapes() -> dict[str, Path]:
    """Name -> ``config.json`` of the model shapes shipped with the planner."""
    return {p.parent.name: p for p in sorted(SHAPES_DIR.glob("*/config.json"))}


def resolve_model_config(name: str) -> tuple[Any, str]:
    """The ``config.json`` of ``model_name_or_path``: a local folder or file, else a shipped shape by name.

    Hub ids match a shipped shape by their last component (``Qwen/Qwen2.5-7B-Instruct`` -> ``Qwen2.5-7B``):
    an instruct or chat model has its base model's shapes. Nothing is downloaded.
    """
    from transformers import AutoConfig

    local = Path(name)
    if local.is_file() or (local / "config.json").is_file():
        return AutoConfig.from_pretrained(str(local if local.is_dir() else local.parent)), "local config.json"
    key = name.rstrip("/").rsplit("/", 1)[-1].lower()
    key = key.removeprefix("meta-")
    shapes = shipped_shapes()
    for shape, path in shapes.items():
        if key == shape.lower() or key.startswith(shape.lower() + "-"):
            return AutoConfig.from_pretrained(str(path.parent)), f"shipped shape {shape}"
    raise ConfigError(
        f"model_name_or_path: {name!r} has no local config.json and is not a shipped shape ({', '.join(shapes)}); "
        "point it at a folder holding the model's config.json"
    )


def load_run_config(path: str, overrides: Optional[dict[str, Any]] = None) -> RunConfig:
    """Parse a ``llamafactory-cli train`` YAML as training does; ``deepspeed`` is read, not initialised."""
    from .. import yamlio
    from ..keys import admits_bool

    raw = yamlio.read_mapping(path, admits_bool)
    raw.update(overrides or {})
    zero = ZeroConfig.from_file(raw.pop("deepspeed", None), Path(path).parent)
    return load_run_config_from_dict(raw, zero, path)


def load_run_config_from_dict(raw: dict[str, Any], zero: ZeroConfig, path: str) -> RunConfig:
    """Parse training arguments (without ``deepspeed``: ``zero`` says what it holds) as training does."""
    raw = dict(raw)
    stage = raw.get("stage", "sft")
    if stage not in STAGES:
        raise ConfigError(f"stage: {stage!r} is not one the planner traces; use one of {', '.join(STAGES)}")
    tmp = tempfile.TemporaryDirectory(prefix="s2l-planner-")
    raw.update(output_dir=tmp.name, report_to="none")  # the trainer is built but never saves nor reports
    # mixed precision is applied by the trace itself (TrainingArguments refuses bf16 on a machine without a GPU)
    half = {k: bool(raw.pop(k, False)) for k in ("bf16", "fp16")}

    from llamafactory.extras.misc import infer_optim_dtype
    from llamafactory.hparams.parser import _parse_train_args

    try:
        model_args, data_args, training_args, finetuning_args, _ = _parse_train_args(raw)
    except ValueError as err:  # ConfigError is one; the toolkit's own messages are one line too
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path}: {str(err).splitlines()[0]}") from None
    model_config, source = resolve_model_config(model_args.model_name_or_path)
    if half["bf16"] or finetuning_args.pure_bf16:
        model_args.compute_dtype = torch.bfloat16
    elif half["fp16"]:
        model_args.compute_dtype = torch.float16
    else:
        model_args.compute_dtype = infer_optim_dtype(getattr(model_config, "dtype", None) or torch.float32)
    settle_checkpointing(model_args, finetuning_args)  # as the plugin's stages run it
    return RunConfig(path, model_args, data_args, training_args, finetuning_args, zero, model_config, source, tmp)


def reduced_config(config: Any, layers: int, attention: Optional[str]) -> Any:
    """``config`` with ``layers`` decoder layers (per-layer lists cut to match) and an attention kernel."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:layers]
    if attention is not None:
        cfg._attn_implementation = attention
    return cfg


def build_model(run: RunConfig, config: Any, trainable: bool = True) -> torch.nn.Module:
    """The policy (or, ``trainable=False``, a frozen reference) as the toolkit sets it up for training."""
    from llamafactory.model.adapter import init_adapter
    from llamafactory.model.model_utils.checkpointing import prepare_model_for_training
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=run.dtype)
    if not trainable:
        model.requires_grad_(False)
        return model.eval()
    model_args = copy.copy(run.model_args)
    prepare_model_for_training(model, model_args)
    model = init_adapter(config, model, model_args, run.finetuning_args, True)
    if run.zero.enabled:  # the DeepSpeed engine runs the module in the compute dtype (fp32 masters live in the optimizer)
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(run.dtype)  # in place, as the toolkit upcasts (fake tensors cannot be swapped)
    return model.train()


def uses_live_reference(run: RunConfig) -> bool:
    """Whether a reference forward runs in each step (not precomputed, not reference-free)."""
    if run.stage == "dpo":
        return bool(run.finetuning_args.use_ref_model)
    return run.spec is not None and run.spec.reference == "live"


def build_trainer(
    run: RunConfig,
    model: torch.nn.Module,
    ref_model: Optional[torch.nn.Module],
    device: torch.device = torch.device("cpu"),
    *,
    spec: Optional[RunSpec] = None,
    wiring: Any = None,
) -> Any:
    """The stage's own trainer class around ``model`` (no data: the planner hands it one batch).

    ``device``: where the trainer puts batches. A CPU rank of a distributed run would say ``cpu:0``, which
    fake tensors do not take for ``cpu``; "can be subclassed and overridden" (TrainingArguments), as is
    ``place_model_on_device``: the model already sits where the step runs. ``wiring``: what
    :func:`..train.wiring.wire_model` set up on a plugin stage's model, wired for ``spec`` (:func:`traced_spec`).
    """
    args = copy.copy(run.training_args)
    overrides = {"place_model_on_device": property(lambda self: False), "device": property(lambda self: device)}
    args.__class__ = type(type(args).__name__, (type(args),), overrides)
    common = dict(args=args, finetuning_args=run.finetuning_args, processor=None, tokenizer=None)
    if spec is not None:
        from ..train.trainer import ShortToLongTrainer

        trainer = ShortToLongTrainer(model=model, spec=spec, wiring=wiring, **common)
    elif run.stage == "dpo":
        from llamafactory.train.dpo.trainer import CustomDPOTrainer

        trainer = CustomDPOTrainer(model=model, ref_model=ref_model, **common)
    else:
        from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

        trainer = CustomSeq2SeqTrainer(model=model, model_args=run.model_args, **common)
    trainer.current_gradient_accumulation_steps = run.training_args.gradient_accumulation_steps  # set by the train loop
    return trainer


@dataclass
class Lengths:
    """Tokens per row of one traced micro-batch (already divided by the sequence-parallel size)."""

    long: int
    short: int
    response: int


def _rows(count: int, length: int, response: int, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (count, length), generator=gen)
    labels = ids.clone()
    labels[:, : length - response] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _pairs(n: int, length: int, response: int, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``2n`` rows: chosen then rejected, sharing everything but the response (as preference pairs do)."""
    rows = _rows(2 * n, length, response, vocab, gen)
    rows["input_ids"][n:, : length - response] = rows["input_ids"][:n, : length - response]
    rows["labels"] = torch.where(rows["labels"] == -100, -100, rows["input_ids"])
    return rows


def make_batch(run: RunConfig, lengths: Lengths, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One collated micro-batch with the keys the stage's collator produces, every row at full length."""
    gen = torch.Generator().manual_seed(seed)
    n = run.training_args.per_device_train_batch_size
    live = uses_live_reference(run)
    if run.stage == "sft":
        return _rows(n, lengths.long, lengths.response, vocab, gen)
    if run.stage == "dpo":
        return _pairs(n, lengths.long, lengths.response, vocab, gen)
    plan = run.spec.plan
    if run.stage == "s2ld":
        return _distill_rows(run, n, lengths, vocab, gen)
    if run.stage == "solopo":
        batch = _pairs(n, lengths.short, lengths.response, vocab, gen)
        long_rows = _pairs(n, lengths.long, lengths.response, vocab, gen)
        if not plan.long_rejected:
            long_rows = {k: v[:n] for k, v in long_rows.items()}
        batch.update({f"long_{k}": v for k, v in long_rows.items()})
    else:
        batch = _pairs(n, lengths.long, lengths.response, vocab, gen)
        if live:
            ref = _pairs(n, lengths.short, lengths.response, vocab, gen)
            batch.update({f"ref_{k}": v for k, v in ref.items()})
            batch["ref_sample"] = torch.arange(n).repeat(2)
    if plan.precomputed:
        batch.update({k: torch.zeros(n) for k in plan.reference})
    return batch


def _distill_rows(run: RunConfig, n: int, lengths: Lengths, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """S2LD: short and long chosen rows ending in the same response; on-policy, ``s2ld_samples`` rows per sample
    (the generated responses the step scores; the generation itself is not traced)."""
    rows = n * (run.finetuning_args.s2ld_samples if run.spec.on_policy else 1)
    short = _rows(rows, lengths.short, lengths.response, vocab, gen)
    long = _rows(rows, lengths.long, lengths.response, vocab, gen)
    for key in ("input_ids", "labels"):
        long[key][:, -lengths.response :] = short[key][:, -lengths.response :]
    return {**short, **{f"long_{k}": v for k, v in long.items()}}


@dataclass
class StepSetup:
    """Everything a traced step needs; ``run_step`` does forward and backward of the micro-batch."""

    model: torch.nn.Module
    ref_model: Optional[torch.nn.Module]
    trainer: Any
    batch: dict[str, torch.Tensor]
    optimizer: Any
    offloaded: Optional[OffloadLedger] = None  # what the offload hooks moved (s2l_offload_activations)

    def run_step(self) -> None:
        self.trainer.training_step(self.model, self.batch)

    def warm_optimizer(self) -> None:
        """Make the optimizer's states as a first step would (zero gradients, no forward): a steady-state step."""
        for p in self.model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        self.optimizer_step()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def traced_spec(run: RunConfig, sequence_parallel_size: int, **changes: Any) -> RunSpec:
    """The run's spec as one traced steady-state step has it: no DeepSpeed (ZeRO's model states are added by
    formulas, so no LM-head lockstep), ``sequence_parallel_size`` (the memory trace feeds rows of ``T/P`` tokens to
    one process; only a real distributed run wires Ulysses), and no reference model once a precomputed pass has
    scored (training drops it before the first step). An on-policy S2LD step is traced on rows of the sampled
    responses' length (:func:`make_batch`), without its generation. ``changes``: more fields to replace (the FLOPs
    trace's)."""
    spec = run.spec
    return dataclasses.replace(
        spec,
        zero_stage=0,
        on_policy=False,
        sequence_parallel_size=sequence_parallel_size,
        reference_model=spec.reference_model and spec.reference == "live",
        **changes,
    )


@contextmanager
def step_setup(
    run: RunConfig,
    layers: int,
    lengths: Lengths,
    attention: str,
    device: torch.device = torch.device("cpu"),
    sequence_parallel_size: int = 1,
    spec_changes: Optional[dict[str, Any]] = None,
) -> Iterator[StepSetup]:
    """Model of ``layers`` layers, reference (when one runs live), trainer, optimizer and one micro-batch. A plugin
    stage's model is wired by the training run's own :func:`..train.wiring.wire_model`, and unwired on leaving.

    ``attention``: the model's attention implementation; ``device``: where the trainer puts the batch;
    ``sequence_parallel_size`` > 1 needs the process group of a real distributed run; ``spec_changes``: see
    :func:`traced_spec`.
    """
    from ..train.wiring import wire_model

    config = reduced_config(run.model_config, layers, attention)
    model = build_model(run, config)

    def make_reference() -> torch.nn.Module:
        return build_model(run, config, trainable=False)

    spec, wiring, ref_model = None, None, None
    if run.spec is not None:
        spec = traced_spec(run, sequence_parallel_size, **(spec_changes or {}))
        wiring = wire_model(model, spec, make_reference=make_reference)
        ref_model = wiring.ref_model
    elif uses_live_reference(run) and separate_reference_model(run.finetuning_args, live=True):  # the toolkit's dpo
        ref_model = make_reference()
    try:
        trainer = build_trainer(run, model, ref_model, device, spec=spec, wiring=wiring)
        optimizer = trainer.create_optimizer()
        batch = make_batch(run, lengths, config.vocab_size)
        yield StepSetup(model, ref_model, trainer, batch, optimizer, wiring.offloaded if wiring else None)
    finally:
        if wiring is not None:
            wiring.undo()


def autocast_context(run: RunConfig, device_type: str = "cpu") -> Any:
    """Mixed precision as the trainer's accelerator applies it without DeepSpeed (fp32 masters, bf16 math)."""
    if run.zero.enabled or run.dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type, dtype=run.dtype)
