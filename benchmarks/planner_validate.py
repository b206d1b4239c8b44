"""The memory planner against real CPU steps: prediction vs live-tensor peak (and RSS), 10 configurations.

Each configuration runs in its own process (so that peak RSS is its own): the planner predicts the peak
from fake-tensor traces at 2 and 3 layers with the model's own attention (CPU SDPA), then the same step
(trainer, batch, optimizer with its states) runs on real tensors at full depth under the same tracker.
Sequence-parallel rows run on 2 CPU ranks (gloo, DeepSpeed Ulysses) and report rank 0.

    .venv/bin/python benchmarks/planner_validate.py                 # all, about 10 minutes on 2 cores
    .venv/bin/python benchmarks/planner_validate.py --only longpo-full-shared-4k

Writes saves/planner_validate/results.json and prints a Markdown table (MiB): the prediction, the real
step's live-tensor peak under the tracker, and the CPU allocator's peak for the same step (profiler memory
events, no tracker), each with the prediction's error, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "saves" / "planner_validate"

# a small Qwen2 shape: wide enough that activations, not the weights, make most of the peak
SMALL = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2, vocab_size=8192)

CONFIGS: dict[str, dict] = {
    "dpo-sigmoid-full-2k": dict(base="solo_orpo_tiny.yaml", stage="dpo", pref_loss="sigmoid", cutoff_len=2048, layers=6),
    "dpo-orpo-lora-4k": dict(base="solo_orpo_tiny.yaml", stage="dpo", pref_loss="orpo", finetuning_type="lora", cutoff_len=4096),
    "solopo-orpo-full-4k": dict(base="solo_orpo_tiny.yaml", cutoff_len=4096, short_cutoff_len=1024),
    "solopo-sigmoid-lora-live-ref-8k": dict(
        base="solo_orpo_tiny.yaml", pref_loss="sigmoid", finetuning_type="lora", s2l_precompute_ref=False, cutoff_len=8192
    ),
    "solopo-orpo-full-16k": dict(base="solo_orpo_tiny.yaml", cutoff_len=16384, short_cutoff_len=2048, layers=4, batch=1),
    "longpo-full-shared-4k": dict(base="longpo_tiny.yaml", cutoff_len=4096, batch=1),
    "longpo-full-noshared-4k": dict(base="longpo_tiny.yaml", cutoff_len=4096, s2l_shared_prefix=False, batch=1),
    "longpo-lora-noshared-8k": dict(
        base="longpo_tiny.yaml", finetuning_type="lora", cutoff_len=8192, s2l_shared_prefix=False, batch=1
    ),
    "solopo-orpo-full-8k-sp2": dict(base="solo_orpo_tiny.yaml", cutoff_len=8192, short_cutoff_len=1024, sp=2, batch=1),
    "longpo-full-8k-sp2": dict(base="longpo_tiny.yaml", cutoff_len=8192, sp=2, batch=1),
}


def write_config(name: str, folder: Path) -> tuple[Path, dict]:
    spec = dict(CONFIGS[name])
    base, layers, sp, batch = spec.pop("base"), spec.pop("layers", 6), spec.pop("sp", 1), spec.pop("batch", 2)
    model = json.loads((ROOT / ".cache" / "tiny" / "config.json").read_text())
    model.update(SMALL, num_hidden_layers=layers, layer_types=["full_attention"] * layers, tie_word_embeddings=False)
    (folder / "model").mkdir(parents=True, exist_ok=True)
    (folder / "model" / "config.json").write_text(json.dumps(model))
    raw = yaml.safe_load((ROOT / "examples" / "tiny" / base).read_text())
    raw.update(spec, model_name_or_path=str(folder / "model"), per_device_train_batch_size=batch, flash_attn="sdpa")
    if sp > 1:
        raw["sequence_parallel_size"] = sp
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, dict(layers=layers, sp=sp, batch=batch, length=raw["cutoff_len"])


def run_one(name: str, folder: Path) -> dict:
    """In this process (one rank of it under torchrun): prediction, then the real step."""
    import resource

    import torch.distributed as dist

    from llamafactory_longpo.planner import quiet
    from llamafactory_longpo.planner.plan import estimate, row_lengths, traced_step
    from llamafactory_longpo.planner.step import load_run_config, step_setup
    from llamafactory_longpo.planner.validate import allocator_peak

    path, info = write_config(name, folder)
    sp = info["sp"]
    with quiet():
        run = load_run_config(str(path))
        predicted = estimate(run, info["length"], gpus=sp, sp=sp, attention="sdpa")
        layers = run.model_config.num_hidden_layers
        with step_setup(run, layers, row_lengths(run, info["length"], 1, None), "sdpa", sequence_parallel_size=sp) as setup:
            start = time.time()
            measured = traced_step(run, setup, layers)
            allocated = allocator_peak(run, setup)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = dict(
        name=name,
        **info,
        predicted=predicted.total,
        parts={k: round(v) for k, v in predicted.parts.items()},
        measured=measured.peak,
        allocated=allocated,
        rss=rss,
        error=(predicted.total - measured.peak) / measured.peak,
        allocator_error=(predicted.total - allocated) / allocated,
        step_seconds=round(time.time() - start, 1),
    )
    if sp > 1 and dist.get_rank() != 0:
        return {}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_one(args.one, Path(args.folder))
        if result:
            print("RESULT " + json.dumps(result), flush=True)
        return
    OUT.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", DISABLE_VERSION_CHECK="1")
    results = []
    for name in args.only or CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            script = [__file__, "--one", name, "--folder", tmp]
            if CONFIGS[name].get("sp", 1) > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(CONFIGS[name]["sp"]), *script]
            else:
                cmd = [sys.executable, *script]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if not found:
                print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            results.append(json.loads(found[0][7:]))
            r = results[-1]
            mib = (r["predicted"] / 2**20, r["measured"] / 2**20)
            print(f"{name}: predicted {mib[0]:.1f} MiB, live peak {mib[1]:.1f} MiB ({r['error']:+.1%})", flush=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| configuration | layers | tokens | SP | predicted | live tensors | error | allocator | error | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['name']} | {r['layers']} | {r['length']:,} | {r['sp']} | {r['predicted'] / 2**20:.1f} | "
            f"{r['measured'] / 2**20:.1f} | {r['error']:+.1%} | {r['allocated'] / 2**20:.1f} | "
            f"{r['allocator_error']:+.1%} | {r['rss'] / 2**20:.0f} |"
        )


if __name__ == "__main__":
    main()
