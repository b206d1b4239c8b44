"""Offloaded checkpoints and tiled MLPs on a real CPU step: live-tensor peak, the planner's prediction, bytes moved,
and step time, side by side in one run.

A LongPO step (shared prefix, cached reference, full fine-tuning, float32) on a Qwen2-shaped model whose MLP is
16 times its hidden size (hidden 128, intermediate 2048, 2 layers, the tiny tokenizer's vocabulary), so the MLP's
intermediate tensors matter as they do in 7B models (18,944 / 3,584 = 5.3 times). For each length and variant:

- the real step's live-tensor peak (PyTorch's ``MemTracker`` on real tensors; offloaded copies are host memory
  and not counted), and the planner's prediction for it (traced on fake tensors at 1 and 2 layers);
- with offload, the bytes the step's hooks copied to the host and back against the planner's count;
- step time (forward and backward through the trainer's ``training_step``), the median of ``--repeats`` runs
  interleaved across the variants, at the first length.

    .venv/bin/python benchmarks/bench_memory_knobs.py    # about 20 minutes on 2 CPU cores

Writes benchmarks/results/cpu_memory_knobs.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "plain": {},
    "tiled MLP": {"s2l_tiled_mlp": True},
    "offloaded checkpoints": {"s2l_offload_activations": True},
    "both": {"s2l_tiled_mlp": True, "s2l_offload_activations": True},
}


def model_folder(tiny: Path, folder: Path, layers: int, hidden: int, intermediate: int) -> Path:
    config = json.loads((tiny / "config.json").read_text())
    config.update(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, layer_types=["full_attention"] * layers
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def run_config(model: Path, folder: Path, knobs: dict[str, Any], length: int) -> Any:
    from llamafactory_longpo.planner.step import load_run_config

    raw = yaml.safe_load((ROOT / "examples" / "tiny" / "longpo_tiny.yaml").read_text())
    raw.update(model_name_or_path=str(model), cutoff_len=length, **knobs)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_run_config(str(path))


def step_seconds(run: Any, length: int) -> float:
    """Forward and backward of one real step (the model built anew per call: one run's wiring at a time, as in
    training)."""
    from llamafactory_longpo.planner.plan import row_lengths
    from llamafactory_longpo.planner.step import autocast_context, step_setup

    layers = run.model_config.num_hidden_layers
    with step_setup(run, layers, row_lengths(run, length, 1, None), "sdpa") as setup:
        start = time.perf_counter()
        with autocast_context(run):
            setup.run_step()
        return time.perf_counter() - start


def main() -> None:
    from llamafactory_longpo.planner import quiet
    from llamafactory_longpo.planner.validate import cpu_check

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", type=Path, default=ROOT / ".cache" / "tiny", help="the tiny model (its config and tokenizer)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_memory_knobs.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {"model": vars(args) | {"tiny": str(args.tiny), "out": str(args.out)}, "memory": [], "time": {}}
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        model = model_folder(args.tiny, Path(tmp) / "model", args.layers, args.hidden, args.intermediate)
        for length in args.lengths:
            for name, knobs in VARIANTS.items():
                check = cpu_check(run_config(model, Path(tmp), knobs, length), length, allocator=False)
                row = dict(
                    length=length,
                    variant=name,
                    measured=check.measured,
                    predicted=check.predicted,
                    error=check.error,
                    moved=check.measured_moved,
                    predicted_moved=check.predicted_moved,
                )
                result["memory"].append(row)
                mib = 1 << 20
                print(
                    f"{length:>6} {name:<22} measured {check.measured / mib:8.1f} MiB, predicted {check.predicted / mib:8.1f} "
                    f"MiB ({check.error:+.1%}), moved {check.measured_moved / mib:.1f} MiB "
                    f"(planner {check.predicted_moved / mib:.1f} MiB)",
                    file=sys.stderr,
                    flush=True,
                )
        length = args.lengths[0]
        runs = {}
        for name, knobs in VARIANTS.items():
            (Path(tmp) / name).mkdir()
            runs[name] = run_config(model, Path(tmp) / name, knobs, length)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):  # interleaved: each round runs every variant once
            for name in VARIANTS:
                times[name].append(step_seconds(runs[name], length))
        base = statistics.median(times["plain"])
        for name, seconds in times.items():
            median = statistics.median(seconds)
            result["time"][name] = dict(seconds=seconds, median=median, ratio=median / base)
            print(f"time at {length}: {name:<22} median {median:.2f} s ({median / base:.2f}x plain)", file=sys.stderr)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
