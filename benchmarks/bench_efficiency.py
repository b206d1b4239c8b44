"""Side-by-side step time and peak memory: the toolkit's ``dpo`` stage vs ``solopo``/``longpo``.

Every configuration is a real ``llamafactory-cli train`` run on the same records (one short-to-long
file, read by ``dpo`` through its long view), measured in one invocation of this script:

  (a) the toolkit's ``dpo`` on the long view, sigmoid and orpo (what a user would run instead);
  (b) ``solopo`` with sigmoid and orpo;  (c) ``longpo``;
  (d) (b) and (c) with the plugin's optimizations switched off (full-vocabulary logits, live
      reference model, no shared prefix);  (e) ``longpo`` with only the shared prefix off (two rows).

With ``--repeats R`` every configuration runs R times, interleaved (round r runs all of them, in an order
rotated by r), so slow phases of a shared machine hit every configuration alike; the table gives the median
step time with its spread (min-max) and the median peak memory, and ratios of medians.

Step time is the wall time of the optimizer steps after ``--warmup`` steps (a diagnostic callback
records it); peak memory is the process's peak RSS (``ru_maxrss``), model and data included.

    .venv/bin/python benchmarks/bench_efficiency.py                      # CPU: 2K, 4K, 8K
    .venv/bin/python benchmarks/bench_efficiency.py --lengths 2048 --only solopo-orpo dpo-orpo
    .venv/bin/python benchmarks/bench_efficiency.py --lengths 8192 16384 32768 --only longpo longpo-two-rows --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# name -> (stage, extra config); "plain" switches every plugin optimization off
PLAIN = {"s2l_response_logits": False, "s2l_shared_prefix": False, "s2l_precompute_ref": False}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpo-sigmoid": ("dpo", {"pref_loss": "sigmoid"}),
    "dpo-orpo": ("dpo", {"pref_loss": "orpo"}),
    "solopo-sigmoid": ("solopo", {"pref_loss": "sigmoid"}),
    "solopo-orpo": ("solopo", {"pref_loss": "orpo"}),
    "longpo": ("longpo", {"pref_loss": "sigmoid"}),
    "solopo-sigmoid-plain": ("solopo", {"pref_loss": "sigmoid", **PLAIN}),
    "solopo-orpo-plain": ("solopo", {"pref_loss": "orpo", **PLAIN}),
    "longpo-plain": ("longpo", {"pref_loss": "sigmoid", **PLAIN}),
    "longpo-two-rows": ("longpo", {"pref_loss": "sigmoid", "s2l_shared_prefix": False}),
}
# (optimized, baseline, the target the ratio is held to: BENCHMARKS.md, "Efficiency")
RATIOS = [
    ("solopo-orpo", "dpo-orpo", "SoLo-ORPO vs toolkit long ORPO: >= 2.3x faster"),
    ("longpo", "dpo-sigmoid", "LongPO vs toolkit DPO: >= 2.5x faster"),
    ("solopo-sigmoid", "dpo-sigmoid", "SoLo-DPO vs toolkit long DPO"),
    ("solopo-orpo", "solopo-orpo-plain", "SoLo-ORPO optimized vs plain"),
    ("solopo-sigmoid", "solopo-sigmoid-plain", "SoLo-DPO optimized vs plain"),
    ("longpo", "longpo-plain", "LongPO optimized vs plain"),
    ("longpo", "longpo-two-rows", "LongPO shared prefix vs two rows"),
]


def make_model(out: Path, args: argparse.Namespace) -> Path:
    from llamafactory_longpo.tiny import make_tiny_model

    path = out / "model"
    if not (path / "model.safetensors").exists():
        make_tiny_model(
            str(path),
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=4 * args.hidden,
            num_layers=args.layers,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=131072,
        )
    return path


def _text_of_tokens(tokenizer: Any, pool: list[str], n_tokens: int, rng: random.Random) -> str:
    """Paragraphs from ``pool`` until ``n_tokens`` tokens, cut at a token boundary."""
    parts: list[str] = []
    ids: list[int] = []
    while len(ids) < n_tokens:
        parts.append(rng.choice(pool))
        ids = tokenizer.encode("\n\n".join(parts), add_special_tokens=False)
    return tokenizer.decode(ids[:n_tokens])


def make_data(out: Path, model: Path, length: int, n: int, response: int) -> str:
    """``n`` single-turn records: long context ~``length`` tokens, short = length/8, responses ~``response``."""
    from transformers import AutoTokenizer

    from llamafactory_longpo import demo

    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(length)
    pool = [p for text in demo.corpus() for p in text.split("\n\n") if len(p) > 80]
    name = f"bench_{length}"
    with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
        for _ in range(n):
            short = _text_of_tokens(tokenizer, pool, length // 8 - 64, rng)
            long = _text_of_tokens(tokenizer, pool, length - length // 8 - 64, rng) + "\n\n" + short
            record = {
                "long_context": long,
                "turns": [
                    {
                        "short_context": short,
                        "instruction": "Summarize what the passage says about the founders.",
                        "chosen": _text_of_tokens(tokenizer, pool, response, rng),
                        "rejected": _text_of_tokens(tokenizer, pool, response, rng),
                    }
                ],
            }
            fh.write(json.dumps(record) + "\n")
    info_path = out / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {"file_name": f"{name}.jsonl", "formatting": "short_to_long", "ranking": True}
    info_path.write_text(json.dumps(info, indent=2))
    return name


def train_config(
    model: Path, stage: str, dataset: str, data_dir: Path, run_dir: Path, length: int, steps: int, response: int, extra: dict
) -> dict[str, Any]:
    """The one training config every benchmark run uses (long rows ``length``, short rows ``length/8``)."""
    return {
        "model_name_or_path": str(model),
        "stage": stage,
        "do_train": True,
        "finetuning_type": "full",
        "dataset": dataset,
        "dataset_dir": str(data_dir),
        "template": "qwen",
        "cutoff_len": length + 2 * response + 256,
        "short_cutoff_len": length // 8 + 2 * response + 256,
        "preprocessing_num_workers": 1,
        "overwrite_cache": True,
        "output_dir": str(run_dir / "out"),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": 1,
        "max_steps": steps,
        "learning_rate": 1.0e-5,
        "logging_steps": 1,
        "save_strategy": "no",
        "plot_loss": False,
        "report_to": "none",
        "disable_shuffling": True,
        "s2l_ref_cache_dir": str(run_dir / "ref_cache"),
        **extra,
    }


def run_one(out: Path, model: Path, dataset: str, length: int, name: str, args: argparse.Namespace) -> dict[str, Any]:
    stage, extra = CONFIGS[name]
    run_dir = out / f"{name}-{length}"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = train_config(model, stage, dataset, out, run_dir, length, args.warmup + args.steps, args.response, extra)
    cfg = run_dir / "cfg.yaml"  # (the toolkit's .json config path is broken in 0.9.5: json.load on a Path)
    cfg.write_text(yaml.safe_dump(config))
    times, rss = run_dir / "steps", run_dir / "maxrss"
    for f in (Path(f"{times}.rank0"), rss):
        f.unlink(missing_ok=True)
    # the CLI in-process, so the process's own peak RSS is the run's
    code = (
        "import atexit, resource, sys\n"
        f"atexit.register(lambda: open({str(rss)!r}, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
        f"sys.argv = ['llamafactory-cli', 'train', {str(cfg)!r}]\n"
        "from llamafactory.cli import main\nmain()\n"
    )
    env = dict(
        os.environ,
        LLAMAFACTORY_LONGPO_STEP_TIME_FILE=str(times),
        DISABLE_VERSION_CHECK="1",
        HF_HUB_OFFLINE="1",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    (run_dir / "log.txt").write_text(proc.stdout)
    if proc.returncode != 0:
        return {"name": name, "length": length, "error": proc.stdout.strip().splitlines()[-1][:300]}
    steps = [json.loads(line)["seconds"] for line in Path(f"{times}.rank0").read_text().splitlines()]
    measured = steps[args.warmup :] or steps
    return {
        "name": name,
        "stage": stage,
        "length": length,
        "s_per_step": sum(measured) / len(measured),
        "peak_rss_gb": int(rss.read_text()) / 1024**2,
        "wall_s": wall,
        "steps": steps,
    }


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarize(results: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (config, length): median s/step, its min and max over repeats, median peak GB (failed runs: the error)."""
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        runs.setdefault((r["name"], r["length"]), []).append(r)
    out = {}
    for key, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[key] = {"error": rs[0]["error"]}
            continue
        times = [r["s_per_step"] for r in ok]
        out[key] = {
            "s_per_step": median(times),
            "min": min(times),
            "max": max(times),
            "peak_rss_gb": median([r["peak_rss_gb"] for r in ok]),
            "runs": len(ok),
        }
    return out


def report(results: list[dict[str, Any]], lengths: list[int]) -> str:
    by = summarize(results)
    lines = [
        "| config | " + " | ".join(f"{n // 1024}K s/step (min-max) | {n // 1024}K peak GB" for n in lengths) + " |",
        "| --- |" + " --- | --- |" * len(lengths),
    ]
    for name in CONFIGS:
        cells = []
        for n in lengths:
            r = by.get((name, n))
            if r is None:
                cells += ["", ""]
            elif "error" in r:
                cells += ["failed", "failed"]
            else:
                spread = f" ({r['min']:.2f}-{r['max']:.2f})" if r["runs"] > 1 else ""
                cells += [f"{r['s_per_step']:.2f}{spread}", f"{r['peak_rss_gb']:.2f}"]
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| ratio (of medians) | " + " | ".join(f"{n // 1024}K speed | {n // 1024}K memory" for n in lengths) + " |",
        "| --- |" + " --- | --- |" * len(lengths),
    ]
    for fast, slow, label in RATIOS:
        cells = []
        for n in lengths:
            a, b = by.get((fast, n)), by.get((slow, n))
            if not a or not b or "error" in a or "error" in b:
                cells += ["", ""]
                continue
            cells += [f"{b['s_per_step'] / a['s_per_step']:.2f}x", f"{100 * (1 - a['peak_rss_gb'] / b['peak_rss_gb']):.0f}% less"]
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=1, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=0, help="steps run before measuring (on CPU the first step is not slower)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration, interleaved")
    parser.add_argument("--response", type=int, default=256, help="response length in tokens")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "saves" / "bench")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    model = make_model(args.out, args)
    datasets = {n: make_data(args.out, model, n, args.warmup + args.steps, args.response) for n in args.lengths}
    runs = [(n, name) for n in args.lengths for name in args.only]
    results = []
    for rep in range(args.repeats):
        for length, name in runs[rep % len(runs) :] + runs[: rep % len(runs)]:  # rotated: no config always first
            r = run_one(args.out, model, datasets[length], length, name, args)
            results.append(r)
            shown = r.get("error") or f"{r['s_per_step']:.2f} s/step, peak {r['peak_rss_gb']:.2f} GB"
            print(f"[bench] round {rep + 1}/{args.repeats} {name:>22} @ {length:>6}: {shown}", flush=True)
    table = report(results, args.lengths)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + table)


if __name__ == "__main__":
    main()
