"""Batches for the plugin stages: short rows and long rows are padded SEPARATELY.

Padding the short pair to the long length would make SoLoPO's cheap short pass as expensive as a
long one, so each group of rows is padded to its own longest member.

Batch keys (``n`` samples in the batch):

- always: ``input_ids``/``attention_mask``/``labels`` = the toolkit's pairwise layout, ``2n`` rows
  (chosen then rejected). SoLoPO: the short pair. LongPO: the long conversations. S2LD: ``n`` short chosen rows.
- SoLoPO, S2LD: ``long_input_ids``/``long_attention_mask``/``long_labels``: ``n`` rows of long chosen, then
  ``n`` rows of long rejected when aligning both.
- LongPO: ``ref_input_ids``/``ref_attention_mask``/``ref_labels`` = all short reference rows (chosen
  turns of every sample, then rejected turns), and ``ref_sample`` = the sample each row belongs to.
- precomputed reference log-probs (the plan's ``ref_*_logps`` columns): ``[n]`` float tensors; the
  reference rows themselves are then left out of the batch, since nothing runs on them.

Which groups a batch has is the run's :class:`..plan.RowPlan`, given at construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from llamafactory.data.collator import MultiModalDataCollatorForSeq2Seq, PairwiseDataCollatorWithPadding

from .plan import RowPlan


def _row(ids: list[int], labels: list[int]) -> dict[str, Any]:
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "images": [], "videos": [], "audios": []}


@dataclass
class ShortToLongDataCollator(PairwiseDataCollatorWithPadding):
    """Pairwise collator plus a separately padded group of long (SoLoPO, S2LD) or reference (LongPO) rows."""

    plan: Optional[RowPlan] = None  # required; a dataclass field after the parent's defaulted ones

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.plan is None:
            raise TypeError("ShortToLongDataCollator needs plan= (the run's data.plan.RowPlan)")

    def _pad(self, rows: list[dict[str, Any]], prefix: str) -> dict[str, torch.Tensor]:
        padded = MultiModalDataCollatorForSeq2Seq.__call__(self, rows)
        return {f"{prefix}{k}": v for k, v in padded.items() if k in ("input_ids", "attention_mask", "labels")}

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        for f in features:  # media keys are None for text rows; the parent expects lists
            for media in ("images", "videos", "audios"):
                f[media] = f.get(media) or []
        plan = self.plan
        if plan.short_rejected:
            batch = super().__call__(features)
        else:  # S2LD: the short chosen rows only
            batch = self._pad([_row(f["chosen_input_ids"], f["chosen_labels"]) for f in features], "")
        if plan.precomputed:
            for key in plan.reference:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        if plan.long_rows:
            long_rows = [_row(f["long_chosen_input_ids"], f["long_chosen_labels"]) for f in features]
            if plan.long_rejected:
                long_rows += [_row(f["long_rejected_input_ids"], f["long_rejected_labels"]) for f in features]
            batch.update(self._pad(long_rows, "long_"))
        if plan.reference_rows and not plan.precomputed:
            ref_rows, owner = [], []
            for side in ("ref_chosen", "ref_rejected"):
                for i, f in enumerate(features):
                    for ids, labels in zip(f[f"{side}_input_ids"], f[f"{side}_labels"]):
                        ref_rows.append(_row(ids, labels))
                        owner.append(i)
            batch.update(self._pad(ref_rows, "ref_"))
            batch["ref_sample"] = torch.tensor(owner, dtype=torch.long)
        return batch
