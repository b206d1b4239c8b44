"""``run_solopo`` / ``run_longpo``: the toolkit's ``run_dpo`` shape with the plugin's data and trainer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
from llamafactory.extras import logging
from llamafactory.extras.constants import IGNORE_INDEX
from llamafactory.extras.ploting import plot_loss
from llamafactory.model import load_model, load_tokenizer
from llamafactory.train.trainer_utils import create_modelcard_and_push, create_ref_model

from ..data.collator import ShortToLongDataCollator
from ..data.plan import RowPlan
from ..planner import train_start_line
from .plots import plot_rewards
from .rope import current_rope_theta, set_rope_theta
from .shared_prefix import install_shared_prefix_attention
from .trainer import ShortToLongTrainer

if TYPE_CHECKING:
    from transformers import Seq2SeqTrainingArguments, TrainerCallback

logger = logging.get_logger(f"llamafactory.longpo.{__name__.rsplit('.', 1)[-1]}")  # under the toolkit's root: its handlers apply

PLOT_KEYS = {
    "solopo": ["loss", "po_loss", "align_loss", "rewards/accuracies", "rewards/distance"],
    "longpo": ["loss", "pref_loss", "nll_loss", "rewards/accuracies"],
}


def build_trainer(
    model_args: Any,
    data_args: Any,
    training_args: Seq2SeqTrainingArguments,
    finetuning_args: Any,
    callbacks: Optional[list[TrainerCallback]] = None,
) -> ShortToLongTrainer:
    """Tokenizer, dataset, policy (and reference), collator and trainer for a plugin stage."""
    plan = RowPlan.for_stage(finetuning_args, training_args.do_train)
    data_args.s2l_plan = plan  # the loader's processor reads it
    tokenizer_module = load_tokenizer(model_args)
    tokenizer = tokenizer_module["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    dataset_module = get_dataset(template, model_args, data_args, training_args, stage="rm", **tokenizer_module)
    model = load_model(tokenizer, model_args, finetuning_args, training_args.do_train)
    # the shared prefix's attention goes in first: sequence parallelism then wraps it (its all-to-all outside)
    fa = finetuning_args
    shared_prefix = fa.stage == "longpo" and fa.s2l_shared_prefix and fa.s2l_response_logits
    if shared_prefix:
        kernel = install_shared_prefix_attention(model)
        logger.info_rank0(f"LongPO shared prefix: the document runs once per pair ({kernel} attention in two causal pieces)")
    sequence_parallel = None
    if finetuning_args.sequence_parallel_size > 1:  # checked and wired before any forward (the reference pass included)
        from .sequence_parallel import enable_sequence_parallel

        sequence_parallel = enable_sequence_parallel(model, finetuning_args.sequence_parallel_size)
        logger.info_rank0(
            f"sequence parallel: {sequence_parallel.size} ranks per row (DeepSpeed Ulysses), "
            f"{sequence_parallel.dp_size} data-parallel group(s)"
        )

    collator = ShortToLongDataCollator(
        plan=plan,
        template=template,
        model=model,
        pad_to_multiple_of=8,
        label_pad_token_id=IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id,
        **tokenizer_module,
    )
    ref_model = None
    if finetuning_args.use_ref_model and (not plan.precomputed or finetuning_args.ref_model is not None):
        # a live reference, or an explicit one to score once; None for LoRA (adapters get disabled)
        ref_model = create_ref_model(model_args, finetuning_args)

    raise_theta = finetuning_args.policy_rope_theta
    trainer = ShortToLongTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        finetuning_args=finetuning_args,
        data_collator=collator,
        callbacks=callbacks,
        plan=plan,
        sequence_parallel=sequence_parallel,
        shared_prefix=shared_prefix,
        original_rope_theta=current_rope_theta(model.config) if raise_theta is not None else None,
        **dataset_module,
        **tokenizer_module,
    )
    if plan.precomputed:
        ref_paths = (
            [finetuning_args.ref_model, *(finetuning_args.ref_model_adapters or [])]
            if finetuning_args.ref_model
            else [model_args.model_name_or_path, *(model_args.adapter_name_or_path or [])]
        )
        trainer.precompute_reference(
            model,
            model_paths=ref_paths,
            template=str(data_args.template),
            cache_dir=finetuning_args.s2l_ref_cache_dir,
            batch_size=training_args.per_device_eval_batch_size,
            log=logger.info_rank0,
            warn=logger.warning_rank0,
        )

    # the policy's RoPE base changes only now, after the reference pass; a live reference runs at the original
    if raise_theta is not None:
        set_rope_theta(model, raise_theta)
        logger.info_rank0(f"policy rope_theta: {trainer.original_rope_theta:g} -> {raise_theta:g} (the reference keeps its own)")
    return trainer


def run_short_to_long(
    model_args: Any,
    data_args: Any,
    training_args: Seq2SeqTrainingArguments,
    finetuning_args: Any,
    callbacks: Optional[list[TrainerCallback]] = None,
) -> None:
    """Train stage ``solopo`` or ``longpo`` (``finetuning_args.stage``), like the toolkit's ``run_dpo``."""
    stage = finetuning_args.stage
    if training_args.do_train and finetuning_args.s2l_estimate_at_start:
        # before anything is built: the trace must meet this process's attention registry as the toolkit left it
        # (sequence parallelism replaces its entries in place with Ulysses, whose all-to-all only this rank would join)
        logger.info_rank0(train_start_line(model_args, data_args, training_args, finetuning_args))
    trainer = build_trainer(model_args, data_args, training_args, finetuning_args, callbacks)
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
