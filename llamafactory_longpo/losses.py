"""Loss functions of LongPO, SoLoPO and short-to-long self-distillation: pure torch, no LLaMA-Factory import
(hparams has none either).

Every equation of the papers (LongPO arXiv 2502.13922, SoLoPO arXiv 2505.11166; the token-level divergences of
GKD, arXiv 2306.13649, as self-distillation from the short-context view uses them) lives here, one function per
method or divergence (torchtune's ``rlhf/loss`` and ``kd_losses`` style): tensors in, tensors out. Log-probabilities passed in are
per-sample SUMS over response tokens; lengths are response token counts, so averages are taken here and nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .hparams import ShortToLongFinetuningArguments, knob_spec

# the allowed values are the knob's own (hparams); the check below only names them in its message
DISTANCES = knob_spec(ShortToLongFinetuningArguments, "solopo_distance").choices
S2LD_DIVERGENCES = knob_spec(ShortToLongFinetuningArguments, "s2ld_divergence").choices


@dataclass
class LongPOOutput:
    """What :func:`longpo_loss` returns; rewards are detached (they are metrics)."""

    loss: torch.Tensor
    pref_losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    nll: torch.Tensor


@dataclass
class SoLoPOLogps:
    """The policy's response log-prob SUMS and response token counts a SoLoPO loss reads, each ``[B]``: y_w and y_l
    on the SHORT input, y_w on the LONG input, and y_l on the long input when both responses are aligned (the
    ``solopo_align: both`` ablation; otherwise only the chosen response is aligned, the paper's chosen-only SoLo-RA)."""

    short_chosen: torch.Tensor
    short_rejected: torch.Tensor
    long_chosen: torch.Tensor
    short_chosen_lengths: torch.Tensor
    short_rejected_lengths: torch.Tensor
    long_chosen_lengths: torch.Tensor
    long_rejected: Optional[torch.Tensor] = None
    long_rejected_lengths: Optional[torch.Tensor] = None


@dataclass
class SoLoPOReference:
    """SoLo-DPO's reference log-prob SUMS, each ``[B]``. Without the long ones (``solopo_long_reference: short``)
    the SHORT reference stands in for the long one, and the reference cancels in the reward distance."""

    short_chosen: torch.Tensor
    short_rejected: torch.Tensor
    long_chosen: Optional[torch.Tensor] = None
    long_rejected: Optional[torch.Tensor] = None


@dataclass
class SoLoPOOutput:
    """What the SoLoPO losses return; rewards are detached (they are metrics)."""

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


def _mean_logps(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    r"""Length-averaged log-probability :math:`\bar{\ell} = \log\pi_\theta(y|x)/|y|` (SimPO's and ORPO's rewards)."""
    return logps / lengths.clamp(min=1).to(logps.dtype)


Rewards = tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]  # short y_w, short y_l, long y_w, long y_l


def _rewards(
    reward: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor],
    policy: SoLoPOLogps,
    references: tuple[Optional[torch.Tensor], ...] = (None, None, None, None),
) -> Rewards:
    """``[B]`` rewards of y_w and y_l on the short input and of y_w (and, aligning both, y_l) on the long one, by
    the variant's ``reward(logps, lengths, ref)``; ``references``: the matching reference sums, ``None`` unused."""
    ref_sc, ref_sr, ref_lc, ref_lr = references
    r_lr = None
    if policy.long_rejected is not None:
        if policy.long_rejected_lengths is None:
            raise ValueError("long_rejected needs long_rejected_lengths")
        r_lr = reward(policy.long_rejected, policy.long_rejected_lengths, ref_lr)
    return (
        reward(policy.short_chosen, policy.short_chosen_lengths, ref_sc),
        reward(policy.short_rejected, policy.short_rejected_lengths, ref_sr),
        reward(policy.long_chosen, policy.long_chosen_lengths, ref_lc),
        r_lr,
    )


def _aligned(po_losses: torch.Tensor, rewards: Rewards, *, alpha: float, distance: str) -> SoLoPOOutput:
    r"""SoLoPO's short-to-long reward alignment added to the base loss (arXiv 2505.11166, eq. 9):
    :math:`L = \mathrm{mean}(L_{PO} + \alpha\, s(|r(x_S, y_w) - r(x_L, y_w)|))`, plus the same term for y_l when
    its long reward is given (align both)."""
    r_sc, r_sr, r_lc, r_lr = rewards
    align_losses = reward_distance(r_sc - r_lc, distance)
    if r_lr is not None:
        align_losses = align_losses + reward_distance(r_sr - r_lr, distance)
    return SoLoPOOutput(
        loss=(po_losses + alpha * align_losses).mean(),
        po_losses=po_losses,
        align_losses=align_losses,
        short_chosen_rewards=r_sc.detach(),
        short_rejected_rewards=r_sr.detach(),
        long_chosen_rewards=r_lc.detach(),
        long_rejected_rewards=None if r_lr is None else r_lr.detach(),
    )


def solo_dpo_loss(policy: SoLoPOLogps, ref: SoLoPOReference, *, beta: float, alpha: float, distance: str = "abs") -> SoLoPOOutput:
    r"""SoLo-DPO (arXiv 2505.11166, eq. 9 with the DPO reward).

    .. math::
        r(x, y) &= \beta\,(\log\pi_\theta(y|x) - \log\pi_{ref}(y|x)) \\
        L_{PO} &= -\log\sigma\big(r(x_S, y_w) - r(x_S, y_l)\big)

    Args:
        policy: :class:`SoLoPOLogps`, each ``[B]``.
        ref: :class:`SoLoPOReference`, each ``[B]``; without its long sums the short ones stand in, and the
            distance becomes :math:`\beta\,|\log\pi_\theta(y_w|x_S) - \log\pi_\theta(y_w|x_L)|`.
        beta: reward scale. alpha: weight of the alignment term. distance: :func:`reward_distance`.

    Returns:
        :class:`SoLoPOOutput`: scalar ``loss``; ``[B]`` ``po_losses``, ``align_losses`` and detached rewards.
    """

    def reward(logps: torch.Tensor, _lengths: torch.Tensor, ref_logps: Optional[torch.Tensor]) -> torch.Tensor:
        return beta * (logps - ref_logps)

    long_chosen = ref.short_chosen if ref.long_chosen is None else ref.long_chosen
    long_rejected = ref.short_rejected if ref.long_rejected is None else ref.long_rejected
    rewards = _rewards(reward, policy, (ref.short_chosen, ref.short_rejected, long_chosen, long_rejected))
    return _aligned(-F.logsigmoid(rewards[0] - rewards[1]), rewards, alpha=alpha, distance=distance)


def solo_simpo_loss(policy: SoLoPOLogps, *, beta: float, gamma: float, alpha: float, distance: str = "abs") -> SoLoPOOutput:
    r"""SoLo-SimPO (arXiv 2505.11166, eq. 9 with SimPO's reward; no reference model).

    .. math::
        r(x, y) &= \beta\,\bar{\ell}(y|x), \quad \bar{\ell} = \log\pi_\theta(y|x)/|y| \\
        L_{PO} &= -\log\sigma\big(r(x_S, y_w) - r(x_S, y_l) - \gamma\big)

    Args:
        policy: :class:`SoLoPOLogps`, each ``[B]``. beta: reward scale. gamma: target margin. alpha: weight of
            the alignment term. distance: :func:`reward_distance`.

    Returns:
        :class:`SoLoPOOutput`: scalar ``loss``; ``[B]`` ``po_losses``, ``align_losses`` and detached rewards.
    """

    def reward(logps: torch.Tensor, lengths: torch.Tensor, _ref: Optional[torch.Tensor]) -> torch.Tensor:
        return beta * _mean_logps(logps, lengths)

    rewards = _rewards(reward, policy)
    return _aligned(-F.logsigmoid(rewards[0] - rewards[1] - gamma), rewards, alpha=alpha, distance=distance)


def solo_orpo_loss(policy: SoLoPOLogps, *, beta: float, alpha: float, distance: str = "abs") -> SoLoPOOutput:
    r"""SoLo-ORPO (arXiv 2505.11166, eq. 9 with ORPO's log-odds reward; no reference model).

    .. math::
        r(x, y) &= \bar{\ell}(y|x) - \log\big(1 - e^{\bar{\ell}(y|x)}\big) \\
        L_{PO} &= -\bar{\ell}(y_w|x_S) - \beta\,\log\sigma\big(r(x_S, y_w) - r(x_S, y_l)\big)

    (SFT on the chosen response plus the odds-ratio term, ``beta`` its weight.)

    Args:
        policy: :class:`SoLoPOLogps`, each ``[B]``. beta: weight of the odds-ratio term. alpha: weight of the
            alignment term. distance: :func:`reward_distance`.

    Returns:
        :class:`SoLoPOOutput`: scalar ``loss``; ``[B]`` ``po_losses``, ``align_losses`` and detached rewards.
    """

    def reward(logps: torch.Tensor, lengths: torch.Tensor, _ref: Optional[torch.Tensor]) -> torch.Tensor:
        avg = _mean_logps(logps, lengths)
        return avg - log1mexp(avg.clamp(max=-1e-6))

    rewards = _rewards(reward, policy)
    po_losses = -_mean_logps(policy.short_chosen, policy.short_chosen_lengths) - beta * F.logsigmoid(rewards[0] - rewards[1])
    return _aligned(po_losses, rewards, alpha=alpha, distance=distance)


def forward_kl(student_logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
    r"""Forward KL per token, :math:`KL(p_T \| p_S) = \sum_v p_T(v)\,(\log p_T(v) - \log p_S(v))`: mode-covering,
    the divergence of context distillation (Snell et al., arXiv 2209.15189) and of GKD's ``beta = 0`` (arXiv
    2306.13649, sec. 3).

    Args:
        student_logps, teacher_logps: ``[N, V]`` log-probabilities over the vocabulary (``log_softmax`` of logits).

    Returns:
        ``[N]`` divergences, one per token position.
    """
    return (teacher_logps.exp() * (teacher_logps - student_logps)).sum(-1)


def reverse_kl(student_logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
    r"""Reverse KL per token, :math:`KL(p_S \| p_T) = \sum_v p_S(v)\,(\log p_S(v) - \log p_T(v))`: mode-seeking,
    the divergence of on-policy distillation (GKD's ``beta = 1``, arXiv 2306.13649; MiniLLM, arXiv 2306.08543).

    Args:
        student_logps, teacher_logps: ``[N, V]`` log-probabilities over the vocabulary.

    Returns:
        ``[N]`` divergences, one per token position.
    """
    return (student_logps.exp() * (student_logps - teacher_logps)).sum(-1)


def generalized_jsd(student_logps: torch.Tensor, teacher_logps: torch.Tensor, beta: float) -> torch.Tensor:
    r"""Generalized Jensen-Shannon divergence per token (GKD, arXiv 2306.13649, eq. 3), with the mixture
    :math:`M = \beta\,p_T + (1 - \beta)\,p_S`:

    .. math::
        JSD_\beta = \beta\,KL(p_T \| M) + (1 - \beta)\,KL(p_S \| M), \quad 0 < \beta < 1

    (it behaves like :math:`\beta\,KL(p_T \| p_S)` as :math:`\beta \to 0` and like a reverse KL as
    :math:`\beta \to 1`; ``beta = 0.5`` is the symmetric JSD).

    Args:
        student_logps, teacher_logps: ``[N, V]`` log-probabilities over the vocabulary. beta: the teacher's weight
            in the mixture, strictly between 0 and 1.

    Returns:
        ``[N]`` divergences, one per token position.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"s2ld_jsd_beta: {beta!r} must be > 0 and < 1")
    mixture = torch.logsumexp(torch.stack([teacher_logps + math.log(beta), student_logps + math.log1p(-beta)]), dim=0)
    return beta * forward_kl(mixture, teacher_logps) + (1.0 - beta) * forward_kl(mixture, student_logps)


TokenDivergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def token_divergence(name: str, beta: float = 0.5) -> TokenDivergence:
    """The per-token divergence ``s2ld_divergence`` names, as ``f(student_logps [N, V], teacher_logps [N, V]) -> [N]``
    (``beta``: :func:`generalized_jsd`'s, read only by ``jsd``)."""
    variants: dict[str, TokenDivergence] = {
        "forward_kl": forward_kl,
        "reverse_kl": reverse_kl,
        "jsd": lambda student, teacher: generalized_jsd(student, teacher, beta),
    }
    if name not in variants:
        raise ValueError(f"s2ld_divergence: {name!r} is not one of {', '.join(S2LD_DIVERGENCES)}")
    return variants[name]


@dataclass
class S2LDOutput:
    """What :func:`s2ld_loss` returns: the scalar loss and its two parts (detached, they are metrics)."""

    loss: torch.Tensor
    divergence: torch.Tensor
    nll: torch.Tensor


def s2ld_loss(divergence_sum: torch.Tensor, logp_sum: torch.Tensor, tokens: torch.Tensor, *, nll_weight: float) -> S2LDOutput:
    r"""Short-to-long self-distillation: the policy on the LONG input (student) matches, token by token, the frozen
    start model on the SHORT input (teacher), over the response positions (context distillation, Snell et al.,
    arXiv 2209.15189; on-policy self-distillation from the short-context view, OPSDL, arXiv 2604.17535):

    .. math::
        L = \frac{1}{N}\sum_{t} D\big(p_S(\cdot \mid x_L, y_{<t}),\ p_T(\cdot \mid x_S, y_{<t})\big)
            - w_{nll}\,\frac{1}{N}\sum_t \log p_S(y_t \mid x_L, y_{<t})

    over the ``N`` response tokens of the batch, ``D`` one of :func:`forward_kl`, :func:`reverse_kl`,
    :func:`generalized_jsd`.

    Args:
        divergence_sum: scalar :math:`\sum_t D_t` over the batch's response tokens.
        logp_sum: scalar :math:`\sum_t \log p_S(y_t \mid x_L, y_{<t})`, the student's log-prob of the response.
        tokens: scalar count ``N`` of response tokens (at least 1 is used).
        nll_weight: weight of the NLL term (0: pure distillation).
    """
    count = tokens.clamp(min=1).to(divergence_sum.dtype)
    divergence = divergence_sum / count
    nll = -logp_sum / count
    return S2LDOutput(loss=divergence + nll_weight * nll, divergence=divergence.detach(), nll=nll.detach())
