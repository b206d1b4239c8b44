"""The planner's 7B table: Qwen2.5-7B, bf16, 8 GPUs of 80 GiB, ZeRO-3, full fine-tuning and LoRA.

For the toolkit's ``dpo`` (sigmoid, orpo), ``solopo`` (orpo, sigmoid) and ``longpo``: the predicted peak
per rank at 8K, 32K and 128K tokens with sequence parallel 1, 2 and 4 (the toolkit's ``dpo`` has none),
the step's FLOPs relative to ``dpo`` sigmoid, and the largest power-of-two length that fits 80 GiB.
SoLoPO's short rows are a quarter of the long ones (``short_cutoff_len``); every reference is the
plugin's default (cached log-probs) or, for the toolkit's ``dpo`` sigmoid, its own (a ZeRO-3 copy for full
fine-tuning, the disabled adapters for LoRA). One sample per device, 512 scored tokens per row.

    .venv/bin/python benchmarks/planner_table.py        # about 15 minutes on 2 CPU cores, no GPU

Writes saves/planner_table/results.json and prints the Markdown tables of BENCHMARKS.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "saves" / "planner_table"
GIB = 1 << 30
LENGTHS = (8192, 32768, 131072)
SEARCH = tuple(1 << k for k in range(12, 21))  # 4K .. 1M
DEVICE_GIB = 80.0
GPUS = 8

METHODS = {
    "dpo sigmoid": dict(stage="dpo", pref_loss="sigmoid"),
    "dpo orpo": dict(stage="dpo", pref_loss="orpo"),
    "solopo orpo": dict(stage="solopo", pref_loss="orpo"),
    "solopo sigmoid": dict(stage="solopo", pref_loss="sigmoid"),
    "longpo": dict(stage="longpo", pref_loss="sigmoid"),
}
BASE = dict(
    model_name_or_path="Qwen/Qwen2.5-7B-Instruct",
    flash_attn="fa2",
    do_train=True,
    dataset="solopo_demo",
    dataset_dir=str(ROOT),
    template="qwen",
    per_device_train_batch_size=1,
    gradient_accumulation_steps=8,
    bf16=True,
    output_dir="saves/planner_table/unused",
    deepspeed=str(ROOT / "examples" / "deepspeed" / "ds_z3_config.json"),
)


def combination(ft: str, knobs: dict, sp: int, folder: Path) -> tuple[dict, Optional[int]]:
    """Estimates at the tabled lengths (with FLOPs) and the largest power-of-two length that fits."""
    from llamafactory_longpo.planner.plan import estimate
    from llamafactory_longpo.planner.step import load_run_config

    cache: dict = {}

    def at(length: int, with_flops: bool) -> Any:
        if length not in cache or (with_flops and not cache[length].flops):
            raw = dict(BASE, **knobs, finetuning_type=ft, cutoff_len=length, short_cutoff_len=length // 4)
            if sp > 1:
                raw["sequence_parallel_size"] = sp
            path = folder / "run.yaml"
            path.write_text(yaml.safe_dump(raw))
            cache[length] = estimate(load_run_config(str(path)), length, GPUS, sp, DEVICE_GIB, flops=with_flops)
        return cache[length]

    rows = {length: at(length, True) for length in LENGTHS}
    # memory grows with length: from the longest tabled length that fits, walk up to the first miss
    fitting = [length for length in LENGTHS if rows[length].fits]
    largest = fitting[-1] if fitting else None
    for length in SEARCH:
        if length <= (largest or 0) or (largest is None and length > LENGTHS[0]):
            continue
        if not at(length, False).fits:
            break
        largest = length
    return rows, largest


def main() -> None:
    import argparse

    from llamafactory_longpo.planner import quiet

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="recompute these (e.g. 'full:dpo sigmoid'), keep the rest")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    if args.only:
        results = [
            r for r in json.loads((OUT / "results.json").read_text()) if f"{r['finetuning']}:{r['method']}" not in args.only
        ]
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        for ft in ("full", "lora"):
            for method, knobs in METHODS.items():
                for sp in (1, 2, 4):
                    if (knobs["stage"] == "dpo" and sp > 1) or (args.only and f"{ft}:{method}" not in args.only):
                        continue
                    rows, largest = combination(ft, knobs, sp, Path(tmp))
                    parts = {
                        str(length): dict(total=e.total, parts=e.parts, flops=e.flops, largest_part=e.largest)
                        for length, e in rows.items()
                    }
                    results.append(dict(finetuning=ft, method=method, sp=sp, largest=largest, rows=parts))
                    totals = ", ".join(f"{length}: {e.total / GIB:.1f} GiB" for length, e in rows.items())
                    print(f"{ft} {method} sp{sp}: {totals}; largest {largest}", file=sys.stderr, flush=True)
    order = {(ft, m): i for i, (ft, m) in enumerate((ft, m) for ft in ("full", "lora") for m in METHODS)}
    results.sort(key=lambda r: (order[(r["finetuning"], r["method"])], r["sp"]))
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results)


def print_tables(results: list[dict]) -> None:
    base = {
        (r["finetuning"], length): r["rows"][str(length)]["flops"]
        for r in results
        if r["method"] == "dpo sigmoid"
        for length in LENGTHS
    }
    for ft in ("full", "lora"):
        title = "Full fine-tuning" if ft == "full" else "LoRA"
        print(f"\n**{title}** (GiB per rank; FLOPs of the step relative to `dpo` sigmoid)\n")
        print("| method | SP | 8K | 32K | 128K | FLOPs 8K | FLOPs 32K | FLOPs 128K | largest that fits 80 GiB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in results:
            if r["finetuning"] != ft:
                continue
            cells = []
            for length in LENGTHS:
                row = r["rows"][str(length)]
                mark = "" if row["total"] <= DEVICE_GIB * GIB else " (no)"
                cells.append(f"{row['total'] / GIB:.1f}{mark}")
            flops = [f"{r['rows'][str(length)]['flops'] / base[(ft, length)]:.2f}" for length in LENGTHS]
            largest = f"{r['largest'] // 1024}K" if r["largest"] else "< 4K"
            print(f"| {r['method']} | {r['sp']} | " + " | ".join(cells) + " | " + " | ".join(flops) + f" | {largest} |")


if __name__ == "__main__":
    main()
