"""Tokenization of short-to-long rows with the model's chat template.

SoLoPO rows give the short chosen/rejected pair (``chosen_*``, ``rejected_*``, as in the toolkit's
pairwise data) plus the long chosen (``long_chosen_*``) and, for ``solopo_align: both``, the long
rejected; S2LD rows the short chosen and the long chosen only.
LongPO rows give the long chosen/rejected conversations (``chosen_*``, ``rejected_*``) and
one short reference row per turn (``ref_chosen_*``, ``ref_rejected_*``, lists of rows).

Labels mask everything but assistant turns. An over-long sample is never head-truncated (that
would cut the instruction and the assistant header): it is dropped and counted, or, with
``s2l_overlong: middle``, its context is cut in the middle until it fits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from llamafactory.data.processor.processor_utils import DatasetProcessor
from llamafactory.extras import logging
from llamafactory.extras.constants import IGNORE_INDEX

from .converter import RECORD_COLUMN, TURN_COLUMN
from .plan import RowPlan
from .record import Record, Turn, assistant_message, long_conversation, user_message

logger = logging.get_logger(f"llamafactory.longpo.{__name__.rsplit('.', 1)[-1]}")  # under the toolkit's root: its handlers apply

Row = tuple[list[int], list[int]]  # (input_ids, labels)
MIDDLE_MARK = "\n...\n"


def record_from_json(blob: str) -> Record:
    data = json.loads(blob)
    return Record(long_context=data["long_context"], turns=[Turn(**t) for t in data["turns"]], system=data.get("system"))


@dataclass
class ShortToLongDatasetProcessor(DatasetProcessor):
    """Processor for the plugin stages; the run's plan (``data_args.s2l_plan``) says which rows a sample has."""

    def _encode_turns(self, messages: list[dict[str, str]], system: Optional[str]) -> Row:
        """Encode a conversation; every assistant turn is a label, every other token is masked."""
        pairs = self.template.encode_multiturn(self.tokenizer, messages, system, None)
        input_ids: list[int] = []
        labels: list[int] = []
        for prompt_ids, response_ids in pairs:
            if self.template.efficient_eos:
                response_ids = response_ids + [self.tokenizer.eos_token_id]
            input_ids += prompt_ids + response_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + response_ids
        return input_ids, labels

    def _fit(self, build: Callable[[str], list[Row]], context: str, cutoff: int) -> Optional[list[Row]]:
        """Rows built from ``context`` if they fit ``cutoff``; else middle-cut or ``None`` (drop)."""
        rows = build(context)
        longest = max(len(ids) for ids, _ in rows)
        if longest <= cutoff:
            return rows
        if self.data_args.s2l_overlong != "middle":
            return None
        ctx_ids = self.tokenizer.encode(context, add_special_tokens=False)
        excess = longest - cutoff
        for margin in (8, 32, 128, 512):
            keep = len(ctx_ids) - excess - margin
            if keep <= 0:
                return None
            head = self.tokenizer.decode(ctx_ids[: keep // 2])
            tail = self.tokenizer.decode(ctx_ids[len(ctx_ids) - (keep - keep // 2) :])
            rows = build(head + MIDDLE_MARK + tail)
            if max(len(ids) for ids, _ in rows) <= cutoff:
                return rows
        return None

    def _turn_rows(self, record: Record, turn: int, plan: RowPlan) -> Optional[dict[str, Row]]:
        """One turn's single-turn rows (SoLoPO, S2LD): its short chosen (and rejected) and long chosen (and rejected)."""
        t = record.turns[turn]
        joiner = self.data_args.s2l_joiner
        system = record.system
        long_rejected = plan.long_rejected

        def short(ctx: str) -> list[Row]:
            prompt = [user_message(ctx, t.instruction, joiner)]
            answers = (t.chosen, t.rejected) if plan.short_rejected else (t.chosen,)
            return [self._encode_turns(prompt + [assistant_message(y)], system) for y in answers]

        def long(ctx: str) -> list[Row]:
            prompt = [user_message(ctx, t.instruction, joiner)]
            answers = (t.chosen, t.rejected) if long_rejected else (t.chosen,)
            return [self._encode_turns(prompt + [assistant_message(y)], system) for y in answers]

        short_rows = self._fit(short, t.short_context, self.data_args.short_cutoff_len)
        long_rows = self._fit(long, record.long_context, self.data_args.cutoff_len)
        if short_rows is None or long_rows is None:
            return None
        out = {"chosen": short_rows[0], "long_chosen": long_rows[0]}
        if plan.short_rejected:
            out["rejected"] = short_rows[1]
        if long_rejected:
            out["long_rejected"] = long_rows[1]
        return out

    def _longpo_rows(self, record: Record) -> Optional[dict[str, Any]]:
        joiner = self.data_args.s2l_joiner

        def long(ctx: str) -> list[Row]:
            rec = Record(long_context=ctx, turns=record.turns, system=record.system)
            return [
                self._encode_turns(long_conversation(rec, side, joiner=joiner), record.system) for side in ("chosen", "rejected")
            ]

        long_rows = self._fit(long, record.long_context, self.data_args.cutoff_len)
        if long_rows is None:
            return None
        refs: dict[str, list[Row]] = {"ref_chosen": [], "ref_rejected": []}
        for t in record.turns:

            def short(ctx: str, t: Turn = t) -> list[Row]:
                prompt = [user_message(ctx, t.instruction, joiner)]
                return [self._encode_turns(prompt + [assistant_message(y)], record.system) for y in (t.chosen, t.rejected)]

            rows = self._fit(short, t.short_context, self.data_args.short_cutoff_len)
            if rows is None:
                return None
            refs["ref_chosen"].append(rows[0])
            refs["ref_rejected"].append(rows[1])
        return {"chosen": long_rows[0], "rejected": long_rows[1], **refs}

    def preprocess_dataset(self, examples: dict[str, list[Any]]) -> dict[str, list[Any]]:
        plan = self.data_args.s2l_plan
        target = plan.target
        # every key present even when the whole batch is dropped, so batches share one schema
        model_inputs: dict[str, list[Any]] = {key: [] for key in plan.columns()}
        dropped = 0
        for blob, turn in zip(examples[RECORD_COLUMN], examples[TURN_COLUMN]):
            record = record_from_json(blob)
            rows = self._longpo_rows(record) if plan.reference_rows else self._turn_rows(record, turn, plan)
            if rows is None:
                dropped += 1
                continue
            for name, value in rows.items():
                if name.startswith("ref_"):
                    model_inputs[f"{name}_input_ids"].append([ids for ids, _ in value])
                    model_inputs[f"{name}_labels"].append([lab for _, lab in value])
                else:
                    ids, labels = value
                    model_inputs[f"{name}_input_ids"].append(ids)
                    model_inputs[f"{name}_attention_mask"].append([1] * len(ids))
                    model_inputs[f"{name}_labels"].append(labels)
            for media in ("images", "videos", "audios"):
                model_inputs[media].append(None)
        if dropped:
            logger.warning_rank0(
                f"Dropped {dropped} of {len(examples[RECORD_COLUMN])} {target} samples longer than their cutoff "
                f"({overlong_hint(self.data_args)})."
            )
        return model_inputs

    def print_data_example(self, example: dict[str, Any]) -> None:
        for name in ("chosen", "rejected", "long_chosen", "long_rejected"):
            if f"{name}_input_ids" not in example:
                continue
            ids = example[f"{name}_input_ids"]
            labels = [t for t in example[f"{name}_labels"] if t != IGNORE_INDEX]
            print(f"{name}_input_ids ({len(ids)} tokens):\n{self.tokenizer.decode(ids, skip_special_tokens=False)}")
            print(f"{name}_label_ids ({len(labels)} tokens):\n{self.tokenizer.decode(labels, skip_special_tokens=False)}")
        if "ref_chosen_input_ids" in example:
            print(f"ref rows: {len(example['ref_chosen_input_ids'])} short turns per side")


def overlong_hint(data_args: Any) -> str:
    """The cutoffs and what to change, for messages about dropped samples."""
    cutoffs = f"cutoff_len={data_args.cutoff_len}, short_cutoff_len={data_args.short_cutoff_len}"
    if data_args.s2l_overlong == "middle":  # already cut: the instruction and responses alone do not fit
        return f"{cutoffs}, even with the context cut in the middle; raise the cutoffs"
    return f"{cutoffs}; raise the cutoffs or set s2l_overlong: middle"
