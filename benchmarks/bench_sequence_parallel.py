"""Per-rank memory and step time of sequence parallelism: ``sequence_parallel_size`` 2 (two torchrun ranks,
gloo, DeepSpeed Ulysses) vs 1 (one process), same records, same model, measured side by side in one run.

Each rank writes its own peak RSS at the end of training (a diagnostic callback), so the table shows what
ONE rank holds. On CPU the ranks share the machine's cores, so step times say little; memory is the point.

    .venv/bin/python benchmarks/bench_sequence_parallel.py                         # longpo + solopo-orpo, 8K and 16K
    .venv/bin/python benchmarks/bench_sequence_parallel.py --lengths 4096 --only longpo
    .venv/bin/python benchmarks/bench_sequence_parallel.py --lengths 32768 --only longpo longpo-two-rows --sp 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_efficiency import ROOT, VENV_BIN, make_data, make_model, train_config  # noqa: E402

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "longpo": ("longpo", {"pref_loss": "sigmoid"}),
    # LongPO's chosen and rejected as two rows (the shared prefix off), for comparison with the packed pair
    "longpo-two-rows": ("longpo", {"pref_loss": "sigmoid", "s2l_shared_prefix": False}),
    "solopo-orpo": ("solopo", {"pref_loss": "orpo"}),
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(out: Path, model: Path, dataset: str, length: int, name: str, sp: int, args: argparse.Namespace) -> dict[str, Any]:
    stage, extra = CONFIGS[name]
    run_dir = out / f"{name}-{length}-sp{sp}"
    run_dir.mkdir(parents=True, exist_ok=True)
    config = train_config(model, stage, dataset, out, run_dir, length, args.steps, args.response, extra)
    if sp > 1:
        config.update(sequence_parallel_size=sp, ddp_backend="gloo")
    cfg = run_dir / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(config))
    times, memory = run_dir / "steps", run_dir / "memory"
    for f in run_dir.glob("steps.rank*"):
        f.unlink()
    env = dict(
        os.environ,
        LLAMAFACTORY_LONGPO_STEP_TIME_FILE=str(times),
        LLAMAFACTORY_LONGPO_PEAK_MEMORY_FILE=str(memory),
        DISABLE_VERSION_CHECK="1",
        HF_HUB_OFFLINE="1",
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    if sp > 1:
        env.update(FORCE_TORCHRUN="1", NNODES="1", NPROC_PER_NODE=str(sp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    start = time.perf_counter()
    command = [str(VENV_BIN / "llamafactory-cli"), "train", str(cfg)]
    proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    (run_dir / "log.txt").write_text(proc.stdout)
    if proc.returncode != 0:
        return {"name": name, "length": length, "sp": sp, "error": proc.stdout.strip().splitlines()[-1][:300]}
    ranks = [json.loads(Path(f"{memory}.rank{r}").read_text()) for r in range(sp)]
    steps = [json.loads(line)["seconds"] for line in Path(f"{times}.rank0").read_text().splitlines()]
    return {
        "name": name,
        "length": length,
        "sp": sp,
        "peak_rss_gb_per_rank": [r["peak_rss_gb"] for r in ranks],
        "s_per_step": sum(steps) / len(steps),
        "wall_s": wall,
    }


def report(results: list[dict[str, Any]]) -> str:
    lines = ["| method | long tokens | SP 1: peak RSS | SP 2: peak RSS per rank | per-rank ratio | SP 1 s/step | SP 2 s/step |"]
    lines.append("|---|---|---|---|---|---|---|")
    by = {(r["name"], r["length"], r["sp"]): r for r in results}
    for name, length in sorted({(r["name"], r["length"]) for r in results}):
        one, two = by.get((name, length, 1)), by.get((name, length, 2))
        ok_one, ok_two = one and "error" not in one, two and "error" not in two
        cells = [
            f"{one['peak_rss_gb_per_rank'][0]:.2f} GB" if ok_one else (one or {}).get("error", "-"),
            " / ".join(f"{g:.2f}" for g in two["peak_rss_gb_per_rank"]) + " GB" if ok_two else (two or {}).get("error", "-"),
            f"{max(two['peak_rss_gb_per_rank']) / one['peak_rss_gb_per_rank'][0]:.2f}" if ok_one and ok_two else "",
            f"{one['s_per_step']:.1f}" if ok_one else "",
            f"{two['s_per_step']:.1f}" if ok_two else "",
        ]
        lines.append(f"| {name} | {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=["longpo", "solopo-orpo"])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2], help="sequence-parallel sizes to run (ranks)")
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "saves" / "bench_sp")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = make_model(args.out, args)
    results = []
    for length in args.lengths:
        dataset = make_data(args.out, model, length, n=args.steps, response=args.response)
        for name in args.only:
            for sp in args.sp:
                r = run_one(args.out, model, dataset, length, name, sp, args)
                results.append(r)
                shown = r.get("error") or f"peak per rank {r['peak_rss_gb_per_rank']} GB, {r['s_per_step']:.1f} s/step"
                print(f"{name:12s} {length:6d} sp={sp}: {shown}", flush=True)
    table = report(results)
    print(table)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    suffix = "" if args.only == ["longpo", "solopo-orpo"] else "_" + "_".join(args.only)
    (ROOT / "benchmarks" / "results" / f"sequence_parallel_cpu{suffix}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
