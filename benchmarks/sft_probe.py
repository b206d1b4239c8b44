"""What the replication's SFT start learns, and when: a fast probe of the task model
(the start-model check).

``replicate_small.py`` trains its SFT start through ``llamafactory-cli train``; this probe trains the same
model (same tokenizer, same Qwen2 shape, same SFT mix from ``kv_hops``) in a plain torch loop, so a
setting can be tried in minutes, and every ``--every`` steps it prints what matters for the diagnosis:

- greedy accuracy on 100 held-out short questions (the replication's scoring: sub-EM of ``Final answer:``);
- the teacher-forced loss of the two-hop answer's names (50 held-out questions), by role. The answer is
  ``Pair A B. Pair B C. Final answer: C``: the two LOOKUPS are the first B and the first C (the value of a
  key among the context's facts); the COPIES are A, the second B and the last C (a name already in the
  question or the answer). Reference points: ln(48) = 3.87 (any name), ln(4) = 1.39 (any of the 4 values of
  a short context's facts).
- greedy accuracy by context length (1x, 2x, 4x, 8x; ``--eval-items`` questions, paragraph-level haystacks)
  of the two-hop question and of a single-hop one ("What is the key of X?"): whether the start reads long
  inputs (single-hop) and reasons worse over them (two-hop), the start-model check in minutes.

  .venv/bin/python benchmarks/sft_probe.py                          # the replication's own SFT settings
  .venv/bin/python benchmarks/sft_probe.py --previous-token 0 --mimetic 0   # without induction_init
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from replicate_small import FULL, Settings, make_task_model, sft_example  # this script's folder is on sys.path

from llamafactory_longpo.eval import kv_hops as kv
from llamafactory_longpo.text.scoring import extract_final_answer, sub_em


def encode(tokenizer: Any, context: str, question: str, answer: str | None = None) -> Any:
    """Chat-template ids of a prompt (and the answer's labels when given), as the toolkit's SFT sees them."""
    messages = [{"role": "system", "content": kv.SYSTEM}, {"role": "user", "content": f"{context}\n\n{question}"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return ids
    target = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return ids + target, [-100] * len(ids) + target


def sft_batch(tokenizer: Any, rng: random.Random, s: Settings) -> tuple[torch.Tensor, ...]:
    """One batch of the replication's SFT mix (``replicate_small.sft_example``)."""
    rows = [encode(tokenizer, *sft_example(s, rng)) for _ in range(s.sft_batch)]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r, _ in rows])[:, None]).long()
    return ids, labels, mask


def name_roles(tokenizer: Any, item: kv.Item) -> dict[int, str]:
    """Index (within the answer's tokens) -> role of each name in the answer: ``copy`` or ``hop k`` (the k-th lookup)."""
    tokens = tokenizer(item.response, add_special_tokens=False)["input_ids"]
    seen: set[str] = set()
    roles = {}
    for index, token in enumerate(tokens):
        name = tokenizer.decode([token]).strip()
        if name in item.chain:
            hop = item.chain.index(name)
            roles[index] = f"hop {hop}" if hop > 0 and name not in seen else "copy"
            seen.add(name)
    return roles


@torch.no_grad()
def greedy_correct(model: Any, tokenizer: Any, prompts: list[tuple[str, str]], answers: list[str], new: int = 24) -> float:
    """Greedy accuracy (sub-EM of ``Final answer:``) on (context, question) prompts, 25 at a time, left-padded."""
    correct = 0
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), 25):
        ids_list = [encode(tokenizer, c, q) for c, q in prompts[start : start + 25]]
        width = max(map(len, ids_list))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids_list])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids_list])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
        for gold, row in zip(answers[start : start + 25], out[:, width:]):
            correct += sub_em(extract_final_answer(tokenizer.decode(row, skip_special_tokens=True)), [gold])
    return correct / len(prompts)


@torch.no_grad()
def probe_lengths(model: Any, tokenizer: Any, items: list[kv.Item], mults: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """Greedy accuracy by context length (paragraph-level haystacks, ``kv.long_context``) of the two-hop
    question and of a single-hop one ("What is the key of X?", X a random key of the context)."""
    model.eval()
    out: dict[str, dict[int, float]] = {"single": {}, "two-hop": {}}
    for mult in mults:
        rng = random.Random(mult)
        contexts = [it.short_context if mult == 1 else kv.long_context(it, mult, rng) for it in items]
        out["two-hop"][mult] = greedy_correct(
            model, tokenizer, [(c, it.question) for c, it in zip(contexts, items)], [it.answer for it in items]
        )
        picks = [rng.choice(kv.context_facts(c)) for c in contexts]
        out["single"][mult] = greedy_correct(
            model, tokenizer, [(c, kv.single_question(k)) for c, (k, _) in zip(contexts, picks)], [v for _, v in picks], 12
        )
    model.train()
    return out


@torch.no_grad()
def probe(model: Any, tokenizer: Any, items: list[kv.Item]) -> tuple[float, dict[str, float]]:
    """Greedy accuracy on ``items`` and the mean teacher-forced loss of the answer's names by role."""
    model.eval()
    correct = 0
    pad = tokenizer.pad_token_id
    for start in range(0, len(items), 25):
        chunk = items[start : start + 25]
        prompts = [encode(tokenizer, it.short_context, it.question) for it in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded for generation
        mask = (ids != pad).long()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=pad)
        for it, row in zip(chunk, out[:, width:]):
            prediction = extract_final_answer(tokenizer.decode(row, skip_special_tokens=True))
            correct += sub_em(prediction, [it.answer])  # the replication's own scoring
    by_role: dict[str, list[float]] = {}
    for it in items[:50]:
        ids, labels = encode(tokenizer, it.short_context, it.question, it.response)
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        targets = torch.tensor(labels[1:])
        scored = targets != -100
        losses = torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="none").tolist()
        for index, role in name_roles(tokenizer, it).items():
            by_role.setdefault(role, []).append(losses[index])
    model.train()
    return correct / len(items), {role: sum(v) / len(v) for role, v in sorted(by_role.items())}


def main(argv: list[str] | None = None) -> int:
    # defaults: the replication's own SFT settings (replicate_small.FULL)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=FULL.layers)
    parser.add_argument("--hidden", type=int, default=FULL.hidden)
    parser.add_argument("--heads", type=int, default=FULL.heads)
    parser.add_argument("--kv-heads", type=int, default=FULL.kv_heads)
    parser.add_argument("--intermediate", type=int, default=FULL.intermediate, help="MLP width (0: 4 x hidden)")
    parser.add_argument("--mimetic", type=float, default=FULL.mimetic_init, help="induction_init's mimetic scale (0: off)")
    parser.add_argument(
        "--previous-token", type=float, default=FULL.previous_token_init, help="induction_init's previous-token margin (0: off)"
    )
    parser.add_argument("--lr", type=float, default=FULL.sft_lr)
    parser.add_argument("--steps", type=int, default=FULL.sft_steps, help="cosine schedule length (and the step budget)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batch", type=int, default=FULL.sft_batch)
    parser.add_argument("--hops", type=int, default=FULL.hops, choices=sorted(kv.HOP_WORDS))
    parser.add_argument("--facts", type=int, default=FULL.facts_per_paragraph, help="facts per paragraph (two paragraphs)")
    parser.add_argument("--min-facts", type=int, default=FULL.sft_min_facts, help="SFT paragraphs have min-facts..facts facts")
    parser.add_argument("--recall-share", type=float, default=FULL.recall_share)
    parser.add_argument("--recall-keys", type=int, default=FULL.recall_keys, help="recall questions ask for 1..N keys")
    parser.add_argument("--recall-max-mult", type=int, default=FULL.recall_max_mult, help="recall contexts up to Nx short")
    parser.add_argument("--eval-items", type=int, default=100, help="held-out questions per length (by-length line)")
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=FULL.seed)
    a = parser.parse_args(argv)
    s = dataclasses.replace(
        FULL,
        layers=a.layers,
        hidden=a.hidden,
        heads=a.heads,
        kv_heads=a.kv_heads,
        intermediate=a.intermediate,
        mimetic_init=a.mimetic,
        previous_token_init=a.previous_token,
        sft_lr=a.lr,
        sft_steps=a.steps,
        sft_batch=a.batch,
        hops=a.hops,
        facts_per_paragraph=a.facts,
        sft_min_facts=a.min_facts,
        recall_share=a.recall_share,
        recall_keys=a.recall_keys,
        recall_max_mult=a.recall_max_mult,
        seed=a.seed,
    )
    torch.set_num_threads(1)
    torch.manual_seed(s.seed)

    from transformers import AutoTokenizer, Qwen2ForCausalLM

    with tempfile.TemporaryDirectory() as tmp:  # the replication's own model builder and tokenizer corpus
        make_task_model(Path(tmp), s)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        model = Qwen2ForCausalLM.from_pretrained(tmp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.sft_lr, weight_decay=0.0)
    held_out = kv.make_items("probe", 100, 12345, hops=s.hops, facts_per_paragraph=s.facts_per_paragraph)
    mults = (1, 2, 4, 8)
    by_length = kv.make_items(
        "len", a.eval_items, 54321, hops=s.hops, facts_per_paragraph=s.facts_per_paragraph, other_paragraphs=2 * (max(mults) - 1)
    )
    rng = random.Random(s.seed + 1)
    start, recent = time.perf_counter(), []
    print(f"[probe] {vars(a)}", flush=True)
    for step in range(1, s.sft_steps + 1):
        scale = min(1.0, step / a.warmup) * 0.5 * (1 + math.cos(math.pi * (step - 1) / s.sft_steps))
        for group in optimizer.param_groups:
            group["lr"] = s.sft_lr * scale
        ids, labels, mask = sft_batch(tokenizer, rng, s)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        recent = (recent + [loss.item()])[-50:]
        if step % a.every == 0 or step == s.sft_steps:
            accuracy, roles = probe(model, tokenizer, held_out)
            print(
                f"[probe] step {step} ({time.perf_counter() - start:.0f} s): train loss {sum(recent) / len(recent):.3f}, "
                f"short accuracy {accuracy:.0%}, name loss: "
                + ", ".join(f"lookup {role} {loss:.2f}" for role, loss in roles.items() if role != "copy")
                + f", copy {roles['copy']:.2f}",
                flush=True,
            )
            if a.eval_items:
                acc = probe_lengths(model, tokenizer, by_length, mults)
                print(
                    f"[probe] step {step} by length ({a.eval_items} questions, 1x/2x/4x/8x): "
                    + "; ".join(f"{task} " + "/".join(f"{100 * v:.0f}" for v in accs.values()) for task, accs in acc.items()),
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
