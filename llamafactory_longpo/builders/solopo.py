"""SoLoPO data from MuSiQue (SoLoPO, arXiv 2505.11166): short evidence, a RULER-style long haystack, and
self-generated chain-of-thought answers split into chosen (correct) and rejected (incorrect).

Input: MuSiQue JSONL with the official fields (``id, paragraphs[{idx, title, paragraph_text,
is_supporting}], question, answer, answer_aliases, answerable``). Output: short-to-long records.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import ConfigError
from ..text.haystack import build_haystack
from ..text.musique import read_musique
from ..text.scoring import extract_final_answer, sub_em
from .output import ResumableWriter, merge_dataset_info, record_seed, summarize

COT_PROMPT = (
    "Answer the question using the passages above. Think step by step, then give the answer on a last "
    "line that starts with 'Final answer:'.\n\nQuestion: {question}"
)


@dataclass
class SoLoPOBuildConfig:
    input: str
    output: str
    model: dict[str, Any]
    target_tokens: int = 8192
    num_samples: int = 32
    temperature: float = 0.85
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 42
    max_records: Optional[int] = None
    strict: bool = False
    prompt: str = COT_PROMPT
    joiner: str = "\n\n"
    dataset_name: str = "solopo_musique"
    dataset_info: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_solopo(config: SoLoPOBuildConfig, generator: Any = None, log: Any = print) -> dict[str, Any]:
    """Build (or resume) the output; returns the summary. ``generator`` defaults to the toolkit engine."""
    from tqdm import tqdm

    items, skipped = read_musique(config.input, config.strict, log)
    if config.max_records is not None:
        items = items[: config.max_records]
    if generator is None:
        from ..text.generate import Generator

        generator = Generator(config.model)
    tokenizer = generator.tokenizer
    # every check before any generation: evidence must fit the target length
    for item in items:
        need = len(tokenizer.encode("\n\n".join(item.supporting), add_special_tokens=False))
        if need > config.target_tokens:
            raise ConfigError(
                f"target_tokens: {config.target_tokens} is shorter than the evidence of record {item.key} ({need} tokens)"
            )
    pool = [(item.key, p) for item in items for p in item.others]

    writer = ResumableWriter(config.output)
    try:
        todo = [item for item in items if not writer.is_done(item.key)]
        for item in tqdm(todo, desc="SoLoPO records", unit="rec", file=sys.stderr):
            rng = random.Random(record_seed(config.seed, item.key))
            own = item.others[:]
            rng.shuffle(own)
            foreign = [p for key, p in pool if key != item.key]
            rng.shuffle(foreign)
            hay = build_haystack(tokenizer, item.supporting, own + foreign, config.target_tokens, seed=rng.randrange(2**31))
            short = "\n\n".join(item.supporting)
            instruction = config.prompt.format(question=item.question)
            messages = [{"role": "user", "content": f"{short}{config.joiner}{instruction}"}]
            samples = generator.generate(
                [(messages, None)],
                seeds=[rng.randrange(2**31)],
                n=config.num_samples,
                temperature=config.temperature,
                top_p=config.top_p,
                max_new_tokens=config.max_new_tokens,
            )[0]
            correct = [s for s in samples if sub_em(extract_final_answer(s), item.answers)]
            wrong = [s for s in samples if s.strip() and not sub_em(extract_final_answer(s), item.answers)]
            if not correct or not wrong:
                writer.drop(item.key, "no_correct" if not correct else "no_incorrect")
                continue
            record = {
                "long_context": hay.text,
                "turns": [
                    {
                        "short_context": short,
                        "instruction": instruction,
                        "chosen": rng.choice(correct),
                        "rejected": rng.choice(wrong),
                    }
                ],
            }
            short_tokens = len(tokenizer.encode(short, add_special_tokens=False))
            writer.keep(item.key, record, {"long_tokens": hay.tokens, "short_tokens": short_tokens})
    finally:
        writer.close()
    if config.dataset_info:
        merge_dataset_info(config.dataset_info, config.dataset_name, config.output)
    summary = summarize(writer, {"skipped_input": skipped})
    log(f"[build solopo] {json.dumps(summary)}")
    return summary
