"""Stage s2ld's chunked teacher/student divergence (train/distill.py) against full ``[T, V]`` logits, in float64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamafactory_longpo.errors import TrainingError
from llamafactory_longpo.losses import s2ld_loss, token_divergence
from llamafactory_longpo.train.distill import check_same_responses, chunked_divergence, teacher_states
from llamafactory_longpo.train.logps import next_token_targets


def _rows(prompts: list[list[int]], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and labels (labels on the responses)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids, mask, labels = (torch.full((len(prompts), width), v, dtype=torch.long) for v in (0, 0, -100))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        mask[i, : len(p) + len(r)] = 1
        labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
    return ids, mask, labels


@pytest.mark.parametrize("divergence,chunk", [("forward_kl", 1), ("reverse_kl", 3), ("jsd", 1000)])
def test_chunked_divergence_equals_full_logits(tiny_model: Path, divergence: str, chunk: int) -> None:
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).requires_grad_(False)
    with torch.no_grad():  # another model: the divergence is far from zero
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 200, (n,), generator=g).tolist()  # noqa: E731
    responses = [ids(5), ids(3)]
    short = _rows([ids(4), ids(6)], responses)
    long = _rows([ids(17), ids(11)], responses)
    fn = token_divergence(divergence, 0.3)

    hidden, short_targets = teacher_states(teacher, teacher.lm_head, *short)
    check_same_responses(short_targets, next_token_targets(long[2]))
    sums = chunked_divergence(
        student, student.lm_head, long[0], long[2], hidden, teacher.lm_head, fn, attention_mask=long[1], chunk_size=chunk
    )
    out = s2ld_loss(sums.divergence, sums.student_logps, sums.tokens, nll_weight=0.4)
    out.loss.backward()
    chunked = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    # the same loss from full [B, L, V] logits of both models
    s_logps = student(input_ids=long[0], attention_mask=long[1]).logits.log_softmax(-1)
    with torch.no_grad():
        t_logps = teacher(input_ids=short[0], attention_mask=short[1]).logits.log_softmax(-1)
    s_targets, t_targets = next_token_targets(long[2]), next_token_targets(short[2])
    s_at, t_at = s_logps[s_targets != -100], t_logps[t_targets != -100]
    n = s_at.size(0)
    assert n == 8 and sums.tokens.item() == n
    picked = s_at.gather(-1, s_targets[s_targets != -100][:, None]).sum()
    full = fn(s_at, t_at).sum() / n - 0.4 * picked / n
    full.backward()
    assert out.loss.item() == pytest.approx(full.item(), rel=1e-12)
    assert sums.teacher_logps.item() == pytest.approx(
        t_at.gather(-1, t_targets[t_targets != -100][:, None]).sum().item(), rel=1e-12
    )
    for name, p in student.named_parameters():
        torch.testing.assert_close(chunked[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_rows_with_different_responses_are_refused() -> None:
    short = next_token_targets(torch.tensor([[-100, -100, 5, 6, -100]]))
    with pytest.raises(TrainingError, match="different response tokens"):
        check_same_responses(short, next_token_targets(torch.tensor([[-100, -100, -100, 5, 7]])))
    with pytest.raises(TrainingError, match="different response tokens"):
        check_same_responses(short, next_token_targets(torch.tensor([[-100, 5, 6, 6, -100]])))


def test_teacher_in_its_own_dtype(tiny_model: Path) -> None:
    """A frozen teacher loaded in bfloat16 beside a float32 policy (full fine-tuning upcasts only the trainable one):
    its states meet its own head."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).requires_grad_(False)
    short, long = _rows([[5, 6, 7]], [[8, 9]]), _rows([[5, 6, 7, 10, 11, 12]], [[8, 9]])
    hidden, _ = teacher_states(teacher, teacher.lm_head, *short)
    sums = chunked_divergence(
        student, student.lm_head, long[0], long[2], hidden, teacher.lm_head, token_divergence("forward_kl"), chunk_size=4
    )
    assert sums.tokens.item() == 2 and torch.isfinite(sums.divergence) and sums.divergence.item() >= 0
