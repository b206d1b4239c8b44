"""Loss functions of LongPO and SoLoPO: pure torch, no LLaMA-Factory import (hparams has none either).

Every equation of the two papers (LongPO arXiv 2502.13922, SoLoPO arXiv 2505.11166) lives here, one function
per method (torchtune's ``rlhf/loss`` style): tensors in, tensors out. Log-probabilities passed in are
per-sample SUMS over response tokens; lengths are response token counts, so averages are taken here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .hparams import SOLOPO_PREF_LOSSES, ShortToLongFinetuningArguments, knob_spec

# the allowed values are the knobs' own (hparams); the checks below only name them in their messages
PREF_LOSSES = SOLOPO_PREF_LOSSES
DISTANCES = knob_spec(ShortToLongFinetuningArguments, "solopo_distance").choices


@dataclass
class LongPOOutput:
    """What :func:`longpo_loss` returns; rewards are detached (they are metrics)."""

    loss: torch.Tensor
    pref_losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    nll: torch.Tensor


@dataclass
class SoLoPOOutput:
    """What :func:`solopo_loss` returns; rewards are detached (they are metrics)."""

    loss: torch.Tensor
    po_losses: torch.Tensor
    align_losses: torch.Tensor
    short_chosen_rewards: torch.Tensor
    short_rejected_rewards: torch.Tensor
    long_chosen_rewards: torch.Tensor
    long_rejected_rewards: Optional[torch.Tensor] = None


def longpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    nll: torch.Tensor,
    *,
    beta: float,
    lam: float,
    nll_weight: float = 1.0,
) -> LongPOOutput:
    r"""LongPO: DPO on the LONG input against a reference evaluated on the SHORT input, plus NLL.

    .. math::
        P_w, P_l &= \log\pi_\theta(y_w \mid x_L), \log\pi_\theta(y_l \mid x_L)  \\
        R_w, R_l &= \textstyle\sum_i \log\pi_S(y_{w,i} \mid x_{S,i}), \sum_i \log\pi_S(y_{l,i} \mid x_{S,i}) \\
        \ell_{pref} &= -\log\sigma\big(\beta\,[(P_w - R_w) - (P_l - R_l)]\big) \\
        L &= w_{nll}\,L_{nll} + \lambda\,\mathrm{mean}(\ell_{pref})

    Why the short reference: the short-context model is the teacher whose behaviour on the chunk the
    long-context policy should keep, so its log-probs anchor the rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed response log-probs on the long input.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` summed response log-probs of the reference on the
            short inputs (summed over turns).
        nll: scalar token-mean negative log-likelihood (its scope is chosen by the caller).
        beta: DPO temperature. lam: weight of the preference term. nll_weight: weight of the NLL term.
    """
    chosen_margin = policy_chosen_logps - ref_chosen_logps
    rejected_margin = policy_rejected_logps - ref_rejected_logps
    pref_losses = -F.logsigmoid(beta * (chosen_margin - rejected_margin))
    loss = nll_weight * nll + lam * pref_losses.mean()
    return LongPOOutput(
        loss=loss,
        pref_losses=pref_losses,
        chosen_rewards=(beta * chosen_margin).detach(),
        rejected_rewards=(beta * rejected_margin).detach(),
        nll=nll.detach(),
    )


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    r"""``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Maechler's switch at ``-log 2``)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def reward_distance(diff: torch.Tensor, distance: str) -> torch.Tensor:
    r"""SoLoPO's ``s(|d|)``: ``abs`` = :math:`|d|`, ``square`` = :math:`d^2`,
    ``smooth_l1`` = :math:`0.5 d^2` for :math:`|d| < 1`, else :math:`|d| - 0.5`."""
    if distance == "abs":
        return diff.abs()
    if distance == "square":
        return diff.square()
    if distance == "smooth_l1":
        return F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="none", beta=1.0)
    raise ValueError(f"solopo_distance: {distance!r} is not one of {', '.join(DISTANCES)}")


def preference_reward(
    logps: torch.Tensor,
    lengths: torch.Tensor,
    *,
    pref_loss: str,
    beta: float,
    ref_logps: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""The reward ``r(x, y)`` of each base preference loss (SoLoPO, arXiv 2505.11166, section 3).

    - ``sigmoid`` (DPO): :math:`\beta(\log\pi_\theta(y|x) - \log\pi_{ref}(y|x))`
    - ``simpo``: :math:`\beta\,\bar{\ell}`, with :math:`\bar{\ell} = \log\pi_\theta(y|x)/|y|`
    - ``orpo`` (log-odds): :math:`\bar{\ell} - \log(1 - e^{\bar{\ell}})`
    """
    if pref_loss == "sigmoid":
        if ref_logps is None:
            raise ValueError("pref_loss 'sigmoid' needs reference log-probs")
        return beta * (logps - ref_logps)
    avg = logps / lengths.clamp(min=1).to(logps.dtype)
    if pref_loss == "simpo":
        return beta * avg
    if pref_loss == "orpo":
        return avg - log1mexp(avg.clamp(max=-1e-6))
    raise ValueError(f"pref_loss: {pref_loss!r} is not one of {', '.join(PREF_LOSSES)}")


def _po_losses(
    pref_loss: str, r_chosen: torch.Tensor, r_rejected: torch.Tensor, avg_chosen: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """The base preference loss on the short pair, one explicit branch per ``pref_loss``."""
    margin = r_chosen - r_rejected
    if pref_loss == "sigmoid":  # SoLo-DPO
        return -F.logsigmoid(margin)
    if pref_loss == "simpo":  # SoLo-SimPO: target margin gamma
        return -F.logsigmoid(margin - gamma)
    if pref_loss == "orpo":  # SoLo-ORPO: SFT on the chosen response plus the odds-ratio term
        return -avg_chosen - beta * F.logsigmoid(margin)
    raise ValueError(f"pref_loss: {pref_loss!r} is not one of {', '.join(PREF_LOSSES)}")


def solopo_loss(
    short_chosen_logps: torch.Tensor,
    short_rejected_logps: torch.Tensor,
    long_chosen_logps: torch.Tensor,
    short_chosen_lengths: torch.Tensor,
    short_rejected_lengths: torch.Tensor,
    long_chosen_lengths: torch.Tensor,
    *,
    pref_loss: str,
    beta: float,
    alpha: float,
    gamma: float = 0.5,
    distance: str = "abs",
    ref_short_chosen_logps: Optional[torch.Tensor] = None,
    ref_short_rejected_logps: Optional[torch.Tensor] = None,
    ref_long_chosen_logps: Optional[torch.Tensor] = None,
    long_rejected_logps: Optional[torch.Tensor] = None,
    long_rejected_lengths: Optional[torch.Tensor] = None,
    ref_long_rejected_logps: Optional[torch.Tensor] = None,
) -> SoLoPOOutput:
    r"""SoLoPO (arXiv 2505.11166, eq. 9): preference optimization on the SHORT pair plus short-to-long reward alignment.

    .. math::
        L = \mathrm{mean}\Big(L_{PO}(x_S; y_w, y_l)
            + \alpha\, s\big(|r(x_S, y_w) - r(x_L, y_w)|\big)\Big)

    with, per ``pref_loss`` (rewards from :func:`preference_reward`):

    - ``sigmoid`` (SoLo-DPO): :math:`L_{PO} = -\log\sigma(r(x_S,y_w) - r(x_S,y_l))`
    - ``simpo`` (SoLo-SimPO): :math:`L_{PO} = -\log\sigma(r(x_S,y_w) - r(x_S,y_l) - \gamma)`
    - ``orpo`` (SoLo-ORPO): :math:`L_{PO} = -\bar{\ell}(y_w|x_S) - \beta\log\sigma(r(x_S,y_w) - r(x_S,y_l))`

    Two variants are chosen by which optional tensors are given (the keywords are the public interface):

    - *align both* (the ``solopo_align: both`` ablation): ``long_rejected_logps`` and ``long_rejected_lengths``
      given adds :math:`\alpha\,s(|r(x_S,y_l) - r(x_L,y_l)|)`; otherwise only the chosen response is aligned
      (chosen-only SoLo-RA, the paper's method).
    - *short reference reused* (SoLo-DPO with ``solopo_long_reference: short``): ``ref_long_chosen_logps``
      (and ``ref_long_rejected_logps``) absent means the SHORT reference stands in for the long one; the
      reference then cancels in the distance, which becomes :math:`\beta\,|\log\pi_\theta(y_w|x_S) - \log\pi_\theta(y_w|x_L)|`.

    Args:
        short_chosen_logps, short_rejected_logps, long_chosen_logps: ``[B]`` response log-prob SUMS of the
            policy: y_w and y_l on the short input, y_w on the long input.
        short_chosen_lengths, short_rejected_lengths, long_chosen_lengths: ``[B]`` response token counts (for
            the length-averaged rewards of SimPO and ORPO).
        pref_loss: ``sigmoid``, ``simpo`` or ``orpo``. beta: reward scale (ORPO: weight of the odds-ratio
            term). alpha: weight of the alignment term. gamma: SimPO's target margin. distance: ``abs``,
            ``square`` or ``smooth_l1`` (:func:`reward_distance`).
        ref_short_chosen_logps, ref_short_rejected_logps: ``[B]`` reference SUMS on the short input; required
            by ``sigmoid``, ignored otherwise.
        ref_long_chosen_logps: ``[B]`` reference SUM of y_w on the long input (``sigmoid``; see above).
        long_rejected_logps, long_rejected_lengths, ref_long_rejected_logps: ``[B]``; y_l on the long input
            (align both; see above).

    Returns:
        :class:`SoLoPOOutput`: the scalar ``loss``, per-sample ``[B]`` ``po_losses`` and ``align_losses``
        (summed over the aligned responses), and the detached ``[B]`` rewards.
    """
    sigmoid = pref_loss == "sigmoid"
    if sigmoid and (ref_short_chosen_logps is None or ref_short_rejected_logps is None):
        raise ValueError("pref_loss 'sigmoid' (SoLo-DPO) needs ref_short_chosen_logps and ref_short_rejected_logps")
    align_both = long_rejected_logps is not None
    if align_both and long_rejected_lengths is None:
        raise ValueError("long_rejected_logps needs long_rejected_lengths")
    reuse_short_reference = ref_long_chosen_logps is None

    def reward(logps: torch.Tensor, lengths: torch.Tensor, ref: Optional[torch.Tensor]) -> torch.Tensor:
        return preference_reward(logps, lengths, pref_loss=pref_loss, beta=beta, ref_logps=ref if sigmoid else None)

    r_sc = reward(short_chosen_logps, short_chosen_lengths, ref_short_chosen_logps)
    r_sr = reward(short_rejected_logps, short_rejected_lengths, ref_short_rejected_logps)
    r_lc = reward(
        long_chosen_logps, long_chosen_lengths, ref_short_chosen_logps if reuse_short_reference else ref_long_chosen_logps
    )
    avg_chosen = short_chosen_logps / short_chosen_lengths.clamp(min=1).to(short_chosen_logps.dtype)
    po_losses = _po_losses(pref_loss, r_sc, r_sr, avg_chosen, beta, gamma)

    align_losses = reward_distance(r_sc - r_lc, distance)
    r_lr = None
    if align_both:
        ref_lr = ref_short_rejected_logps if ref_long_rejected_logps is None else ref_long_rejected_logps
        r_lr = reward(long_rejected_logps, long_rejected_lengths, ref_lr)
        align_losses = align_losses + reward_distance(r_sr - r_lr, distance)

    loss = (po_losses + alpha * align_losses).mean()
    return SoLoPOOutput(
        loss=loss,
        po_losses=po_losses,
        align_losses=align_losses,
        short_chosen_rewards=r_sc.detach(),
        short_rejected_rewards=r_sr.detach(),
        long_chosen_rewards=r_lc.detach(),
        long_rejected_rewards=None if r_lr is None else r_lr.detach(),
    )
