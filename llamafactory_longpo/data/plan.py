"""The row plan of a run: which rows a training step needs and which reference values its loss reads.

Made once from the arguments (:meth:`RowPlan.for_stage` for the plugin's stages, :meth:`RowPlan.for_toolkit`
for the toolkit's own stages reading a short-to-long dataset) and handed to every part that depends on it:
the dataset processor (which columns a processed sample has), the collator (which groups of rows a batch
has), the trainer (which losses and reference values) and the reference cache (which values to store).
Nothing downstream infers the plan from a tensor's shape or a column's name.

Rows, per stage:

- ``solopo`` (SoLoPO, arXiv 2505.11166): the short pair, the long chosen row and, when both responses are
  aligned (``solopo_align: both``), the long rejected row. Reference values only for SoLo-DPO.
- ``longpo`` (LongPO, arXiv 2502.13922): the long chosen and rejected conversations, and the short reference
  rows of every turn (the reference runs on the short inputs).
- ``s2ld`` (short-to-long self-distillation): per turn, the short chosen row (the frozen teacher's input) and the
  long chosen row (the policy's); no rejected row and no stored reference value: the teacher's distributions are
  computed live in every step (``teacher``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

# every reference value a loss may read, per sample: summed log-probs of the frozen reference
REF_LOGP_COLUMNS: tuple[str, ...] = ("ref_chosen_logps", "ref_rejected_logps", "ref_long_chosen_logps", "ref_long_rejected_logps")
# where a run's reference comes from: none (SimPO, ORPO), scored once before training, or scored in every step
ReferenceKind = Literal["none", "precomputed", "live"]
# what the toolkit's own stages see of a short-to-long dataset
TOOLKIT_TARGETS: dict[str, str] = {"rm": "pair", "sft": "sft"}


@dataclass(frozen=True)
class RowPlan:
    """Which rows and reference values a run's steps need."""

    target: str  # "solopo" | "longpo" (the plugin's stages), "pair" | "sft" (the toolkit's stages)
    long_rejected: bool = False  # SoLoPO aligns both responses: a long rejected row too
    reference: tuple[str, ...] = ()  # the REF_LOGP_COLUMNS the loss reads (empty: no reference)
    precomputed: bool = False  # reference values come precomputed with the samples, not from a live model
    teacher: bool = False  # S2LD: a frozen teacher scores the short rows in every step (full distributions)

    @classmethod
    def for_stage(cls, finetuning_args: Any, do_train: bool = True) -> RowPlan:
        """The plan of stage ``solopo``, ``longpo`` or ``s2ld`` from its arguments."""
        fa = finetuning_args
        stage = fa.stage
        if stage == "s2ld":
            return cls(target=stage, teacher=True)
        both = stage == "solopo" and fa.solopo_align == "both"
        if stage == "longpo":
            reference = REF_LOGP_COLUMNS[:2]  # summed over each sample's turns
        elif fa.pref_loss != "sigmoid":
            reference = ()  # SimPO and ORPO have no reference
        elif fa.solopo_long_reference == "short":
            reference = REF_LOGP_COLUMNS[:2]  # the short reference stands in for the long one
        else:
            reference = REF_LOGP_COLUMNS[:4] if both else REF_LOGP_COLUMNS[:3]
        precomputed = bool(reference) and fa.s2l_precompute_ref and do_train
        return cls(target=stage, long_rejected=both, reference=reference, precomputed=precomputed)

    @classmethod
    def for_toolkit(cls, stage: str) -> RowPlan:
        """The plan of the toolkit's ``rm``-shaped (``dpo``, ``rm``) or ``sft`` stages: their own columns."""
        return cls(target=TOOLKIT_TARGETS[stage])

    @property
    def reference_kind(self) -> ReferenceKind:
        """Where the frozen reference comes from: S2LD's teacher and an uncached reference score in every step."""
        if self.teacher:
            return "live"
        if not self.reference:
            return "none"
        return "precomputed" if self.precomputed else "live"

    @property
    def long_rows(self) -> bool:
        """SoLoPO and S2LD: long rows, padded as their own group."""
        return self.target in ("solopo", "s2ld")

    @property
    def short_rejected(self) -> bool:
        """The first group holds chosen AND rejected rows (every stage but S2LD, which reads the chosen ones only)."""
        return self.target != "s2ld"

    @property
    def reference_rows(self) -> bool:
        """LongPO: the short reference rows of every turn."""
        return self.target == "longpo"

    def live(self) -> RowPlan:
        """The same plan with the reference computed from the model: the precompute pass itself runs this way."""
        return RowPlan(self.target, self.long_rejected, self.reference, precomputed=False, teacher=self.teacher)

    def row_names(self) -> list[str]:
        """The single rows of a processed sample (each with ``_input_ids``, ``_attention_mask``, ``_labels``)."""
        long = ["long_chosen", "long_rejected"] if self.long_rejected else ["long_chosen"]
        short = ["chosen", "rejected"] if self.short_rejected else ["chosen"]
        return short + (long if self.long_rows else [])

    def columns(self) -> list[str]:
        """Every column of a processed sample, present even when a whole batch is dropped (one schema)."""
        keys = [f"{r}_{part}" for r in self.row_names() for part in ("input_ids", "attention_mask", "labels")]
        if self.reference_rows:
            keys += [f"{r}_{part}" for r in ("ref_chosen", "ref_rejected") for part in ("input_ids", "labels")]
        return keys + ["images", "videos", "audios"]
