"""The planner at 128K-2M tokens: what offloaded checkpoints, tiled MLPs and sequence parallelism past the head limit
each buy, alone and together.

Qwen2.5-7B, bf16, one node of 8 x 80 GiB, the shipped example's ZeRO-3 with optimizer and parameter offload
(``examples/deepspeed/ds_z3_offload_config.json``), one sample per device, 512 scored tokens per row, SoLoPO's short
rows a quarter of the long ones. A row fits when the predicted peak is within 72 GiB (80 GiB less 10% for what the
planner does not model) and the node's host memory within 1.5 TiB. Rows: ``longpo``, ``solopo`` orpo and the
toolkit's ``dpo`` sigmoid (which runs none of the parts and no sequence parallelism), with none of the parts
(sequence parallel 4, the most Ulysses took for 28 heads / 4 KV heads before the heads were padded), each part
alone, and all of them; full fine-tuning and LoRA. Then Llama-3.1-8B on the same node and Qwen2.5-72B on 4 nodes
(there also with sequence parallel 16, a row over two nodes).
Memory grows with length, so a row is traced up to its first length that does not fit; longer ones are marked
``-`` (they do not fit either).

    .venv/bin/python benchmarks/planner_scale.py                 # all rows; resumes from saves/planner_scale/
    .venv/bin/python benchmarks/planner_scale.py --part 1/2      # every second row, from the second: two processes
    .venv/bin/python benchmarks/planner_scale.py --print         # the Markdown tables from the saved results

Each process writes saves/planner_scale/results*.json after every row; at the end (and with ``--print``) all
of them are merged into benchmarks/results/planner_scale.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SAVES = ROOT / "saves" / "planner_scale"
FINAL = ROOT / "benchmarks" / "results" / "planner_scale.json"
GIB = 1 << 30
LENGTHS = (131072, 262144, 524288, 1048576, 2097152)
DEVICE_GIB = 72.0  # 80 GiB less 10% for what is not modelled
HOST_GIB = 1536.0
OFFLOAD = dict(s2l_offload_activations=True)
TILED = dict(s2l_tiled_mlp=True)

METHODS = {
    "longpo": dict(stage="longpo", pref_loss="sigmoid"),
    "solopo orpo": dict(stage="solopo", pref_loss="orpo"),
    "dpo sigmoid": dict(stage="dpo", pref_loss="sigmoid"),
}
# variant -> (sequence parallel size, knobs)
VARIANTS: dict[str, tuple[int, dict]] = {
    "none (SP 4)": (4, {}),
    "offloaded checkpoints": (4, OFFLOAD),
    "tiled MLP": (4, TILED),
    "SP 8": (8, {}),  # Qwen2.5-7B: 28 query heads padded to 32
    "all (SP 8)": (8, {**OFFLOAD, **TILED}),
    "all (SP 16)": (16, {**OFFLOAD, **TILED}),  # across two nodes: each rank offloads half as much
}
# (model, GPUs, methods, fine-tuning, variants)
ROWS: list[tuple[str, int, tuple[str, ...], str, tuple[str, ...]]] = [
    ("Qwen/Qwen2.5-7B-Instruct", 8, ("longpo", "solopo orpo"), "full", tuple(VARIANTS)[:5]),
    ("Qwen/Qwen2.5-7B-Instruct", 8, ("dpo sigmoid",), "full", ("none (SP 4)",)),
    ("Qwen/Qwen2.5-7B-Instruct", 8, ("longpo", "solopo orpo"), "lora", ("none (SP 4)", "all (SP 8)")),
    ("Qwen/Qwen2.5-7B-Instruct", 8, ("dpo sigmoid",), "lora", ("none (SP 4)",)),
    ("meta-llama/Llama-3.1-8B-Instruct", 8, ("longpo", "solopo orpo"), "full", ("SP 8", "all (SP 8)")),
    ("Qwen/Qwen2.5-72B-Instruct", 32, ("longpo", "solopo orpo"), "full", ("SP 8", "all (SP 8)")),
    ("Qwen/Qwen2.5-72B-Instruct", 32, ("longpo", "solopo orpo"), "full", ("all (SP 16)",)),
]
TEMPLATES = {"Qwen": "qwen", "meta-llama": "llama3"}


def row_config(model: str, method: str, ft: str, variant: str, length: int) -> dict[str, Any]:
    sp, knobs = VARIANTS[variant]
    stage = METHODS[method]["stage"]
    raw = dict(
        model_name_or_path=model,
        flash_attn="fa2",
        do_train=True,
        dataset="solopo_demo",
        dataset_dir=str(ROOT),
        template=TEMPLATES[model.split("/")[0]],
        per_device_train_batch_size=1,
        gradient_accumulation_steps=8,
        bf16=True,
        output_dir="saves/planner_scale/unused",
        deepspeed=str(ROOT / "examples" / "deepspeed" / "ds_z3_offload_config.json"),
        finetuning_type=ft,
        cutoff_len=length,
        short_cutoff_len=length // 4,
        **METHODS[method],
    )
    if stage != "dpo":
        raw.update(knobs, sequence_parallel_size=sp)
    return raw


def one_row(model: str, gpus: int, method: str, ft: str, variant: str, folder: Path) -> dict[str, Any]:
    """Estimates at each length up to the first that does not fit."""
    from llamafactory_longpo.planner.plan import Node, estimate
    from llamafactory_longpo.planner.step import load_run_config

    cells: dict[str, Any] = {}
    for length in LENGTHS:
        raw = row_config(model, method, ft, variant, length)
        path = folder / "run.yaml"
        path.write_text(yaml.safe_dump(raw))
        run = load_run_config(str(path))
        sp = int(raw.get("sequence_parallel_size", 1))
        e = estimate(run, length, gpus, sp, DEVICE_GIB, node=Node(8, HOST_GIB))
        cells[str(length)] = dict(
            gpu=e.total,
            largest_part=e.largest,
            host_node=e.host_per_node,
            flops=e.flops,
            pcie_s=e.pcie_seconds,
            compute_s=e.compute_seconds,
            fits=bool(e.fits and e.host_fits),
        )
        line = f"  {length:>9,}: {e.total / GIB:6.1f} GiB, host {e.host_per_node / GIB:6.1f} GiB/node"
        print(line, file=sys.stderr, flush=True)
        if not cells[str(length)]["fits"]:
            break
    return cells


def main() -> None:
    import argparse

    from llamafactory_longpo.planner import quiet

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the tables of the saved results and stop")
    parser.add_argument("--part", default="0/1", help="K/N: this process traces rows K, K+N, K+2N, ... (default 0/1)")
    args = parser.parse_args()
    part, parts = (int(x) for x in args.part.split("/"))
    SAVES.mkdir(parents=True, exist_ok=True)
    if not args.print:
        out = SAVES / f"results-{part}of{parts}.json"
        mine: list[dict] = json.loads(out.read_text()) if out.exists() else []
        done = {_key(r) for path in SAVES.glob("results*.json") for r in json.loads(path.read_text())}
        todo = [
            (model, gpus, method, ft, variant)
            for model, gpus, methods, ft, variants in ROWS
            for method in methods
            for variant in variants
        ]
        with quiet(), tempfile.TemporaryDirectory() as tmp:
            for model, gpus, method, ft, variant in todo[part::parts]:
                if (model, method, ft, variant) in done:
                    continue
                print(f"{model} {method} {ft} {variant}", file=sys.stderr, flush=True)
                cells = one_row(model, gpus, method, ft, variant, Path(tmp))
                mine.append(dict(model=model, gpus=gpus, method=method, finetuning=ft, variant=variant, cells=cells))
                out.write_text(json.dumps(mine, indent=1))
    merged = {_key(r): r for path in sorted(SAVES.glob("results*.json")) for r in json.loads(path.read_text())}
    order = [(m, me, ft, v) for m, _, methods, ft, variants in ROWS for me in methods for v in variants]
    results = [merged[key] for key in order if key in merged]
    FINAL.write_text(json.dumps(results, indent=1))
    print_tables(results)


def _key(row: dict) -> tuple[str, str, str, str]:
    return row["model"], row["method"], row["finetuning"], row["variant"]


def _verdict(cell: dict[str, Any]) -> str:
    """'' when the cell fits, ' (no)' over the GPU's limit, ' (host)' within it but over the node's host memory."""
    if cell["fits"]:
        return ""
    return " (no)" if cell["gpu"] > DEVICE_GIB * GIB else f" (host {cell['host_node'] / GIB:,.0f} GiB)"


def _largest(cells: dict[str, Any]) -> str:
    fitting = [int(k) for k, c in cells.items() if c["fits"]]
    return f"{max(fitting) // 1024:,}K" if fitting else "< 128K"


def print_tables(results: list[dict]) -> None:
    heads = " | ".join(f"{n // 1024:,}K" for n in LENGTHS)
    for model in dict.fromkeys(r["model"] for r in results):
        for ft in ("full", "lora"):
            rows = [r for r in results if r["model"] == model and r["finetuning"] == ft]
            if not rows:
                continue
            gpus = rows[0]["gpus"]
            print(f"\n**{model.split('/')[1]}, {'full fine-tuning' if ft == 'full' else 'LoRA'}, {gpus} GPUs** (GiB per GPU)\n")
            detail = "at the largest: host GiB / node, step TFLOPs, PCIe s, compute s"
            print(f"| method | parts | {heads} | largest that fits | {detail} |")
            print("| --- | --- | " + " | ".join("---" for _ in LENGTHS) + " | --- | --- |")
            for r in rows:
                cells = r["cells"]
                shown = []
                for n in LENGTHS:
                    c = cells.get(str(n))
                    shown.append("-" if c is None else f"{c['gpu'] / GIB:.1f}{_verdict(c)}")
                fitting = [c for c in cells.values() if c["fits"]]
                at = fitting[-1] if fitting else None
                detail = (
                    f"{at['host_node'] / GIB:,.0f}, {at['flops'] / 1e12:,.0f}, {at['pcie_s']:.1f}, {at['compute_s']:,.0f}"
                    if at
                    else "-"
                )
                parts = "(the toolkit runs none)" if r["method"].startswith("dpo") else r["variant"]
                print(f"| {r['method']} | {parts} | " + " | ".join(shown) + f" | {_largest(cells)} | {detail} |")


if __name__ == "__main__":
    main()
