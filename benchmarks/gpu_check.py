"""The checks only a GPU can run, on one H100 or H200, written to one JSON (``scripts/gpu_check.sh`` runs this).

1. ``validate``: the planner against the real step (``torch.cuda.max_memory_allocated``), LongPO and SoLo-ORPO at
   Qwen2.5-7B's width with 4 layers, bf16, offloaded checkpoints and tiled MLPs on, at 32K and 128K tokens; with
   each step's time, tokens/s and MFU (the planner's FLOPs count over the step's seconds and the card's dense bf16
   peak).
2. ``shared_prefix_flash``: LongPO's shared prefix on the real flash-attention 2 kernel against SDPA (same model,
   same batch, bf16): the loss and the gradients' relative difference.
3. ``train_step``: one real ``llamafactory-cli train`` step of the tiny LongPO example on the GPU (bf16).

Each check is written as soon as it ends (a check that fails records its one-line error and the others still
run), so a run cut short still leaves what it measured.

    python benchmarks/gpu_check.py --out saves/gpu_check/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # NVIDIA's datasheets, dense (no sparsity)
LENGTHS = (32768, 131072)
KNOBS = dict(s2l_offload_activations=True, s2l_tiled_mlp=True)


def _command(name: str) -> str:
    """A console script of this environment (next to its Python)."""
    return str(Path(sys.executable).with_name(name))


def peak_tflops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), float("nan"))


def _config(folder: Path, stage: dict[str, Any], length: int, **extra: Any) -> str:
    raw = dict(
        model_name_or_path="Qwen/Qwen2.5-7B-Instruct",
        do_train=True,
        finetuning_type="full",
        dataset="longpo_demo" if stage["stage"] == "longpo" else "solopo_demo",
        dataset_dir=str(ROOT),
        template="qwen",
        cutoff_len=length,
        short_cutoff_len=length // 4,
        per_device_train_batch_size=1,
        bf16=True,
        output_dir=str(folder / "unused"),
        **stage,
        **extra,
    )
    path = folder / f"{stage['stage']}_{length}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def validate() -> dict[str, Any]:
    from llamafactory_longpo.planner import quiet
    from llamafactory_longpo.planner.step import load_run_config
    from llamafactory_longpo.planner.validate import GPU_LAYERS, gpu_check

    rows = {}
    stages = {"longpo": dict(stage="longpo", pref_loss="sigmoid"), "solopo orpo": dict(stage="solopo", pref_loss="orpo")}
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        for name, stage in stages.items():
            for length in LENGTHS:
                check = gpu_check(load_run_config(_config(Path(tmp), stage, length, **KNOBS)), length, layers=GPU_LAYERS)
                tokens = length * (1 if stage["stage"] == "longpo" else 1.5)  # SoLoPO: the long row and two short quarter rows
                rows[f"{name} {length}"] = dict(
                    layers=GPU_LAYERS,
                    predicted_gib=check.predicted / 2**30,
                    measured_gib=check.measured / 2**30,
                    error=check.error,
                    seconds=check.seconds,
                    tokens_per_s=tokens / check.seconds,
                    mfu=check.flops / check.seconds / (peak_tflops() * 1e12),
                )
                torch.cuda.empty_cache()
    return rows


def shared_prefix_flash() -> dict[str, Any]:
    """The same LongPO step with ``flash_attention_2`` and with ``sdpa``: loss, and the largest relative difference
    of a parameter's gradient (bf16 kernels: a few 1e-3 is the precision; a wrong mask moves values by percent)."""
    import flash_attn  # noqa: F401 - the check needs the real kernel

    from llamafactory_longpo.planner import quiet
    from llamafactory_longpo.planner.plan import row_lengths
    from llamafactory_longpo.planner.step import autocast_context, load_run_config, step_setup

    results = {}
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        path = _config(Path(tmp), dict(stage="longpo", pref_loss="sigmoid"), 8192)
        run = load_run_config(path)
        for attention in ("flash_attention_2", "sdpa"):
            torch.manual_seed(0)
            with step_setup(run, 2, row_lengths(run, 8192, 1, None), attention, device=torch.device("cuda")) as setup:
                setup.model.to("cuda", dtype=torch.bfloat16)
                setup.batch = {k: v.to("cuda") for k, v in setup.batch.items()}
                with autocast_context(run, "cuda"):
                    loss = setup.trainer.compute_loss(setup.model, setup.batch)
                loss.backward()
                grads = {n: p.grad.float().clone() for n, p in setup.model.named_parameters() if p.grad is not None}
                results[attention] = (float(loss), grads)
    (flash_loss, flash), (sdpa_loss, sdpa) = results["flash_attention_2"], results["sdpa"]
    rel = max(float((flash[n] - sdpa[n]).norm() / sdpa[n].norm().clamp_min(1e-12)) for n in sdpa)
    loss_rel = abs(flash_loss - sdpa_loss) / abs(sdpa_loss)
    return dict(loss_flash=flash_loss, loss_sdpa=sdpa_loss, loss_rel_diff=loss_rel, max_grad_rel_diff=rel)


def train_step() -> dict[str, Any]:
    tiny = ROOT / ".cache" / "tiny"
    if not (tiny / "model.safetensors").exists():
        subprocess.run([_command("llamafactory-longpo"), "make-tiny-model", "--force", str(tiny)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        args = ["train", str(ROOT / "examples" / "tiny" / "longpo_tiny.yaml"), f"model_name_or_path={tiny}", f"output_dir={out}"]
        args += ["max_steps=1", "bf16=true", "s2l_offload_activations=true", "s2l_tiled_mlp=true", "report_to=none"]
        start = time.perf_counter()
        proc = subprocess.run([_command("llamafactory-cli"), *args], cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode:
            return dict(returncode=proc.returncode, tail=(proc.stdout + proc.stderr)[-2000:])
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return dict(returncode=0, seconds=seconds, first_log=history[0])


CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "validate": validate,
    "shared_prefix_flash": shared_prefix_flash,
    "train_step": train_step,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "saves" / "gpu_check" / "gpu_check.json")
    parser.add_argument("--only", nargs="*", choices=list(CHECKS), default=list(CHECKS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "transformers", "llamafactory", "deepspeed", "flash-attn", "trl", "peft"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    result: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(), peak_bf16_tflops=peak_tflops(), versions=versions, checks={}
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        start = time.perf_counter()
        try:
            result["checks"][name] = CHECKS[name]()
        except Exception as err:  # noqa: BLE001 - one check's failure is recorded; the others still run
            if os.environ.get("GPU_CHECK_TRACEBACK"):
                traceback.print_exc()
            result["checks"][name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        result["checks"][name]["wall_s"] = time.perf_counter() - start
        args.out.write_text(json.dumps(result, indent=1))
        print(f"gpu_check: {name} done in {result['checks'][name]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
