"""Small-scale replication of the papers' comparison, on a CPU, end to end.

1. A Qwen2-shaped model is built locally with random weights and a tokenizer trained on the task's text,
   then trained FROM SCRATCH with ``llamafactory-cli train`` (``stage: sft``) on a multi-hop key-value task
   (``llamafactory_longpo/eval/kv_hops.py``): "Pair Bako Rilu." facts (the key of Bako is Rilu), two of them
   evidence, the rest distractors; long contexts hide the evidence among filler prose; "Follow the keys
   from Bako two times."; answer = the two quoted facts and a ``Final answer:`` line. Its first layer
   starts with a previous-token head and its attention with mimetic weights (:func:`induction_init`), so the
   lookup can be learned in about a thousand steps. The SFT mix: single-hop recall questions over
   contexts of 1x to ``recall_max_mult`` x the short length (reading at every length) and two-hop questions
   over short contexts only (reasoning at the short length). Its bf16 copy is the start of every method below (and,
   with ``--ship``, the demo's shipped model); ``--only-start`` stops after checking it.
2. Preference data is built WITH THE MODEL ITSELF by the project's builders: ``llamafactory-longpo build
   solopo`` (the task as MuSiQue-format input; short = the evidence paragraphs, long = the same paragraphs
   hidden among filler paragraphs at ``train_mult`` x the short length; sampled answers scored by
   sub-EM). For LongPO the script first runs ``llamafactory-longpo build longpo`` unchanged (the model must
   write the instructions: a task model cannot, and the summary says how many records that gave), then
   runs the same builder (``build_longpo``) with the task's questions as each chunk's instruction pool:
   the chosen (chunk) and rejected (whole document) answers are still the model's own.
3. From the SFT start, with the same number of steps and batch size: SFT on the long view (chosen
   answers), Long-DPO (the toolkit's ``dpo`` on the long view), LongPO (as published, and with its NLL on
   the answers only), SoLo-DPO, SoLo-SimPO, SoLo-ORPO and self-distillation from the short view (``s2ld``,
   off-policy on the chosen answers and on-policy on the policy's own samples), each a ``llamafactory-cli
   train`` subprocess (wall time recorded).
4. Every model and the start answer 300 held-out questions at the short length and at 2x, 4x, 8x (and on up to
   ``train_mult`` when that is longer), two-hop and single-hop (greedy, through the toolkit's engine; the
   package's ``eval/kv_eval.py``, as the demo), scored by sub-EM on the ``Final answer:`` line, with 95%
   Wilson intervals.
5. Prints the tables (method | short | 2x | 4x | 8x | train time) and writes ``results.json``,
   ``results.md``, ``samples.jsonl`` and ``accuracy_vs_length.png`` to ``--out``.

  .venv/bin/python benchmarks/replicate_small.py --only-start # the SFT start and its check (CPU, ~9 min)
  .venv/bin/python benchmarks/replicate_small.py --resume     # then the data, the methods, the tables (~15 min)
  .venv/bin/python benchmarks/replicate_small.py --smallest   # the whole pipeline, tiny step counts (~3 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from llamafactory_longpo.eval import kv_hops as kv
from llamafactory_longpo.eval.kv_eval import others_needed, short_length

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@dataclasses.dataclass
class Settings:
    # model (Qwen2-shaped, random init)
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 0  # MLP width; 0: 4 x hidden
    tokenizer_vocab: int = 1024
    mimetic_init: float = 3.0  # induction_init: mimetic attention scale (0: off)
    previous_token_init: float = 10.0  # induction_init: previous-token head margin in logits (0: off)
    # task
    facts_per_paragraph: int = 2  # 6 (86-token contexts) left the SFT start at 8-10%: see sft_probe.py
    hops: int = 2
    # SFT from scratch (short contexts only)
    sft_steps: int = 1500  # two of three seeds had learned the lookup by here (BENCHMARKS.md, "Short-to-long at laptop scale")
    sft_batch: int = 16
    sft_lr: float = 1.0e-3
    recall_share: float = 0.5  # share of SFT examples that are single-hop recall questions (kv_hops.recall_question)
    sft_min_facts: int = 1  # SFT paragraphs have sft_min_facts..facts_per_paragraph facts (easy ones teach the lookup)
    recall_keys: int = 6  # a recall question asks for 1..recall_keys keys
    recall_max_mult: int = 8  # recall questions at 1x, 2x, ... up to this multiple of the short context (1: short only)
    # preference data
    train_mult: int = 8  # long context of the training data = train_mult x the short context
    solopo_inputs: int = 600
    num_samples: int = 8
    temperature: float = 1.5
    longpo_docs: int = 200
    longpo_max_turns: int = 2
    longpo_attempt_docs: int = 4  # documents given to the unmodified LongPO builder (self-written instructions)
    # preference training (every method the same budget)
    steps: int = 150
    batch: int = 8
    lr: float = 2.0e-4
    # evaluation
    eval_items: int = 300
    max_new_tokens: int = 32
    seed: int = 0
    threads: int = 1  # torch threads per process (1 is faster on a small, shared CPU; not part of any result key)


MODEL_KEYS = (
    *("hidden", "layers", "heads", "kv_heads", "intermediate", "tokenizer_vocab", "mimetic_init", "previous_token_init"),
    *("facts_per_paragraph", "hops", "seed"),
)
SFT_KEYS = (*MODEL_KEYS, "sft_steps", "sft_batch", "sft_lr", "recall_share", "sft_min_facts", "recall_keys", "recall_max_mult")
DATA_KEYS = (
    *SFT_KEYS,
    *("train_mult", "solopo_inputs", "num_samples", "temperature", "longpo_docs", "longpo_max_turns"),
    *("longpo_attempt_docs", "max_new_tokens"),
)
TRAIN_KEYS = (*DATA_KEYS, "steps", "batch", "lr")


def apply_settings(s: Settings, pairs: list[str]) -> Settings:
    """``s`` with ``--set KEY=VALUE`` overrides, read and checked as the package's own ``KEY=VALUE`` config
    overrides are (YAML values; an unknown key or a value of the wrong type stops at once with one line,
    instead of failing, or silently truncating, later)."""
    from llamafactory_longpo.cli import apply_overrides, check_fields
    from llamafactory_longpo.errors import ConfigError

    try:
        raw = check_fields(Settings, "--set", apply_overrides("--set", dataclasses.asdict(s), pairs))
    except ConfigError as err:
        raise SystemExit(f"replicate_small.py: error: {err}") from None
    # a float setting given as an integer (temperature=2) is still a float: result keys compare by value and type
    out = Settings(**{f.name: float(raw[f.name]) if f.type == "float" else raw[f.name] for f in dataclasses.fields(Settings)})
    try:  # a LongPO document (keys unique across its items) needs the most names: too few stop here, not after the SFT
        longpo_document(out, "check", random.Random(0))
    except ValueError as err:
        raise SystemExit(
            f"replicate_small.py: error: --set: facts_per_paragraph={out.facts_per_paragraph}, hops={out.hops}, "
            f"train_mult={out.train_mult}: a LongPO document needs more names than the task has ({err})"
        ) from None
    return out


def key_of(s: Settings, names: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    """What a step's output depends on: ``--resume`` reuses a step only when this is unchanged."""
    return {**{n: getattr(s, n) for n in names}, **extra}


FULL = Settings()
SMALLEST = Settings(
    hidden=64,
    layers=2,
    sft_steps=120,  # fewer leave greedy answers one word long ("Pair..."), which the LongPO builder drops
    sft_batch=8,
    solopo_inputs=32,
    num_samples=8,
    longpo_docs=6,
    longpo_attempt_docs=2,
    steps=3,
    batch=2,
    eval_items=6,
)

# method -> (stage, dataset kind, extra config); the papers' settings where they give them
METHODS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "SFT-long": ("sft", "solopo", {"s2l_view": "long"}),
    "Long-DPO": ("dpo", "solopo", {"s2l_view": "long", "pref_loss": "sigmoid", "pref_beta": 0.1}),
    "LongPO": ("longpo", "longpo", {"pref_loss": "sigmoid", "pref_beta": 0.1, "longpo_lambda": 0.01}),
    # the published NLL covers the whole long chosen sequence, document included: here random names and filler
    "LongPO (NLL on answers)": (
        "longpo",
        "longpo",
        {"pref_loss": "sigmoid", "pref_beta": 0.1, "longpo_lambda": 0.01, "longpo_nll_scope": "response"},
    ),
    "SoLo-DPO": ("solopo", "solopo", {"pref_loss": "sigmoid", "pref_beta": 0.1, "solopo_alpha": 3.0}),
    "SoLo-SimPO": ("solopo", "solopo", {"pref_loss": "simpo", "pref_beta": 2.0, "simpo_gamma": 1.0, "solopo_alpha": 1.0}),
    "SoLo-ORPO": ("solopo", "solopo", {"pref_loss": "orpo", "pref_beta": 0.1, "solopo_alpha": 1.0}),
    # self-distillation: the frozen start reading the short input teaches the policy reading the long one. Off-policy
    # on the chosen answers: forward KL (context distillation, mode-covering) plus the demo's small NLL on them
    "S2LD off-policy": ("s2ld", "solopo", {"s2ld_divergence": "forward_kl", "s2ld_nll_weight": 0.1}),
    # on-policy: the policy samples its own answers to the long prompts at every step (temperature 1) and the
    # teacher scores them (reverse KL); the chosen answers are 8-32 tokens and stop at the template's end token
    "S2LD on-policy": (
        "s2ld",
        "solopo",
        {"s2ld_on_policy": True, "s2ld_divergence": "reverse_kl", "s2ld_max_new_tokens": 40, "s2ld_temperature": 1.0},
    ),
}
START = "SFT start"


def log(msg: str) -> None:
    print(f"[replicate] {msg}", flush=True)


# the engine's loading chatter, in this process only (the training logs keep the toolkit's own verbosity)
QUIET = {"LLAMAFACTORY_VERBOSITY": "WARN", "TRANSFORMERS_VERBOSITY": "error"}
_quieted: list[str] = []
THREADS = 1  # torch threads of every subprocess (Settings.threads, set by main)


def quiet() -> None:
    for key, value in QUIET.items():
        if key not in os.environ:
            os.environ[key] = value
            _quieted.append(key)


def env() -> dict[str, str]:
    return dict(
        {k: v for k, v in os.environ.items() if k not in _quieted},
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        WANDB_DISABLED="true",
        DISABLE_VERSION_CHECK="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(THREADS),
    )


def run(cmd: list[str], log_path: Path) -> float:
    """A subprocess with its output in ``log_path``; returns its wall time, raises with the log's tail on failure."""
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=fh, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return wall


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    # YAML, not JSON: the toolkit's .json config path is broken in 0.9.5
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def engine_args(model: Path) -> dict[str, Any]:
    return {"model_name_or_path": str(model), "template": "qwen", "default_system": kv.SYSTEM, "infer_backend": "huggingface"}


# ---------------------------------------------------------------------------------------------- data


def item_kwargs(s: Settings, others: int = 0) -> dict[str, Any]:
    return {"hops": s.hops, "facts_per_paragraph": s.facts_per_paragraph, "other_paragraphs": others}


def register(info_path: Path, name: str, entry: dict[str, Any]) -> None:
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = entry
    info_path.write_text(json.dumps(info, indent=2) + "\n")


def eval_mults(s: Settings) -> tuple[int, ...]:
    """The evaluated lengths, in multiples of the short context: 1x, 2x, 4x, 8x, and on up to ``train_mult`` when
    the methods train longer (``--set train_mult=16`` adds 16x)."""
    return tuple(m for m in (1, 2, 4, 8, 16, 32) if m <= max(8, s.train_mult))


def recall_mults(s: Settings) -> tuple[int, ...]:
    """The context lengths of the SFT mix's recall questions: 1x, 2x, 4x, ... up to ``recall_max_mult``."""
    return tuple(m for m in (1, 2, 4, 8, 16) if m <= s.recall_max_mult)


def sft_example(s: Settings, rng: random.Random, key: str = "sft") -> tuple[str, str, str]:
    """One SFT example of these settings (also the SFT probe's, ``sft_probe.py``)."""
    return kv.sft_example(
        rng,
        hops=s.hops,
        max_facts=s.facts_per_paragraph,
        min_facts=s.sft_min_facts,
        recall_share=s.recall_share,
        recall_keys=s.recall_keys,
        recall_mults=recall_mults(s),
        key=key,
    )


def induction_init(model: Any, mimetic: float, margin: float) -> None:
    """Lay out an induction head at initialisation (Olsson et al., "In-context Learning and Induction Heads",
    2022): the circuit that finds the earlier occurrence of the current token and copies the token after it,
    which is the task's lookup ("Pair Bako Rilu.": at the answer's "Bako", copy what followed "Bako").

    - ``mimetic`` > 0, every layer: mimetic initialisation (Trockman and Kolter, "Mimetic Initialization of
      Self-Attention Layers", ICML 2023): each key/value head's key weights are its first query head's (the
      query weights scaled by ``mimetic``), and its value weights, also scaled by ``mimetic``, are that query
      head's output weights transposed, so the head attends to tokens like the query and copies what it reads.
    - ``margin`` > 0: layer 0's first key/value head group attends to the previous token. Its query and key
      are constant (weights zero, biases set), so the score depends only on the distance; for the rotary pair
      of frequency t, the query is a*(cos t, -sin t) and the key (a, 0), which scores a**2 * cos((distance -
      1) * t), highest at distance 1 for every pair; ``a`` makes the previous token beat every other distance
      up to the model's maximum length by ``margin`` logits. Its output writes the previous token's value into
      the residual stream, where layer 1's matching heads can find it.

    Measured (BENCHMARKS.md, "Short-to-long at laptop scale"): without it, no start design learned the lookup by
    name in the 1,000 to 6,000 steps each was run (single-hop accuracy near chance); with it, single-hop accuracy
    passed 90% at every length by step 1,000 in one probe run (by 1,250 in another) and by the pipeline's step 1,500 in two
    of three seeds (the third, and one more probe run, never found the lookup)."""
    import torch

    config = model.config
    dim = config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    with torch.no_grad():
        if mimetic:
            for layer in model.model.layers:
                attn = layer.self_attn
                for kv_head in range(config.num_key_value_heads):
                    q = slice(kv_head * group * dim, (kv_head * group + 1) * dim)
                    k = slice(kv_head * dim, (kv_head + 1) * dim)
                    attn.q_proj.weight[q] *= mimetic
                    attn.k_proj.weight[k] = attn.q_proj.weight[q]
                    attn.v_proj.weight[k] *= mimetic
                    attn.o_proj.weight[:, q] = attn.v_proj.weight[k].T
        if margin:
            freqs = model.model.rotary_emb.inv_freq.double()
            distance = torch.arange(config.max_position_embeddings, dtype=torch.float64)
            score = torch.cos((distance[:, None] - 1) * freqs[None]).sum(-1) / dim**0.5
            a = (margin / float(score[1] - torch.cat([score[:1], score[2:]]).max())) ** 0.5
            attn = model.model.layers[0].self_attn
            attn.k_proj.weight[:dim] = 0
            attn.k_proj.bias[:dim] = torch.cat([torch.full_like(freqs, a), torch.zeros_like(freqs)])
            for head in range(group):
                rows = slice(head * dim, (head + 1) * dim)
                attn.q_proj.weight[rows] = 0
                attn.q_proj.bias[rows] = torch.cat([a * torch.cos(freqs), -a * torch.sin(freqs)])
                attn.o_proj.weight[:, rows] = attn.v_proj.weight[:dim].T / group


def make_task_model(path: Path, s: Settings) -> None:
    """The model of these settings (random weights, :func:`induction_init`) and its tokenizer trained on the task's text."""
    from llamafactory_longpo.tiny import make_tiny_model

    make_tiny_model(
        str(path),
        texts=kv.tokenizer_corpus(s.seed),
        tokenizer_vocab=s.tokenizer_vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate or 4 * s.hidden,
        num_layers=s.layers,
        num_heads=s.heads,
        num_kv_heads=s.kv_heads,
        max_position_embeddings=8192,
        seed=s.seed,
        init=lambda model: induction_init(model, s.mimetic_init, s.previous_token_init),
    )


def write_sft_data(data_dir: Path, s: Settings) -> str:
    rng = random.Random(s.seed + 1)
    n = s.sft_steps * s.sft_batch
    rows = []
    for i in range(n):
        context, q, a = sft_example(s, rng, key=f"sft{i}")
        rows.append({"messages": [{"role": "user", "content": f"{context}\n\n{q}"}, {"role": "assistant", "content": a}]})
    kv.write_jsonl(str(data_dir / "kv_sft.jsonl"), rows)
    register(
        data_dir / "dataset_info.json",
        "kv_sft",
        {
            "file_name": "kv_sft.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        },
    )
    return "kv_sft"


# ---------------------------------------------------------------------------------------------- training


def train_config(model: Path, out_dir: Path, data_dir: Path, dataset: str, stage: str, **extra: Any) -> dict[str, Any]:
    return {
        "model_name_or_path": str(model),
        "stage": stage,
        "do_train": True,
        "finetuning_type": "full",
        "dataset": dataset,
        "dataset_dir": str(data_dir),
        "template": "qwen",
        "default_system": kv.SYSTEM,
        "preprocessing_num_workers": 1,
        "overwrite_cache": True,
        "output_dir": str(out_dir),
        "overwrite_output_dir": True,
        "logging_steps": 10,
        "save_strategy": "no",
        "plot_loss": True,
        "report_to": "none",
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.05,
        "disable_gradient_checkpointing": True,  # a tiny model: recomputation only costs time
        "bf16": False,
        "seed": 0,
        **extra,
    }


def train(name: str, config: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = write_yaml(run_dir / "train.yaml", config)
    log(f"train {name}: llamafactory-cli train {cfg}")
    wall = run([str(VENV_BIN / "llamafactory-cli"), "train", str(cfg)], run_dir / "train.log")
    out = Path(config["output_dir"])
    results = json.loads((out / "all_results.json").read_text()) if (out / "all_results.json").exists() else {}
    log(f"train {name}: {wall:.0f} s wall (train loop {results.get('train_runtime', float('nan')):.0f} s)")
    return {"wall_s": round(wall, 1), "train_runtime_s": results.get("train_runtime"), "train_loss": results.get("train_loss")}


# ---------------------------------------------------------------------------------------------- builders


def fresh_output(out: Path) -> None:
    """A builder's output and its progress file removed: a rebuilt step starts over instead of resuming."""
    for p in (out, Path(f"{out}.progress.jsonl")):
        p.unlink(missing_ok=True)


def build_solopo_data(s: Settings, work: Path, model: Path, data_dir: Path, short_tokens: int, para_tokens: int) -> dict:
    others = others_needed(short_tokens, para_tokens, s.train_mult)
    items = kv.make_items("solopo", s.solopo_inputs, s.seed + 2, **item_kwargs(s, others))
    musique = kv.write_jsonl(str(work / "solopo_input.jsonl"), [it.musique() for it in items])
    out = data_dir / "kv_solopo.jsonl"
    fresh_output(out)
    cfg = {
        "input": musique,
        "output": str(out),
        "model": engine_args(model),
        "target_tokens": s.train_mult * short_tokens,
        "num_samples": s.num_samples,
        "temperature": s.temperature,
        "max_new_tokens": s.max_new_tokens,
        "prompt": "{question}",  # the task's own question (the model was trained on it), not the MuSiQue CoT prompt
        "seed": s.seed,
        "dataset_name": "kv_solopo",
        "dataset_info": str(data_dir / "dataset_info.json"),
    }
    path = write_yaml(work / "build_solopo.yaml", cfg)
    log(f"build solopo: llamafactory-longpo build solopo {path}")
    wall = run([str(VENV_BIN / "llamafactory-longpo"), "build", "solopo", str(path)], work / "build_solopo.log")
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    log(f"build solopo: kept {summary['kept']} of {s.solopo_inputs} ({summary['dropped']}), {wall:.0f} s")
    if not summary["kept"]:
        raise SystemExit("build solopo kept no record (no question had both a correct and a wrong sample): see its summary")
    return {"how": "llamafactory-longpo build solopo (unchanged)", "config": cfg, "summary": summary, "wall_s": round(wall, 1)}


def longpo_document(s: Settings, key: str, rng: random.Random) -> tuple[str, list[kv.Item]]:
    """One LongPO corpus document (:func:`longpo_corpus`): ``train_mult // 2`` items, each with 2 filler sentences."""
    return kv.make_document(key, rng, s.train_mult // 2, **item_kwargs(s, 2))


def longpo_corpus(s: Settings, path: Path, n: int, seed: int) -> dict[str, list[kv.Item]]:
    """``n`` documents of ``train_mult // 2`` items, each item's evidence followed by a paragraph of 2 filler
    sentences (about ``train_mult`` x the short length; keys unique per document). The builder's chunker (0.75
    to 1.25 x the short length, on paragraph boundaries) then cuts each item's evidence out as a whole chunk,
    which gets the task's question (:class:`TaskInstructions`); filler paragraphs, longer than a chunk, stand
    alone and get none."""
    rng = random.Random(seed)
    docs: dict[str, list[kv.Item]] = {}
    rows = []
    for i in range(n):
        text, items = longpo_document(s, f"doc{seed}-{i}", rng)
        docs[f"doc{seed}-{i}"] = items
        rows.append({"id": f"doc{seed}-{i}", "text": text})
    kv.write_jsonl(str(path), rows)
    return docs


def longpo_config(s: Settings, corpus: Path, out: Path, model: Path, short_tokens: int, data_dir: Optional[Path]) -> dict:
    doc = s.train_mult * short_tokens
    return {
        "input": str(corpus),
        "output": str(out),
        "model": engine_args(model),
        "min_doc_tokens": doc // 2,
        "max_doc_tokens": 2 * doc,
        # chunks on paragraph boundaries of about one short context (an item's two paragraphs)
        "chunk_min_tokens": int(0.75 * short_tokens),
        "chunk_max_tokens": int(1.25 * short_tokens),
        "max_turns": s.longpo_max_turns,
        "pool_size": 4,
        "answer_temperature": 0.0,
        "max_new_tokens": s.max_new_tokens,
        "seed": s.seed,
        "dataset_name": "kv_longpo",
        **({"dataset_info": str(data_dir / "dataset_info.json")} if data_dir else {}),
    }


class TaskInstructions:
    """The task's own question for each chunk, as ``build_longpo``'s instruction pool (its ``instructions``
    hook): a task model cannot write questions about a text. Counts the chunks that are not exactly one item's
    short context (they get no pool, and the builder drops them)."""

    def __init__(self, docs: dict[str, list[kv.Item]]) -> None:
        self.pools = {it.short_context: [it.question] for items in docs.values() for it in items}
        self.pool_requests = 0
        self.pool_misses = 0

    def __call__(self, chunks: list[str]) -> list[list[str]]:
        pools = [self.pools.get(c, []) for c in chunks]
        self.pool_requests += len(chunks)
        self.pool_misses += sum(not p for p in pools)
        return pools


def build_longpo_data(s: Settings, work: Path, model: Path, data_dir: Path, short_tokens: int) -> dict:
    import contextlib
    import io

    # (a) the builder unchanged: the model must write its own instruction pools
    attempt_corpus = work / "longpo_attempt_input.jsonl"
    longpo_corpus(s, attempt_corpus, s.longpo_attempt_docs, s.seed + 30)
    attempt_out = work / "longpo_attempt.jsonl"
    fresh_output(attempt_out)
    cfg = longpo_config(s, attempt_corpus, attempt_out, model, short_tokens, None)
    path = write_yaml(work / "build_longpo_attempt.yaml", cfg)
    log(f"build longpo (unchanged, self-written instructions): llamafactory-longpo build longpo {path}")
    wall_attempt = run([str(VENV_BIN / "llamafactory-longpo"), "build", "longpo", str(path)], work / "build_longpo_attempt.log")
    attempt = json.loads(Path(f"{attempt_out}.summary.json").read_text())
    samples = [json.loads(line) for line in Path(f"{attempt_out}.progress.jsonl").read_text().splitlines()]
    log(f"build longpo (unchanged): kept {attempt['kept']} of {s.longpo_attempt_docs} documents ({attempt['dropped']})")

    # (b) the same builder, the task's questions as the instruction pools
    from llamafactory_longpo.builders.longpo import LongPOBuildConfig, build_longpo
    from llamafactory_longpo.text.generate import Generator

    corpus = work / "longpo_input.jsonl"
    docs = longpo_corpus(s, corpus, s.longpo_docs, s.seed + 3)
    out = data_dir / "kv_longpo.jsonl"
    fresh_output(out)
    cfg = longpo_config(s, corpus, out, model, short_tokens, data_dir)
    write_yaml(work / "build_longpo.yaml", cfg)
    log(f"build longpo (task questions as the instruction pool): build_longpo({work / 'build_longpo.yaml'})")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the engine's loading chatter
        generator = Generator(cfg["model"])
    instructions = TaskInstructions(docs)
    summary = build_longpo(LongPOBuildConfig(**cfg), generator=generator, log=lambda m: None, instructions=instructions)
    wall = time.perf_counter() - start
    if not summary["kept"]:
        raise SystemExit("build longpo kept no record: see its summary")
    pool_stats = {"pool_requests": instructions.pool_requests, "pool_misses": instructions.pool_misses}
    del generator
    log(
        f"build longpo (task questions): kept {summary['kept']} of {s.longpo_docs} documents ({summary['dropped']}), {wall:.0f} s"
    )
    return {
        "attempt": {
            "how": "llamafactory-longpo build longpo (unchanged): the model writes each chunk's instruction pool",
            "config": cfg | {"input": str(attempt_corpus), "output": str(attempt_out)},
            "summary": attempt,
            "progress": samples,
            "wall_s": round(wall_attempt, 1),
        },
        "how": (
            "llamafactory_longpo.builders.longpo.build_longpo (the builder's own function) with its instructions hook "
            "giving each chunk the task's question for it; chosen (answer on the chunk) and rejected (answer on the "
            "whole document) are generated by the model"
        ),
        "config": cfg,
        "summary": summary,
        **pool_stats,
        "wall_s": round(wall, 1),
    }


# ---------------------------------------------------------------------------------------------- evaluation


def eval_set(s: Settings, tokenizer: Any, short_tokens: int) -> list[dict[str, Any]]:
    """Held-out questions (their own seed), each at the short length and at 2x, 4x, 8x (and longer:
    :func:`eval_mults`; evidence at random depths), two-hop and single-hop: the package's evaluation
    (``llamafactory_longpo.eval.kv_eval``), as the demo's."""
    from llamafactory_longpo.eval.kv_eval import TASKS, make_samples

    return make_samples(
        tokenizer,
        items=s.eval_items,
        seed=s.seed + 4,
        mults=list(eval_mults(s)),
        tasks=list(TASKS),
        facts_per_paragraph=s.facts_per_paragraph,
        hops=s.hops,
        short_tokens=short_tokens,
    )


def evaluate(name: str, model: Path, samples: list[dict[str, Any]], s: Settings) -> tuple[dict[str, Any], list[dict]]:
    """Greedy answers through the toolkit's engine (batched, ``Generator.greedy``); sub-EM of the
    ``Final answer:`` line; per task and length, the accuracy and its 95% Wilson interval."""
    import contextlib
    import gc
    import io

    from llamafactory_longpo.eval.kv_eval import answer, summarize
    from llamafactory_longpo.text.generate import Generator

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        generator = Generator(engine_args(model))
    rows = [{"method": name, "model": name, **r} for r in answer(generator, samples, s.max_new_tokens, 64)]
    del generator
    gc.collect()
    summary = summarize(rows)[name]
    log(
        f"eval {name}: "
        + "; ".join(f"{t} " + ", ".join(f"{m}x {c['accuracy']:.1f}" for m, c in cells.items()) for t, cells in summary.items())
        + f" ({time.perf_counter() - start:.0f} s)"
    )
    return summary, rows


# ---------------------------------------------------------------------------------------------- report


def table(result: dict[str, Any], task: str = "two-hop") -> str:
    """Method | stage | accuracy [95% interval] per length | train time, for one task."""
    lengths = result["lengths"]
    mults = list(lengths)
    head = ["method", "stage"] + [f"short ({lengths['1']} tok)"] + [f"{m}x ({lengths[m]} tok)" for m in mults[1:]]
    lines = ["| " + " | ".join([*head, "train time"]) + " |", "|" + " --- |" * (len(head) + 1)]
    for name, r in result["methods"].items():
        by_length = r["by_task"][task]
        cells = [name, r["stage"]] + [
            f"{c['accuracy']:.1f} [{c['low']:.1f}, {c['high']:.1f}]" for c in (by_length[m] for m in mults)
        ]
        t = r.get("train")
        cells.append(f"{t['wall_s']:.0f} s" if t else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """Accuracy vs length with 95% intervals: the package's plot (two-hop solid, single-hop dotted)."""
    from llamafactory_longpo.eval.kv_eval import plot as kv_plot

    summary = {name: r["by_task"] for name, r in result["methods"].items()}
    title = f"key-value QA, {result['eval_items']} held-out questions per length and task"
    kv_plot(summary, result["lengths"], str(path), title=title)
    return path


def to_bf16(src: Path, dest: Path) -> dict[str, Any]:
    """``src`` (the SFT output) saved again in bf16 with its tokenizer: the start model of every method, and
    the demo's shipped model (half the bytes of fp32; the methods train it in fp32 on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(dest, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    log(f"start model: {dest} (bf16, {size / 1e6:.2f} MB)")
    return {"bytes": size}


def ship(s: Settings, start: Path, data_dir: Path, dest: Path, root: Path, records: int) -> dict[str, Any]:
    """Copy what the demo runs on into the repository: the bf16 start model (with its tokenizer) to ``dest``
    and the first ``records`` records of both preference sets to ``root/data``, registered in
    ``root/dataset_info.json`` as ``kv_solopo_demo`` and ``kv_longpo_demo``."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for f in start.iterdir():
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    info_path = root / "dataset_info.json"
    info = json.loads(info_path.read_text())
    shipped = {}
    for kind in ("solopo", "longpo"):
        lines = (data_dir / f"kv_{kind}.jsonl").read_text().splitlines()[:records]
        target = root / "data" / f"kv_{kind}_demo.jsonl"
        target.write_text("\n".join(lines) + "\n")
        entry = json.loads((data_dir / "dataset_info.json").read_text())[f"kv_{kind}"]
        info[f"kv_{kind}_demo"] = {**entry, "file_name": f"data/{target.name}"}
        shipped[kind] = {"file": str(target.relative_to(root)), "records": len(lines)}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    size = sum(f.stat().st_size for f in dest.iterdir())
    log(f"shipped the start model to {dest} ({size / 1e6:.2f} MB) and {shipped}")
    return {"model": str(dest), "model_bytes": size, "data": shipped}


# ---------------------------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smallest", action="store_true", help="the whole pipeline with tiny step counts (~3 min)")
    parser.add_argument("--out", type=Path, default=None, help="default saves/replicate_small (saves/replicate_smallest)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--resume", action="store_true", help="reuse the SFT start, data and models already in --out")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override a setting, e.g. steps=200")
    parser.add_argument("--only-start", action="store_true", help="stop after the start model's check (no data, no methods)")
    parser.add_argument(
        "--ship",
        type=Path,
        default=None,
        metavar="DIR",
        help="copy the bf16 start model to DIR (the demo's: examples/demo_model) and the demo's data to data/",
    )
    parser.add_argument("--ship-records", type=int, default=256, help="records of each preference set shipped for the demo")
    args = parser.parse_args(argv)

    s = apply_settings(SMALLEST if args.smallest else FULL, args.set)
    out = (args.out or ROOT / "saves" / ("replicate_smallest" if args.smallest else "replicate_small")).resolve()
    work, data_dir, models = out / "work", out / "data", out / "models"
    for d in (work, data_dir, models):
        d.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state: dict[str, Any] = json.loads(state_path.read_text()) if args.resume and state_path.exists() else {}
    state.setdefault("train", {})

    def reuse(entry: Optional[dict[str, Any]], key: dict[str, Any]) -> bool:
        return bool(entry) and entry.get("key") == key

    def save_state() -> None:
        state_path.write_text(json.dumps(state, indent=2))

    quiet()
    global THREADS
    THREADS = s.threads
    import torch

    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    log(f"settings: {json.dumps(dataclasses.asdict(s))}")
    log(f"output: {out}")

    # 1. the model (random init) and its tokenizer, then SFT from scratch on short contexts
    from transformers import AutoTokenizer

    init = models / "init"
    if not reuse(state.get("init"), key_of(s, MODEL_KEYS)) or not (init / "model.safetensors").exists():
        shutil.rmtree(init, ignore_errors=True)
        make_task_model(init, s)
        state["init"] = {"key": key_of(s, MODEL_KEYS)}
    tokenizer = AutoTokenizer.from_pretrained(init)
    short_tokens, para_tokens = short_length(tokenizer, s.facts_per_paragraph, s.hops, s.seed + 9)
    n_params = sum(p.numel() for p in __import__("safetensors.torch").torch.load_file(str(init / "model.safetensors")).values())
    log(f"model: {n_params:,} parameters, vocabulary {len(tokenizer)}; short context {short_tokens} tokens")

    sft = models / "sft"
    if not reuse(state.get("sft"), key_of(s, SFT_KEYS)):
        dataset = write_sft_data(data_dir, s)
        cfg = train_config(
            init,
            sft,
            data_dir,
            dataset,
            "sft",
            cutoff_len=s.recall_max_mult * short_tokens + 160,
            per_device_train_batch_size=s.sft_batch,
            max_steps=s.sft_steps,
            learning_rate=s.sft_lr,
            weight_decay=0.01,
        )
        state["sft"] = {**train("SFT start", cfg, work / "sft"), "key": key_of(s, SFT_KEYS)}
        save_state()
    # the start of everything below (and the demo's shipped model): the SFT model in bf16 (half the bytes)
    start = models / "start"
    if not reuse(state.get("start"), key_of(s, SFT_KEYS)) or not (start / "model.safetensors").exists():
        state["start"] = {**to_bf16(sft, start), "key": key_of(s, SFT_KEYS)}
        save_state()
    samples = eval_set(s, tokenizer, short_tokens)
    if args.only_start:
        summary, rows = evaluate(START, start, samples, s)
        check = {"command": " ".join(sys.argv), "settings": dataclasses.asdict(s), "sft": state["sft"], "accuracy": summary}
        (out / "start_check.json").write_text(json.dumps(check, indent=2))
        kv.write_jsonl(str(out / "start_samples.jsonl"), rows)
        log(f"wrote {out / 'start_check.json'}")
        return 0

    # 2. preference data, built by the SFT start itself
    if not reuse(state.get("solopo_data"), key_of(s, DATA_KEYS)):
        state["solopo_data"] = {
            **build_solopo_data(s, work, start, data_dir, short_tokens, para_tokens),
            "key": key_of(s, DATA_KEYS),
        }
        save_state()
    if not reuse(state.get("longpo_data"), key_of(s, DATA_KEYS)):
        state["longpo_data"] = {**build_longpo_data(s, work, start, data_dir, short_tokens), "key": key_of(s, DATA_KEYS)}
        save_state()

    # 3. the methods, same start, same steps and batch size
    datasets = {"solopo": "kv_solopo", "longpo": "kv_longpo"}
    for name in args.methods:
        stage, kind, extra = METHODS[name]
        if reuse(state["train"].get(name), key_of(s, TRAIN_KEYS, method=extra)):
            continue
        run_dir = work / name
        cfg = train_config(
            start,
            models / name,
            data_dir,
            datasets[kind],
            stage,
            cutoff_len=(s.train_mult + 1) * short_tokens + 2 * s.max_new_tokens + 128,
            short_cutoff_len=short_tokens + 2 * s.max_new_tokens + 128,
            per_device_train_batch_size=s.batch,
            max_steps=s.steps,
            learning_rate=s.lr,
            s2l_ref_cache_dir=str(run_dir / "ref_cache"),
            **extra,
        )
        if stage == "sft":
            cfg.pop("short_cutoff_len")
        state["train"][name] = {**train(name, cfg, run_dir), "key": key_of(s, TRAIN_KEYS, method=extra)}
        save_state()

    # 4. evaluation
    lengths = {str(m): int(statistics.median(x["tokens"] for x in samples if x["mult"] == m)) for m in eval_mults(s)}
    result: dict[str, Any] = {
        "command": "benchmarks/replicate_small.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": dataclasses.asdict(s),
        "model_parameters": n_params,
        "short_tokens": short_tokens,
        "lengths": lengths,
        "eval_items": s.eval_items,
        "data": {"sft": state["sft"], "solopo": state["solopo_data"], "longpo": state["longpo_data"]},
        "methods": {},
    }
    all_rows = []
    for name in [START, *args.methods]:
        model = start if name == START else models / name
        by_task, rows = evaluate(name, model, samples, s)
        all_rows += rows
        stage = "sft (short)" if name == START else METHODS[name][0]
        result["methods"][name] = {
            "stage": stage,
            "accuracy": {m: c["accuracy"] for m, c in by_task["two-hop"].items()},  # two-hop, as the earlier runs
            "by_task": by_task,
            "train": state["train"].get(name) if name != START else None,
        }
        if name != START:
            result["methods"][name]["config"] = {k: v for k, v in METHODS[name][2].items()}
    result["total_wall_s"] = round(time.perf_counter() - t0, 1)

    # 5. report
    kv.write_jsonl(str(out / "samples.jsonl"), all_rows)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    md = "\n\n".join(f"{task}, accuracy % [95% interval]\n\n{table(result, task)}" for task in ("two-hop", "single"))
    (out / "results.md").write_text(md + "\n")
    plot(result, out / "accuracy_vs_length.png")
    print("\n" + md + "\n")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'accuracy_vs_length.png'}, {out / 'samples.jsonl'}")
    log(f"total wall time {result['total_wall_s']:.0f} s (this invocation)")
    if args.ship:
        result["shipped"] = ship(s, start, data_dir, args.ship.resolve(), ROOT, args.ship_records)
        (out / "results.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
