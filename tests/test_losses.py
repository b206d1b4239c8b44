"""losses.py against an independent float64 computation of the papers' formulas (tests/spec_formulas.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from llamafactory_longpo.losses import (
    SoLoPOLogps,
    SoLoPOOutput,
    SoLoPOReference,
    longpo_loss,
    s2ld_loss,
    solo_dpo_loss,
    solo_orpo_loss,
    solo_simpo_loss,
    token_divergence,
)
from tests import spec_formulas as spec

B = 5


def _solopo(
    x: dict[str, torch.Tensor], logps: dict[str, torch.Tensor], pref_loss: str, long_ref: str, both: bool, **kw: float | str
) -> SoLoPOOutput:
    """The variant of ``pref_loss`` on the inputs of :func:`_inputs` (``logps``: the policy sums, maybe leaves)."""
    policy = SoLoPOLogps(
        logps["sc"],
        logps["sr"],
        logps["lc"],
        x["n_sc"],
        x["n_sr"],
        x["n_lc"],
        long_rejected=logps["lr"] if both else None,
        long_rejected_lengths=x["n_lr"] if both else None,
    )
    gamma = kw.pop("gamma")
    if pref_loss == "simpo":
        return solo_simpo_loss(policy, gamma=gamma, **kw)
    if pref_loss == "orpo":
        return solo_orpo_loss(policy, **kw)
    long = long_ref == "long"
    ref = SoLoPOReference(x["ref_sc"], x["ref_sr"], x["ref_lc"] if long else None, x["ref_lr"] if long and both else None)
    return solo_dpo_loss(policy, ref, **kw)


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = {k: torch.randint(3, 40, (B,), generator=g) for k in ("n_sc", "n_sr", "n_lc", "n_lr")}
    # log-probs: negative, about -0.2..-3 per token
    logps = {
        k: -(torch.rand(B, generator=g, dtype=torch.float64) * 2.8 + 0.2) * lengths["n_" + k].double()
        for k in ("sc", "sr", "lc", "lr")
    }
    refs = {f"ref_{k}": logps[k] + torch.randn(B, generator=g, dtype=torch.float64) for k in ("sc", "sr", "lc", "lr")}
    return {**lengths, **logps, **refs}


CASES = list(itertools.product(("sigmoid", "simpo", "orpo"), ("abs", "square", "smooth_l1"), ("long", "short"), (False, True)))


@pytest.mark.parametrize("pref_loss,dist,long_ref,both", CASES)
def test_solopo_matches_spec(pref_loss: str, dist: str, long_ref: str, both: bool) -> None:
    x = _inputs(CASES.index((pref_loss, dist, long_ref, both)))
    leaf = {k: x[k].clone().requires_grad_(True) for k in ("sc", "sr", "lc", "lr")}
    kw = dict(beta=0.3, alpha=1.7, gamma=0.4, distance=dist)
    out = _solopo(x, leaf, pref_loss, long_ref, both, **kw)

    samples = [{k: (v[i].item()) for k, v in x.items()} for i in range(B)]
    expected = [
        spec.solopo_sample(
            s, pref_loss=pref_loss, beta=0.3, alpha=1.7, gamma=0.4, dist=dist, long_reference=long_ref, align_both=both
        )
        for s in samples
    ]
    assert out.loss.item() == pytest.approx(sum(expected) / B, rel=1e-10, abs=1e-10)
    assert (out.po_losses + 1.7 * out.align_losses).tolist() == pytest.approx(expected, rel=1e-10, abs=1e-10)
    out.loss.backward()
    for name in ("sc", "sr", "lc") + (("lr",) if both else ()):
        assert leaf[name].grad is not None and torch.isfinite(leaf[name].grad).all(), name
    # alpha = 0 gives the plain preference loss
    out0 = _solopo(x, x, pref_loss, long_ref, both, **dict(kw, alpha=0.0))
    plain = [
        spec.solopo_sample(
            s, pref_loss=pref_loss, beta=0.3, alpha=0.0, gamma=0.4, dist=dist, long_reference=long_ref, align_both=both
        )
        for s in samples
    ]
    assert out0.loss.item() == pytest.approx(sum(plain) / B, rel=1e-10)
    assert out0.loss.item() == pytest.approx(out.po_losses.mean().item(), rel=1e-12)


def test_solopo_short_reference_cancels() -> None:
    """With the short reference reused, the SoLo-DPO term is beta*|logp(y_w|x_S) - logp(y_w|x_L)|."""
    x = _inputs(1)
    out = _solopo(x, x, "sigmoid", "short", False, beta=0.2, alpha=1.0, gamma=0.0, distance="abs")
    torch.testing.assert_close(out.align_losses, 0.2 * (x["sc"] - x["lc"]).abs())


@pytest.mark.parametrize("beta,lam,w", [(0.1, 0.01, 1.0), (0.01, 1.0, 0.0), (0.5, 0.3, 2.0)])
def test_longpo_matches_spec(beta: float, lam: float, w: float) -> None:
    g = torch.Generator().manual_seed(7)
    p_w, p_l, r_w, r_l = (-(torch.rand(B, generator=g, dtype=torch.float64) * 300) for _ in range(4))
    p_w.requires_grad_(True)
    nll = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    out = longpo_loss(p_w, p_l, r_w, r_l, nll, beta=beta, lam=lam, nll_weight=w)
    expected = spec.longpo_batch(p_w.tolist(), p_l.tolist(), r_w.tolist(), r_l.tolist(), 2.5, beta=beta, lam=lam, nll_weight=w)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(out.chosen_rewards, beta * (p_w - r_w).detach())
    torch.testing.assert_close(out.rejected_rewards, beta * (p_l - r_l))
    assert out.pref_losses.shape == (B,)
    out.loss.backward()
    assert torch.isfinite(p_w.grad).all() and torch.isfinite(nll.grad)


@pytest.mark.parametrize(
    "divergence,beta,nll_weight", [("forward_kl", 0.5, 0.0), ("reverse_kl", 0.5, 0.7), ("jsd", 0.2, 1.0), ("jsd", 0.9, 0.0)]
)
def test_s2ld_matches_spec(divergence: str, beta: float, nll_weight: float) -> None:
    """Per-token divergence over the full vocabulary, averaged over response tokens, plus the weighted NLL."""
    g = torch.Generator().manual_seed(11)
    n, vocab = 7, 13
    student = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, vocab, (n,), generator=g)
    s_logps, t_logps = student.log_softmax(-1), teacher.log_softmax(-1)
    per_token = token_divergence(divergence, beta)(s_logps, t_logps)
    out = s2ld_loss(per_token.sum(), s_logps.gather(-1, targets[:, None]).sum(), torch.tensor(n), nll_weight=nll_weight)
    expected = spec.s2ld_batch(
        student.tolist(), teacher.tolist(), targets.tolist(), divergence=divergence, beta=beta, nll_weight=nll_weight
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    tokens = [spec.s2ld_token(s, t, divergence, beta) for s, t in zip(student.tolist(), teacher.tolist())]
    assert per_token.tolist() == pytest.approx(tokens, rel=1e-10, abs=1e-14)
    assert out.divergence.item() == pytest.approx(sum(tokens) / n, rel=1e-12)
    out.loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # the same distributions: no divergence
    assert token_divergence(divergence, beta)(t_logps, t_logps).abs().max().item() < 1e-12
