"""The papers' formulas (LongPO, arXiv 2502.13922; SoLoPO, arXiv 2505.11166) written again with Python floats
(float64), independent of losses.py."""

from __future__ import annotations

import math


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reward(logp: float, length: int, pref_loss: str, beta: float, ref: float | None) -> float:
    if pref_loss == "sigmoid":
        return beta * (logp - ref)
    avg = logp / length
    if pref_loss == "simpo":
        return beta * avg
    return avg - math.log(1.0 - math.exp(avg))  # orpo log-odds


def distance(d: float, kind: str) -> float:
    if kind == "abs":
        return abs(d)
    if kind == "square":
        return d * d
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def solopo_sample(
    s: dict, *, pref_loss: str, beta: float, alpha: float, gamma: float, dist: str, long_reference: str, align_both: bool
) -> float:
    """One sample's SoLoPO loss; ``s`` holds sc/sr/lc/lr logps, lengths and references."""
    ref_sc, ref_sr = s.get("ref_sc"), s.get("ref_sr")
    ref_lc = s.get("ref_lc") if long_reference == "long" else ref_sc
    ref_lr = s.get("ref_lr") if long_reference == "long" else ref_sr
    r_sc = reward(s["sc"], s["n_sc"], pref_loss, beta, ref_sc)
    r_sr = reward(s["sr"], s["n_sr"], pref_loss, beta, ref_sr)
    r_lc = reward(s["lc"], s["n_lc"], pref_loss, beta, ref_lc)
    if pref_loss == "sigmoid":
        po = -logsigmoid(r_sc - r_sr)
    elif pref_loss == "simpo":
        po = -logsigmoid(r_sc - r_sr - gamma)
    else:
        po = -s["sc"] / s["n_sc"] - beta * logsigmoid(r_sc - r_sr)
    align = distance(r_sc - r_lc, dist)
    if align_both:
        r_lr = reward(s["lr"], s["n_lr"], pref_loss, beta, ref_lr)
        align += distance(r_sr - r_lr, dist)
    return po + alpha * align


def longpo_batch(p_w: list, p_l: list, r_w: list, r_l: list, nll: float, *, beta: float, lam: float, nll_weight: float) -> float:
    prefs = [-logsigmoid(beta * ((a - c) - (b - d))) for a, b, c, d in zip(p_w, p_l, r_w, r_l)]
    return nll_weight * nll + lam * sum(prefs) / len(prefs)


def softmax(logits: list[float]) -> list[float]:
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    """KL(p || q) of two distributions, terms with p = 0 left out."""
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def s2ld_token(student_logits: list[float], teacher_logits: list[float], divergence: str, beta: float) -> float:
    """One position's divergence between the student's and the teacher's next-token distributions (GKD's
    forward KL, reverse KL and generalized JSD, arXiv 2306.13649)."""
    s, t = softmax(student_logits), softmax(teacher_logits)
    if divergence == "forward_kl":
        return kl(t, s)
    if divergence == "reverse_kl":
        return kl(s, t)
    m = [beta * a + (1 - beta) * b for a, b in zip(t, s)]
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


def s2ld_batch(
    student: list[list[float]], teacher: list[list[float]], targets: list[int], *, divergence: str, beta: float, nll_weight: float
) -> float:
    """Mean divergence over the response positions plus ``nll_weight`` times the student's mean NLL of the targets."""
    divs = [s2ld_token(s, t, divergence, beta) for s, t in zip(student, teacher)]
    nlls = [-math.log(softmax(s)[y]) for s, y in zip(student, targets)]
    return sum(divs) / len(divs) + nll_weight * sum(nlls) / len(nlls)
