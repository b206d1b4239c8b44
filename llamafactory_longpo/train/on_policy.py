"""On-policy samples of stage ``s2ld`` (``s2ld_on_policy: true``): the policy answers the LONG prompts itself.

The student samples responses to the long prompts with Hugging Face ``generate`` (sampling at ``s2ld_temperature``,
``s2ld_samples`` per prompt, at most ``s2ld_max_new_tokens``); each sample is appended to its sample's long AND short
prompt, so the teacher scores the student's own tokens on the short input (on-policy distillation, GKD arXiv
2306.13649; from the short-context view, OPSDL arXiv 2604.17535). Sampling runs every ``s2ld_sample_every``
optimizer steps; the steps between reuse the last step's samples, micro-batch by micro-batch (as GRPO's
``num_iterations`` reuses a generation batch), and the batches the data loader hands them are not read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .logps import IGNORE_INDEX

Rows = dict[str, torch.Tensor]


def prompts(input_ids: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Each right-padded row's prompt: its tokens before the first label (single-turn rows: the response's start)."""
    starts = (labels != IGNORE_INDEX).int().argmax(dim=1)
    return [row[:start] for row, start in zip(input_ids, starts.tolist())]


def until_stop(tokens: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """A generated row up to and including its first stop token (all of it when it has none)."""
    stops = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device)).nonzero()
    return tokens if stops.numel() == 0 else tokens[: int(stops[0]) + 1]


def right_padded(rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int, prefix: str) -> Rows:
    """``input_ids``/``attention_mask``/``labels`` of (prompt, response) rows, right-padded, labels on the response."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        length = len(prompt) + len(response)
        ids[i, :length] = torch.cat([prompt.cpu(), response.cpu()])
        labels[i, len(prompt) : length] = response.cpu()
        mask[i, :length] = 1
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}labels": labels}


@dataclass
class OnPolicySampler:
    """Samples the student's responses and keeps the last optimizer step's for reuse."""

    samples: int
    max_new_tokens: int
    temperature: float
    every: int
    stop_ids: list[int]
    pad_id: int
    _buffer: list[Rows] = field(default_factory=list)
    _step: int = -1
    _micro: int = 0
    _fresh: bool = True

    @classmethod
    def from_args(cls, finetuning_args: Any, tokenizer: Any, template: Any) -> OnPolicySampler:
        fa = finetuning_args
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stop_ids = template.get_stop_token_ids(tokenizer)
        return cls(fa.s2ld_samples, fa.s2ld_max_new_tokens, fa.s2ld_temperature, fa.s2ld_sample_every, stop_ids, pad)

    def rows(self, model: torch.nn.Module, batch: Rows, step: int) -> Rows:
        """The rows this micro-batch trains on at optimizer step ``step``: fresh samples of ``batch``'s prompts on a
        sampling step (or when nothing is kept, as after a resume), else the kept ones in turn."""
        if step != self._step:
            self._step, self._micro = step, 0
            self._fresh = step % self.every == 0 or not self._buffer
            if self._fresh:
                self._buffer = []
        if self._fresh:
            self._buffer.append(self.sample(model, batch))
            out = self._buffer[-1]
        else:
            out = self._buffer[self._micro % len(self._buffer)]
        self._micro += 1
        return out

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, batch: Rows) -> Rows:
        """``samples`` responses per sample of ``batch`` (its ``long_*`` rows prompt the model, its short rows give the
        teacher's prompts); the short rows come first, as the collator lays them out."""
        device = batch["input_ids"].device
        long_prompts = prompts(batch["long_input_ids"], batch["long_labels"])
        short_prompts = prompts(batch["input_ids"], batch["labels"])
        width = max(len(p) for p in long_prompts)
        ids = torch.full((len(long_prompts), width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(long_prompts):  # left-padded for generation
            ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=self.temperature,
                top_p=1.0,
                top_k=0,
                max_new_tokens=self.max_new_tokens,
                num_return_sequences=self.samples,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                use_cache=True,
            )
        finally:
            model.train(was_training)
        responses = [until_stop(row[width:], self.stop_ids) for row in out]
        owner = [j // self.samples for j in range(len(responses))]
        rows = right_padded([(short_prompts[i], r) for i, r in zip(owner, responses)], self.pad_id, "")
        rows.update(right_padded([(long_prompts[i], r) for i, r in zip(owner, responses)], self.pad_id, "long_"))
        return {k: v.to(device) for k, v in rows.items()}
