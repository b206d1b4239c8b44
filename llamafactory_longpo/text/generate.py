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

        from ..checks import check_model_folder

        check_model_folder(str(engine_args.get("model_name_or_path", "")))
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

    def greedy(
        self, requests: list[tuple[Messages, Optional[str]]], *, max_new_tokens: int = 512, batch_size: int = 32
    ) -> list[str]:
        """One greedy response per request, ``batch_size`` requests per forward pass (huggingface backend).

        Why: the engine's ``chat`` answers one request at a time, which makes an evaluation of thousands of
        short questions on a CPU take many minutes. This path keeps everything the engine would use (its
        loaded model, its template's prompt encoding and stop tokens, the pad token) and only left-pads
        several prompts into one ``generate`` call. Other backends batch on their own: they go through
        :meth:`generate`."""
        if self.backend != "huggingface":
            return [out[0] for out in self.generate(requests, max_new_tokens=max_new_tokens)]
        import torch

        engine = self.chat_model.engine
        model, tokenizer, template = engine.model, engine.tokenizer, engine.template
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        prompts = [
            template.encode_oneturn(tokenizer, messages + [{"role": "assistant", "content": ""}], system)[0]
            for messages, system in requests
        ]
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
            with torch.no_grad():
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=template.get_stop_token_ids(tokenizer),
                    pad_token_id=pad,
                )
            out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        return out
