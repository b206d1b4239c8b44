"""An offline tiny Qwen2-architecture model with a locally trained tokenizer (nothing downloaded).

Used by the demo, the tests and the benchmarks. The tokenizer is a byte-level BPE trained on the demo
world's text (so any text encodes), with Qwen's special tokens and a Qwen-style chat template, so
LLaMA-Factory's ``template: qwen`` adds nothing to it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(texts: Sequence[str], vocab_size: int = 2048):  # -> PreTrainedTokenizerFast
    """Byte-level BPE over ``texts`` (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=1_000_000,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    out_dir: str,
    *,
    vocab_size: Optional[int] = None,
    tokenizer_vocab: int = 2048,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 32768,
    seed: int = 0,
    texts: Optional[Sequence[str]] = None,
    init: Optional[Callable[[Any], None]] = None,
) -> str:
    """Write a random-weight Qwen2 model and its tokenizer to ``out_dir``; returns ``out_dir``.

    ``vocab_size`` (default: the tokenizer's size rounded up to 64) may exceed the tokenizer, to give
    the LM head a realistic width (e.g. 32K) for benchmarks. ``init`` changes the random weights in place
    before they are written (a benchmark's own initialisation).
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from . import demo

    tokenizer = train_tokenizer(texts if texts is not None else demo.corpus(seed), tokenizer_vocab)
    n_tok = len(tokenizer)
    vocab = max(vocab_size or 0, (n_tok + 63) // 64 * 64)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    if init is not None:
        init(model)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as fh:
        json.dump({"eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id, "do_sample": False}, fh)
    return out_dir
