"""Task and model variants for the SFT probe: the start-model designs tried for issue 15 that ``kv_hops`` does
not offer, so each tried design can be run again with one command.

``sft_probe.py`` trains the replication's task model on the replication's SFT mix. This script changes one or
more pieces of that set-up, then runs the probe with the remaining arguments, unchanged:

- ``--fact-form pair``: facts read "Pair Bako Rilu." (the value right after the key) instead of "The key of
  Bako is Rilu." (two tokens between them), in contexts, answers and questions' answers alike;
- ``--others filler|relations|relations-disjoint``: a long context hides the evidence among one-sentence filler
  paragraphs (needle-free prose, as in passkey retrieval) or among facts of other relations ("The lock of
  Bako is Rilu.", keys any name or only names not in the item's chain), instead of among more "key" facts;
- ``--names N``: N made-up names instead of 160;
- ``--shuffle-evidence``: the two evidence paragraphs in random order (by default the second hop's fact is
  always in the second paragraph, a position the model can learn instead of the lookup);
- ``--repeat SHARE`` / ``--drill SHARE``: that share of the SFT mix restates every fact of a context, in the
  context's order ("Repeat the facts.") or shuffled ("Quote every key.": one lookup per fact);
- ``--previous-token MARGIN``: layer 0's first head group attends to the previous token at initialisation (with
  ``--mimetic``, the two halves of an induction head; see :func:`use_previous_token_init`);
- ``--mimetic SCALE``: mimetic initialisation of attention (Trockman and Kolter, "Mimetic Initialization of
  Self-Attention Layers", ICML 2023): each key/value head's key weights are its first query head's, scaled,
  and that head's output weights are its value weights transposed, so at initialisation the head attends to
  tokens like the query and copies what it attends to.

  .venv/bin/python benchmarks/sft_probe_variants.py --others filler --names 48 --steps 3000 --every 1000

The variants replace ``kv_hops`` functions in this process only (``make_item``, ``fact``, ``context_facts``;
``sft_probe`` and ``replicate_small`` look them up at call time), and wrap the model loader for ``--mimetic`` and ``--previous-token``.
"""

from __future__ import annotations

import argparse
import random
import sys
from typing import Any

from llamafactory_longpo.eval import kv_hops as kv
from llamafactory_longpo.text.world import FILLER

RELATIONS = ("lock", "door", "gate", "box", "code")


def use_pair_facts() -> None:
    """Facts "Pair Bako Rilu.": the value is the token right after the key."""

    def fact(key: str, value: str) -> str:
        return f"Pair {key} {value}."

    def context_facts(context: str) -> list[tuple[str, str]]:
        sentences = [f for p in context.split("\n\n") for f in p.split(". ") if f]
        return [tuple(f.rstrip(".").removeprefix("Pair ").split(" ")) for f in sentences if f.startswith("Pair ")]  # type: ignore[misc]

    kv.fact, kv.context_facts = fact, context_facts


def use_items(others: str, names: int, shuffle_evidence: bool, pair_facts: bool) -> None:
    """Items over ``names`` names whose long-context paragraphs are ``others`` ("facts": unchanged)."""
    kv.NAMES = kv.make_names(names)
    make_item = kv.make_item

    def item(key: str, rng: random.Random, *, other_paragraphs: int = 0, **kwargs: Any) -> kv.Item:
        kwargs["names"] = kv.NAMES
        it = make_item(key, rng, other_paragraphs=other_paragraphs if others == "facts" else 0, **kwargs)
        if shuffle_evidence:
            rng.shuffle(it.supporting)
        if others != "facts":
            per = kwargs.get("facts_per_paragraph", 6)
            if others == "filler":
                it.others = [rng.choice(FILLER) for _ in range(other_paragraphs)]
            else:
                pool = kv.NAMES if others == "relations" else [n for n in kv.NAMES if n not in it.chain]
                it.others = [
                    " ".join(f"The {rng.choice(RELATIONS)} of {rng.choice(pool)} is {rng.choice(kv.NAMES)}." for _ in range(per))
                    for _ in range(other_paragraphs)
                ]
        return it

    kv.make_item = item
    if others != "facts" and not pair_facts:  # the "key" facts of a context only (pair facts are parsed as such)
        parse = kv.context_facts
        kv.context_facts = lambda context: parse("\n\n".join(p for p in context.split("\n\n") if p.startswith("The key of ")))


def use_restatements(sft_probe: Any, share: float, shuffled: bool) -> None:
    """``share`` of the SFT examples restate every fact of a context: in order, over contexts of 1x or 2x with
    the task's paragraphs; or shuffled, over contexts of 1x-8x whose evidence paragraphs hold 2-4 facts each."""
    base = sft_probe.sft_example

    def sft_example(s: Any, rng: random.Random, key: str = "sft") -> tuple[str, str, str]:
        if rng.random() >= share:
            return base(s, rng, key)
        mult = rng.choice((1, 2, 4, 8) if shuffled else (1, 2))
        per = rng.randint(2, 4) if shuffled else s.facts_per_paragraph
        it = kv.make_item(key, rng, hops=2, facts_per_paragraph=per, other_paragraphs=2 * (mult - 1))
        context = it.short_context if mult == 1 else kv.long_context(it, mult, rng)
        pairs = kv.context_facts(context)
        if shuffled:
            rng.shuffle(pairs)
        question = "Quote every key." if shuffled else "Repeat the facts."
        return context, question, " ".join(kv.fact(k, v) for k, v in pairs)

    sft_probe.sft_example = sft_example


def use_mimetic_init(scale: float) -> None:
    """Wrap the model loader: mimetic attention initialisation of every layer (see the module docstring)."""
    import torch
    from transformers import Qwen2ForCausalLM

    load = Qwen2ForCausalLM.from_pretrained.__func__

    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        model = load(cls, *args, **kwargs)
        config = model.config
        dim = config.hidden_size // config.num_attention_heads
        group = config.num_attention_heads // config.num_key_value_heads
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                for kv_head in range(config.num_key_value_heads):
                    q = slice(kv_head * group * dim, (kv_head * group + 1) * dim)
                    k = slice(kv_head * dim, (kv_head + 1) * dim)
                    attn.q_proj.weight[q] *= scale
                    attn.k_proj.weight[k] = attn.q_proj.weight[q]
                    attn.v_proj.weight[k] *= scale
                    attn.o_proj.weight[:, q] = attn.v_proj.weight[k].T
        return model

    Qwen2ForCausalLM.from_pretrained = classmethod(from_pretrained)


def use_previous_token_init(margin: float) -> None:
    """Wrap the model loader: layer 0's first key/value head (and its query heads) attends to the previous token
    at initialisation, and its output writes the value it reads back into the residual stream. With the second
    layer's heads matching like tokens (``--mimetic``), this is the induction circuit of Olsson et al. ("In-context
    Learning and Induction Heads", 2022) laid out at initialisation: at the answer's key, a head finds the
    context's token preceded by the same name and copies it, the lookup of a pair fact "Pair Bako Rilu.".

    The query and key are constant (weights zero, biases set), so the score depends only on the distance: for
    rotary pair f with frequency t_f, the query is a*(cos t_f, -sin t_f) and the key (a, 0), which scores
    a**2 * cos((distance - 1) * t_f), highest at distance 1 for every f; ``a`` is chosen so the previous token
    beats every other distance up to 8,192 by ``margin`` (in logits)."""
    import torch
    from transformers import Qwen2ForCausalLM

    load = Qwen2ForCausalLM.from_pretrained.__func__

    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        model = load(cls, *args, **kwargs)
        config = model.config
        dim = config.hidden_size // config.num_attention_heads
        group = config.num_attention_heads // config.num_key_value_heads
        freqs = model.model.rotary_emb.inv_freq.double()
        distance = torch.arange(0, config.max_position_embeddings, dtype=torch.float64)
        score = torch.cos((distance[:, None] - 1) * freqs[None]).sum(-1) / dim**0.5
        gap = float(score[1] - torch.cat([score[:1], score[2:]]).max())
        a = (margin / gap) ** 0.5
        attn = model.model.layers[0].self_attn
        with torch.no_grad():
            attn.k_proj.weight[:dim] = 0
            attn.k_proj.bias[:dim] = torch.cat([torch.full_like(freqs, a), torch.zeros_like(freqs)])
            for head in range(group):
                rows = slice(head * dim, (head + 1) * dim)
                attn.q_proj.weight[rows] = 0
                attn.q_proj.bias[rows] = torch.cat([a * torch.cos(freqs), -a * torch.sin(freqs)])
                attn.o_proj.weight[:, rows] = attn.v_proj.weight[:dim].T / group
        return model

    Qwen2ForCausalLM.from_pretrained = classmethod(from_pretrained)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--fact-form", choices=("key", "pair"), default="key")
    parser.add_argument("--others", choices=("facts", "filler", "relations", "relations-disjoint"), default="facts")
    parser.add_argument("--names", type=int, default=len(kv.NAMES))
    parser.add_argument("--shuffle-evidence", action="store_true")
    parser.add_argument("--repeat", type=float, default=0.0, metavar="SHARE")
    parser.add_argument("--drill", type=float, default=0.0, metavar="SHARE")
    parser.add_argument("--mimetic", type=float, default=0.0, metavar="SCALE")
    parser.add_argument("--previous-token", type=float, default=0.0, metavar="MARGIN")
    variants, probe_args = parser.parse_known_args(argv)
    if variants.repeat and variants.drill:
        parser.error("--repeat and --drill are alternatives")
    if variants.fact_form == "pair":
        use_pair_facts()
    use_items(variants.others, variants.names, variants.shuffle_evidence, variants.fact_form == "pair")
    if variants.mimetic:
        use_mimetic_init(variants.mimetic)
    if variants.previous_token:
        use_previous_token_init(variants.previous_token)  # after --mimetic: it replaces layer 0's first head group
    import sft_probe  # this script's folder is on sys.path

    if variants.repeat or variants.drill:
        use_restatements(sft_probe, variants.repeat or variants.drill, shuffled=bool(variants.drill))
    print(f"[variants] {vars(variants)}", flush=True)
    return sft_probe.main(probe_args)


if __name__ == "__main__":
    sys.exit(main())
