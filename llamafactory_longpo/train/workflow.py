"""``run_solopo`` / ``run_longpo``: the toolkit's ``run_dpo`` shape with the plugin's data and trainer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.extras import logging
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.ploting import plot_loss
from llamafactory.model import load_model, load_tokenizer
from llamafactory.train.trainer_utils import create_modelcard_and_push, create_ref_model

from ..checks import run_identity
from ..data.collator import ShortToLongDataCollator
from .metrics import PLOT_KEYS
from .plots import plot_rewards
from .reference import precompute_reference
from .rope import set_rope_theta
from .spec import RunSpec
from .trainer import ShortToLongTrainer
from .wiring import wire_model

if TYPE_CHECKING:
    from transformers import Seq2SeqTrainingArguments, TrainerCallback

logger = logging.get_logger(f"llamafactory.longpo.{__name__.rsplit('.', 1)[-1]}")  # under the toolkit's root: its handlers apply


def build_trainer(
    model_args: Any,
    data_args: Any,
    training_args: Seq2SeqTrainingArguments,
    finetuning_args: Any,
    callbacks: Optional[list[TrainerCallback]] = None,
    spec: Optional[RunSpec] = None,
) -> ShortToLongTrainer:
    """Tokenizer, dataset, policy (wired by :func:`.wiring.wire_model`, with its reference), collator and trainer
    for a plugin stage; the reference pass, when the spec precomputes it, before the policy's RoPE base is raised.
    ``spec``: the run's (:meth:`.spec.RunSpec.for_run`), when the caller has made it already."""
    spec = spec or RunSpec.for_run(finetuning_args, training_args)
    data_args.s2l_plan = spec.plan  # the loader's processor reads it
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    dataset_module = get_dataset(template, model_args, data_args, training_args, stage="rm", **tokenizer_module)
    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)
    wiring = wire_model(model, spec, make_reference=lambda: create_ref_model(model_args, finetuning_args), log=logger.info_rank0)
    try:
        collator = ShortToLongDataCollator(
            plan=spec.plan,
            template=template,
            model=model,
            pad_to_multiple_of=8,
            label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
            **tokenizer_module,
        )
        trainer = ShortToLongTrainer(
            model=model,
            args=training_args,
            finetuning_args=finetuning_args,
            data_collator=collator,
            callbacks=callbacks,
            spec=spec,
            wiring=wiring,
            identity=run_identity(finetuning_args.stage, finetuning_args.pref_loss, data_args.dataset),
            **dataset_module,
            **tokenizer_module,
        )
        if spec.reference == "precomputed":
            ref_paths = (
                [finetuning_args.ref_model, *(finetuning_args.ref_model_adapters or [])]
                if finetuning_args.ref_model
                else [model_args.model_name_or_path, *(model_args.adapter_name_or_path or [])]
            )
            precompute_reference(
                trainer,
                model,
                model_paths=ref_paths,
                template=str(data_args.template),
                cache_dir=finetuning_args.s2l_ref_cache_dir,
                batch_size=training_args.per_device_eval_batch_size,
                log=logger.info_rank0,
                warn=logger.warning_rank0,
            )

        # the policy's RoPE base changes only now, after the reference pass; a live reference runs at the original
        if spec.policy_rope_theta is not None:
            set_rope_theta(model, spec.policy_rope_theta)
            logger.info_rank0(
                f"policy rope_theta: {wiring.original_rope_theta:g} -> {spec.policy_rope_theta:g} (the reference keeps its own)"
            )
    except BaseException:
        wiring.undo()
        raise
    return trainer


def run_short_to_long(
    model_args: Any,
    data_args: Any,
    training_args: Seq2SeqTrainingArguments,
    finetuning_args: Any,
    callbacks: Optional[list[TrainerCallback]] = None,
    spec: Optional[RunSpec] = None,
) -> None:
    """Train stage ``solopo`` or ``longpo`` (``finetuning_args.stage``), like the toolkit's ``run_dpo``."""
    stage = finetuning_args.stage
    trainer = build_trainer(model_args, data_args, training_args, finetuning_args, callbacks, spec)
    try:
        _train_and_evaluate(trainer, model_args, data_args, training_args, finetuning_args, stage)
    finally:
        trainer.wiring.undo()  # the attention registry as the toolkit left it (the Ulysses wrapper holds its group)


def _train_and_evaluate(
    trainer: ShortToLongTrainer, model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any, stage: str
) -> None:
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        if trainer.is_world_process_zero() and finetuning_args.plot_loss:
            plot_loss(training_args.output_dir, keys=PLOT_KEYS[stage] + ["eval_loss"])
            plot_rewards(training_args.output_dir, stage)

    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    create_modelcard_and_push(trainer, model_args, data_args, training_args, finetuning_args)
