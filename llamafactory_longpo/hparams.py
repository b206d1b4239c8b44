"""The plugin's knobs: typed fields with help text, defaults from the papers (LongPO arXiv 2502.13922,
SoLoPO arXiv 2505.11166, short-to-long self-distillation after GKD arXiv 2306.13649), and validation.

These are mixins with no toolkit import; ``integration`` merges them into LLaMA-Factory's own
``FinetuningArguments`` / ``DataArguments`` so YAML, ``--flags`` and the web UI all reach them.
"""

from __future__ import annotations

import logging
import math
import os
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, Optional

from ._bootstrap import PLUGIN_STAGES as PLUGIN_STAGES  # defined where the off switch reads it
from .errors import ConfigError

logger = logging.getLogger("llamafactory.longpo.hparams")  # under the toolkit's root logger: its handlers apply
SOLOPO_PREF_LOSSES: tuple[str, ...] = ("sigmoid", "simpo", "orpo")


def _choices(annotation: Any) -> Optional[tuple[Any, ...]]:
    """Allowed values of a ``Literal`` (or ``Optional[Literal]``) annotation, else ``None``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), {"Literal": Literal, "Optional": Optional})  # noqa: S307
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return typing.get_args(annotation)
    if origin is typing.Union:
        for arg in typing.get_args(annotation):
            found = _choices(arg)
            if found is not None:
                return found + (None,)
    return None


# knobs whose default value (not None) means "off" (field metadata cannot carry it: HfArgumentParser hands
# every metadata key to argparse)
OFF_VALUES: dict[str, Any] = {"sequence_parallel_size": 1}


@dataclass(frozen=True)
class KnobSpec:
    """A knob as its dataclass field states it: what the web UI shows and the checks use."""

    default: Any
    help: str
    choices: Optional[tuple[Any, ...]]  # None when any value of the field's type goes
    off_by_default: bool  # the default switches the feature off (None, or listed in OFF_VALUES)


def knob_spec(cls: type, name: str) -> KnobSpec:
    """The spec of field ``name`` of dataclass ``cls`` (the plugin's or the toolkit's arguments)."""
    found = {f.name: f for f in fields(cls)}[name]
    default = found.default if found.default is not MISSING else found.default_factory()
    off = default is None or OFF_VALUES.get(name, MISSING) == default
    return KnobSpec(default, found.metadata.get("help", ""), _choices(found.type), off)


def validate_choices(obj: Any, names: Optional[set[str]] = None) -> None:
    """Check every ``Literal`` field: YAML goes through ``parse_dict``, which never checks choices."""
    for f in fields(obj):
        if names is not None and f.name not in names:
            continue
        allowed = _choices(f.type)
        if allowed is None:
            continue
        value = getattr(obj, f.name)
        if value not in allowed:
            shown = ", ".join(str(a) for a in allowed if a is not None)
            raise ConfigError(f"{f.name}: {value!r} is not one of {shown}")


def _number(obj: Any, name: str) -> Optional[float]:
    """The field as a finite float; YAML reads ``1.0e7`` (no exponent sign) as a string, so accept that too.

    NaN and infinity are refused: a NaN weight passes every ``<``/``>`` check and silently turns the loss
    and the saved weights into NaN.
    """
    value = getattr(obj, name, None)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{name}: {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ConfigError(f"{name}: {value!r} is not a finite number")
    if not isinstance(value, (int, float)):
        setattr(obj, name, number)
    return number


def _integer(obj: Any, name: str) -> Optional[int]:
    """The field as an int; a fractional value is refused rather than truncated (1.5 chunks cannot be meant)."""
    number = _number(obj, name)
    if number is None:
        return None
    if number != int(number):
        raise ConfigError(f"{name}: {getattr(obj, name)!r} must be a whole number")
    setattr(obj, name, int(number))
    return int(number)


@dataclass(frozen=True)
class Range:
    """The values of a numeric knob a user could mean; the low end is excluded when ``open_low`` (a weight of 0
    is meaningful, a temperature-like scale of 0 is not)."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False  # the high end excluded too (a mixture weight of 1 is no mixture)

    def check(self, name: str, value: Optional[float]) -> None:
        """Raise a one-line :class:`ConfigError` for ``value`` outside the range (``None``: unset, accepted)."""
        if value is None:
            return
        at_open_end = (self.open_low and value == self.low) or (self.open_high and value == self.high)
        if value < self.low or value > self.high or at_open_end:
            low = f"> {_shown(self.low)}" if self.open_low else f">= {_shown(self.low)}"
            high = f"< {_shown(self.high)}" if self.open_high else f"<= {_shown(self.high)}"
            raise ConfigError(f"{name}: {value!r} must be {low} and {high}")


def _shown(bound: float) -> str:
    """A range's bound as people write it: ``1,048,576``, ``0.5``."""
    return f"{int(bound):,}" if float(bound).is_integer() else f"{bound:g}"


# the plugin's numeric knobs, and the toolkit's preference knobs its losses read: the papers' values lie well
# inside (SoLoPO's alpha 1 to 4, LongPO's lambda 0.01, beta 0.1); a weight of 1e30 overflows the loss
KNOB_RANGES: dict[str, Range] = {
    "solopo_alpha": Range(0, 100),
    "longpo_lambda": Range(0, 100),
    "longpo_nll_weight": Range(0, 100),
    "pref_beta": Range(0, 100, open_low=True),
    "simpo_gamma": Range(0, 100),
    "policy_rope_theta": Range(0, 1e10, open_low=True),
    "s2l_logits_chunk": Range(1, 1 << 20),
    "sequence_parallel_size": Range(1, 1024),
    "short_cutoff_len": Range(1, 1 << 24),
    "s2ld_jsd_beta": Range(0, 1, open_low=True, open_high=True),
    "s2ld_nll_weight": Range(0, 100),
    "s2ld_temperature": Range(0, 100, open_low=True),
    "s2ld_samples": Range(1, 1024),
    "s2ld_max_new_tokens": Range(1, 1 << 20),
    "s2ld_sample_every": Range(1, 1 << 30),
}
S2LD_FLOAT_KNOBS = ("s2ld_jsd_beta", "s2ld_nll_weight", "s2ld_temperature")
S2LD_INT_KNOBS = ("s2ld_samples", "s2ld_max_new_tokens", "s2ld_sample_every")
# knobs only the on-policy path of stage s2ld reads
S2LD_ON_POLICY_KNOBS = ("s2ld_samples", "s2ld_max_new_tokens", "s2ld_temperature", "s2ld_sample_every")


def warn_no_effect(name: str, why: str) -> None:
    """One warning line for a knob set away from its default where it changes nothing.

    A warning, not an error: one YAML is often shared by several stages, and the run itself is sound.
    """
    if os.environ.get("RANK", "0") == "0":
        logger.warning(f"{name} has no effect here: {why}")


def _changed(obj: Any, names: tuple[str, ...]) -> list[str]:
    """The named fields whose value differs from the field default."""
    defaults = {f.name: f.default for f in fields(obj)}
    return [n for n in names if getattr(obj, n) != defaults[n]]


@dataclass
class ShortToLongFinetuningArguments:
    """Method knobs of SoLoPO (arXiv 2505.11166), LongPO (arXiv 2502.13922) and S2LD (short-to-long self-distillation)."""

    solopo_alpha: float = field(
        default=1.0,
        metadata={"help": "SoLoPO: weight of the short-to-long reward alignment term (paper's best: 1 to 4)."},
    )
    solopo_distance: Literal["abs", "square", "smooth_l1"] = field(
        default="abs",
        metadata={"help": "SoLoPO: distance s() applied to the short-long reward gap (abs, square, smooth_l1)."},
    )
    solopo_long_reference: Literal["long", "short"] = field(
        default="long",
        metadata={
            "help": "SoLo-DPO: reference log-prob of the chosen response on the long input ('long') or "
            "reuse the short one ('short', the reference then cancels)."
        },
    )
    solopo_align: Literal["chosen", "both"] = field(
        default="chosen",
        metadata={"help": "SoLoPO: align the chosen response only (paper) or both responses (ablation, one more long pass)."},
    )
    longpo_lambda: float = field(
        default=0.01,
        metadata={"help": "LongPO: weight of the preference term (the NLL term has weight longpo_nll_weight)."},
    )
    longpo_nll_weight: float = field(
        default=1.0,
        metadata={"help": "LongPO: weight of the NLL term on the long chosen sequence."},
    )
    longpo_nll_scope: Literal["full", "response"] = field(
        default="full",
        metadata={
            "help": "LongPO: NLL over every non-pad token of the long chosen sequence ('full', as published) "
            "or its responses only ('response')."
        },
    )
    policy_rope_theta: Optional[float] = field(
        default=None,
        metadata={"help": "Raise the POLICY's rope_theta before training (LongPO: 1e7); the reference keeps its own."},
    )

    s2ld_divergence: Literal["forward_kl", "reverse_kl", "jsd"] = field(
        default="forward_kl",
        metadata={
            "help": "S2LD: per-token divergence between the policy on the long input and the frozen start model on the "
            "short input: forward_kl (context distillation), reverse_kl (on-policy distillation), jsd (generalized JSD)."
        },
    )
    s2ld_jsd_beta: float = field(
        default=0.5,
        metadata={"help": "S2LD: the teacher's weight in the generalized JSD's mixture (0 < beta < 1; 0.5 symmetric)."},
    )
    s2ld_nll_weight: float = field(
        default=0.0,
        metadata={"help": "S2LD: weight of the policy's NLL on the chosen response given the long input (0 = off)."},
    )
    s2ld_on_policy: bool = field(
        default=False,
        metadata={
            "help": "S2LD: the policy samples its own responses to the long input (HF generate) and the loss is the "
            "reverse KL to the teacher on them; False trains on the dataset's chosen responses."
        },
    )
    s2ld_samples: int = field(default=1, metadata={"help": "S2LD on-policy: responses sampled per long prompt."})
    s2ld_max_new_tokens: int = field(default=256, metadata={"help": "S2LD on-policy: most tokens per sampled response."})
    s2ld_temperature: float = field(default=1.0, metadata={"help": "S2LD on-policy: sampling temperature."})
    s2ld_sample_every: int = field(
        default=1,
        metadata={"help": "S2LD on-policy: sample every this many optimizer steps; the steps between reuse the last samples."},
    )

    s2l_logits_chunk: int = field(
        default=4096,
        metadata={"help": "Tokens per chunk when applying the LM head (memory of the head grows with this, not the sequence)."},
    )
    s2l_response_logits: bool = field(
        default=True,
        metadata={
            "help": "Apply the LM head only where log-probs are needed; False builds full [seq, vocab] logits (slow path)."
        },
    )
    s2l_shared_prefix: bool = field(
        default=True,
        metadata={"help": "LongPO: run the shared document prefix once for the chosen and rejected continuations."},
    )
    s2l_precompute_ref: bool = field(
        default=True,
        metadata={
            "help": "Compute reference log-probs once before training and cache them on disk (no reference model in training)."
        },
    )
    s2l_estimate_at_start: bool = field(
        default=True,
        metadata={
            "help": "Log the memory planner's predicted peak per rank as training starts (one step traced on fake "
            "tensors, single-process runs only); False skips the trace."
        },
    )
    s2l_ref_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Folder of the reference log-prob cache (default: ~/.cache/llamafactory_longpo/ref_logps)."},
    )
    s2l_resume_other_run: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint written by a run of another stage, pref_loss or dataset (refused by "
            "default: its optimizer state, schedule and data position would carry over)."
        },
    )
    s2l_offload_activations: bool = field(
        default=False,
        metadata={
            "help": "Keep each checkpointed layer's input in (pinned) host memory and copy it back for that layer's "
            "recompute; needs gradient checkpointing. The toolkit's use_unsloth_gc becomes this under the plugin's stages."
        },
    )
    s2l_tiled_mlp: bool = field(
        default=False,
        metadata={
            "help": "Run each decoder MLP over slices of hidden_size tokens, recomputed one slice at a time in backward, "
            "so no [tokens, intermediate] tensor is ever whole (dense gated MLPs: Llama, Qwen2, Mistral, ...)."
        },
    )
    sequence_parallel_size: int = field(
        default=1,
        metadata={
            "help": "Ulysses sequence parallelism (DeepSpeed's UlyssesSPAttentionHF): split every row's tokens over this "
            "many consecutive ranks (any size: heads are padded to a multiple of it); needs flash_attn sdpa or fa2. 1 = off."
        },
    )

    def validate_short_to_long(self, stage: str, pref_loss: str) -> None:
        """Raise a one-line :class:`ConfigError` naming the key and the allowed values."""
        validate_choices(self, {f.name for f in fields(ShortToLongFinetuningArguments)})
        # the toolkit's preference knobs (pref_beta, simpo_gamma) reach the plugin's losses too (it never checks them)
        for name in ("solopo_alpha", "longpo_lambda", "longpo_nll_weight", "pref_beta", "simpo_gamma", "policy_rope_theta"):
            KNOB_RANGES[name].check(name, _number(self, name))
        for name in ("s2l_logits_chunk", "sequence_parallel_size", *S2LD_INT_KNOBS):
            KNOB_RANGES[name].check(name, _integer(self, name))
        for name in S2LD_FLOAT_KNOBS:
            KNOB_RANGES[name].check(name, _number(self, name))
        cache_dir = self.s2l_ref_cache_dir
        if cache_dir and os.path.exists(cache_dir) and not os.path.isdir(cache_dir):  # found now, not after the reference pass
            raise ConfigError(f"s2l_ref_cache_dir: {cache_dir!r} is a file, not a folder")
        self._warn_no_effect(stage, pref_loss)
        if self.sequence_parallel_size > 1 and not self.s2l_response_logits:
            raise ConfigError("sequence_parallel_size > 1 needs s2l_response_logits: true (each rank scores its own tokens)")
        if stage == "solopo" and pref_loss not in SOLOPO_PREF_LOSSES:
            raise ConfigError(
                f"pref_loss: {pref_loss!r} is not supported by stage solopo; use one of {', '.join(SOLOPO_PREF_LOSSES)}"
            )
        if stage == "s2ld" and self.s2ld_on_policy and self.sequence_parallel_size > 1:
            raise ConfigError(
                "s2ld_on_policy: true does not run with sequence_parallel_size > 1 (generation is not sharded); turn one off"
            )
        if stage == "longpo" and pref_loss != "sigmoid":
            raise ConfigError(f"pref_loss: {pref_loss!r} is not supported by stage longpo; use sigmoid")

    def _warn_no_effect(self, stage: str, pref_loss: str) -> None:
        """Warn about knobs the chosen stage and loss never read."""
        for other in PLUGIN_STAGES:
            names = tuple(f.name for f in fields(ShortToLongFinetuningArguments) if f.name.startswith(f"{other}_"))
            for name in _changed(self, names) if other != stage else ():
                warn_no_effect(name, f"stage {stage} does not read {other}_* knobs")
        if stage == "s2ld":
            self._warn_s2ld_no_effect()
        if stage == "solopo" and pref_loss != "sigmoid" and _changed(self, ("solopo_long_reference",)):
            warn_no_effect("solopo_long_reference", f"pref_loss {pref_loss} has no reference model (only sigmoid has one)")
        if stage != "longpo" and _changed(self, ("s2l_shared_prefix",)):
            warn_no_effect("s2l_shared_prefix", "only stage longpo shares a document prefix")
        from .data.plan import RowPlan  # the plan decides which runs have a reference

        has_reference = bool(RowPlan.for_stage(self).reference)
        if self.s2l_ref_cache_dir and not (has_reference and self.s2l_precompute_ref):
            why = "s2l_precompute_ref is false" if has_reference else f"pref_loss {pref_loss} has no reference model"
            warn_no_effect("s2l_ref_cache_dir", f"no reference log-probs are cached ({why})")

    def _warn_s2ld_no_effect(self) -> None:
        """Stage s2ld's knobs that its chosen path (off- or on-policy, divergence) never reads."""
        if self.s2ld_on_policy:
            if self.s2ld_divergence != "reverse_kl" and _changed(self, ("s2ld_divergence",)):
                warn_no_effect("s2ld_divergence", "on-policy samples are scored with the reverse KL")
            if _changed(self, ("s2ld_nll_weight",)):
                warn_no_effect("s2ld_nll_weight", "on-policy samples have no chosen response to fit")
        else:
            for name in _changed(self, S2LD_ON_POLICY_KNOBS):
                warn_no_effect(name, "s2ld_on_policy is false")
        if (self.s2ld_on_policy or self.s2ld_divergence != "jsd") and _changed(self, ("s2ld_jsd_beta",)):
            warn_no_effect("s2ld_jsd_beta", "the divergence is not jsd")


@dataclass
class ShortToLongDataArguments:
    """Data knobs for short-to-long records (``"formatting": "short_to_long"``)."""

    short_cutoff_len: int = field(
        default=2048,
        metadata={"help": "Cutoff length of SHORT rows (short pair, reference rows); cutoff_len applies to long rows."},
    )
    s2l_view: Literal["long", "short"] = field(
        default="long",
        metadata={
            "help": "Which view of a short-to-long dataset the toolkit's own dpo/sft stages see: 'long' "
            "(Long-PO / expand-long baselines) or 'short'. sft always trains on the chosen responses."
        },
    )
    s2l_overlong: Literal["drop", "middle"] = field(
        default="drop",
        metadata={
            "help": "A sample over its cutoff is dropped with a counted warning ('drop') or has its context "
            "cut in the middle ('middle'); the instruction and assistant header are never cut."
        },
    )
    s2l_joiner: str = field(
        default="\n\n",
        metadata={"help": "Text between the context and the instruction in a user message."},
    )
    # not a knob: the run's data.plan.RowPlan, made from the stage's arguments before the dataset is loaded (the
    # toolkit's loader hands the processor nothing but data_args); init=False keeps it out of YAML and the CLI
    s2l_plan: Optional[Any] = field(default=None, init=False, repr=False)

    def validate_short_to_long(self) -> None:
        validate_choices(self, {f.name for f in fields(ShortToLongDataArguments)})
        KNOB_RANGES["short_cutoff_len"].check("short_cutoff_len", _integer(self, "short_cutoff_len"))
        cutoff = getattr(self, "cutoff_len", None)  # the toolkit's field, present once merged into its DataArguments
        # a knob left at its default says nothing: every stock run with a cutoff_len below it would warn otherwise
        if isinstance(cutoff, int) and self.short_cutoff_len > cutoff and _changed(self, ("short_cutoff_len",)):
            warn_no_effect(
                "short_cutoff_len",
                f"{self.short_cutoff_len} is above cutoff_len {cutoff}; a short row that long has a long row over cutoff_len, "
                "which is dropped or cut anyway",
            )
