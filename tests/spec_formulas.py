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
