"""LongPO data by self-instruct over a long corpus (LongPO, arXiv 2502.13922), no annotation.

For each document within the token window: paragraph-boundary chunks within a token range; per chunk
the model writes an instruction pool and one instruction is picked at random; the model answers it
from the chunk (chosen) and from the whole document (rejected); filters drop empty, refusing,
repetitive and near-empty answers; the surviving turns of a document form one multi-turn record.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError, RecordError
from ..text.jsonl import read_inputs
from .output import ResumableWriter, merge_dataset_info, record_seed, summarize

SELF_INSTRUCT_PROMPT = (
    "Read the text above and write {n} diverse questions or instructions that can be answered from it "
    "alone. Write one per line, numbered 1. to {n}."
)
REFUSALS = (
    "i can't assist",
    "i cannot assist",
    "as an ai",
    "i'm sorry",
    "i am sorry",
    "i cannot help",
    "i can't help",
    "i'm unable",
    "i am unable",
    "cannot provide",
    "can't provide",
)
_NUMBERED = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s*(.+?)\s*$")
_WORD = re.compile(r"[A-Za-z]{2,}")


@dataclass
class LongPOBuildConfig:
    input: str
    output: str
    model: dict[str, Any]
    min_doc_tokens: int = 65536
    max_doc_tokens: int = 131072
    chunk_min_tokens: int = 16384
    chunk_max_tokens: int = 32768
    max_turns: int = 4
    pool_size: int = 4
    instruct_temperature: float = 0.7
    instruct_top_p: float = 0.9
    answer_temperature: float = 0.0  # paper: greedy (public code: 1.0)
    max_new_tokens: int = 1024
    seed: int = 42
    max_records: Optional[int] = None
    strict: bool = False
    joiner: str = "\n\n"
    dataset_name: str = "longpo_selfinstruct"
    dataset_info: Optional[str] = None


def parse_instructions(text: str) -> list[str]:
    """Numbered or bulleted lines of a self-instruct answer."""
    found = [m.group(1) for line in text.splitlines() if (m := _NUMBERED.match(line))]
    return [q for q in found if len(_WORD.findall(q)) >= 3]


def reject_reason(answer: str, repeat_threshold: float) -> Optional[str]:
    """Why an answer is filtered out (``None`` if it is kept)."""
    text = answer.strip()
    if not text:
        return "empty"
    low = text.lower()
    if any(phrase in low for phrase in REFUSALS):
        return "refusal"
    words = _WORD.findall(low)
    if len(words) < 2:
        return "too_short"
    repeated = 1 - len(set(words)) / len(words)
    if len(words) >= 8 and repeated > repeat_threshold:
        return "repetitive"
    return None


def chunk_document(tokenizer: Any, text: str, low: int, high: int) -> list[str]:
    """Consecutive paragraph groups of ``low..high`` tokens (a paragraph longer than ``high`` stands alone)."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    chunks, current, size = [], [], 0
    for p in paragraphs:
        n = len(tokenizer.encode(p, add_special_tokens=False))
        if current and size + n > high:
            if size >= low:
                chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(p)
        size += n
    if current and size >= low:
        chunks.append("\n\n".join(current))
    return chunks


def read_corpus(path: str, strict: bool, log: Any = print) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """``(key, text)`` of every usable document; bad lines are reported with their number and counted."""

    def parse(line: str, lineno: int) -> tuple[str, str]:
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}: line {lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("text"), str) or not raw["text"].strip():
            raise RecordError(f"{path}: line {lineno}: field 'text' is missing or empty")
        return str(raw.get("id", f"line{lineno}")), raw["text"]

    return read_inputs(path, parse, strict=strict, log=log, tag="build longpo")


# instruction pools for a document's chunks, one list of instructions per chunk (empty: none for that chunk)
InstructionSource = Callable[[list[str]], list[list[str]]]


def build_longpo(
    config: LongPOBuildConfig, generator: Any = None, log: Any = print, instructions: Optional[InstructionSource] = None
) -> dict[str, Any]:
    """Build LongPO records from a corpus with the model itself (LongPO, arXiv 2502.13922).

    ``instructions`` replaces the self-instruct step only: where a task already has its questions (an
    experiment over a synthetic task, a curated pool), they are the chunks' pools, and one of them is still
    picked at random per chunk. Every answer, chosen (on the chunk) and rejected (on the whole document),
    remains the model's own. The random draws are the same either way, so records differ only by the pools.
    """
    from tqdm import tqdm

    docs, skipped = read_corpus(config.input, config.strict, log)
    if generator is None:
        from ..text.generate import Generator

        generator = Generator(config.model)
    tok = generator.tokenizer
    writer = ResumableWriter(config.output)
    made = 0
    try:
        for key, text in tqdm(docs, desc="LongPO documents", unit="doc", file=sys.stderr):
            if config.max_records is not None and made >= config.max_records:
                break
            if writer.is_done(key):
                made += writer.done[key] == "kept"
                continue
            rng = random.Random(record_seed(config.seed, key))
            n_tokens = len(tok.encode(text, add_special_tokens=False))
            if not config.min_doc_tokens <= n_tokens <= config.max_doc_tokens:
                writer.drop(key, "outside_token_window")
                continue
            chunks = chunk_document(tok, text, config.chunk_min_tokens, config.chunk_max_tokens)
            if not chunks:
                writer.drop(key, "no_chunk")
                continue
            chunks = rng.sample(chunks, min(config.max_turns, len(chunks)))
            pool_seeds = [rng.randrange(2**31) for _ in chunks]
            if instructions is not None:
                pools = instructions(chunks)
                if len(pools) != len(chunks):
                    raise ConfigError(f"instructions: {len(pools)} pools returned for {len(chunks)} chunks; one list per chunk")
            else:
                prompt = SELF_INSTRUCT_PROMPT.format(n=config.pool_size)
                written = generator.generate(
                    [([{"role": "user", "content": f"{c}{config.joiner}{prompt}"}], None) for c in chunks],
                    seeds=pool_seeds,
                    temperature=config.instruct_temperature,
                    top_p=config.instruct_top_p,
                    max_new_tokens=config.max_new_tokens,
                )
                pools = [parse_instructions(w[0]) for w in written]
            picked = [(c, rng.choice(qs)) for c, qs in zip(chunks, pools) if qs]
            if not picked:
                writer.drop(key, "no_instruction_pool")
                continue
            ask = lambda ctx, q: ([{"role": "user", "content": f"{ctx}{config.joiner}{q}"}], None)  # noqa: E731
            answers = generator.generate(
                [ask(c, q) for c, q in picked] + [ask(text, q) for _, q in picked],
                seeds=[rng.randrange(2**31) for _ in range(2 * len(picked))],
                temperature=config.answer_temperature,
                max_new_tokens=config.max_new_tokens,
            )
            turns, reasons = [], []
            for i, (chunk, question) in enumerate(picked):
                chosen, rejected = answers[i][0], answers[len(picked) + i][0]
                why = reject_reason(chosen, 0.9) or reject_reason(rejected, 0.95)
                if why:
                    reasons.append(why)
                    continue
                turns.append({"short_context": chunk, "instruction": question, "chosen": chosen, "rejected": rejected})
            counts = {f"turn_{r}": reasons.count(r) for r in sorted(set(reasons))}
            if not turns:
                writer.drop(key, reasons[0] if reasons else "filtered", {"filtered": counts})
                continue
            same = sum(t["chosen"].strip() == t["rejected"].strip() for t in turns)
            stats: dict[str, Any] = {"long_tokens": n_tokens, "turns": len(turns), "same_answer_turns": same}
            if counts:
                stats["filtered"] = counts
            writer.keep(key, {"long_context": text, "turns": turns}, stats)
            made += 1
    finally:
        writer.close()
    if config.dataset_info:
        merge_dataset_info(config.dataset_info, config.dataset_name, config.output)
    summary = summarize(writer, {"skipped_input": skipped})
    log(f"[build longpo] {json.dumps(summary)}")
    same = summary["lengths"].get("same_answer_turns", {}).get("total", 0)  # this run's records and resumed ones
    if same:
        # LongPO's preference term compares the two answers: identical ones leave only its NLL term to train on them
        log(
            f"[build longpo] {same} of {summary['lengths']['turns']['total']} turns: the answer from the whole "
            "document equals the one from the chunk (chosen = rejected), so only the NLL term learns from them"
        )
    return summary
