"""Generation through LLaMA-Factory's own inference engines (``infer_backend``: huggingface, vllm, sglang).

The engine is configured with the same keys as ``llamafactory-cli chat`` YAML (``model_name_or_path``,
``template``, ``infer_backend``, ``vllm_*``...). With the huggingface backend every request is seeded,
so a build is reproducible (and a resumed build equals an uninterrupted one); vLLM/SGLang batch the
requests of a round concurrently.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

Messages = list[dict[str, str]]


class Generator:
    def __init__(self, engine_args: dict[str, Any]) -> None:
        from llamafactory.chat import ChatModel

        self.args = dict(engine_args)
        self.chat_model = ChatModel(self.args)
        self.backend = str(self.args.get("infer_backend", "huggingface"))
        self.tokenizer = self.chat_model.engine.tokenizer

    def generate(
        self,
        requests: list[tuple[Messages, Optional[str]]],
        *,
        seeds: Optional[list[int]] = None,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 512,
    ) -> list[list[str]]:
        """``n`` responses for each ``(messages, system)`` request (greedy when ``temperature == 0``)."""
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "num_return_sequences": n}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=0.0)
        if self.backend == "huggingface":
            import torch

            out = []
            for i, (messages, system) in enumerate(requests):
                if seeds is not None:
                    torch.manual_seed(seeds[i])
                out.append([r.response_text for r in self.chat_model.chat(messages, system, **kwargs)])
            return out
        loop = self.chat_model._loop  # the engine's own event loop thread: requests run concurrently
        futures = [asyncio.run_coroutine_threadsafe(self.chat_model.achat(m, s, **kwargs), loop) for m, s in requests]
        return [[r.response_text for r in f.result()] for f in futures]
