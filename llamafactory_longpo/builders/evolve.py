"""LongPO's iterative self-evolution: round k builds data at length L_k with model M_k, trains stage
``longpo`` on it, and the trained model is M_{k+1} (the paper: 128K -> 256K -> 512K).

Each round lives in ``<work_dir>/round_<k>/`` (data, dataset_info.json, train.yaml, logs, model); a
round with a ``DONE`` file is never redone, so a restarted recipe continues where it stopped, and an
interrupted build inside a round resumes its own output.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any, Optional

import yaml

from ..errors import ConfigError
from .longpo import LongPOBuildConfig, build_longpo

RECIPE_KEYS = {"base_model", "corpus", "work_dir", "engine", "build", "train", "rounds"}


def _train(cfg_path: str, log_path: str) -> None:
    cli = os.path.join(os.path.dirname(sys.executable), "llamafactory-cli")
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run([cli, "train", cfg_path], stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}); see {log_path}")


def _export(base: str, adapter: str, template: str, out: str, log_path: str) -> None:
    cfg = {
        "model_name_or_path": base,
        "adapter_name_or_path": adapter,
        "template": template,
        "finetuning_type": "lora",
        "export_dir": out,
    }
    path = f"{out}.export.yaml"
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    cli = os.path.join(os.path.dirname(sys.executable), "llamafactory-cli")
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run([cli, "export", path], stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"merging the LoRA adapter failed (exit {proc.returncode}); see {log_path}")


def run_recipe(recipe: dict[str, Any], log: Any = print, generator_factory: Optional[Any] = None) -> list[str]:
    """Run every round not yet done; returns the model of each round."""
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise ConfigError(f"evolve recipe: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(RECIPE_KEYS))}")
    for key in ("base_model", "corpus", "work_dir", "rounds"):
        if key not in recipe:
            raise ConfigError(f"evolve recipe: {key!r} is missing")
    engine = dict(recipe.get("engine") or {})
    build = dict(recipe.get("build") or {})
    train = dict(recipe.get("train") or {})
    model = recipe["base_model"]
    models = []
    for k, spec in enumerate(recipe["rounds"]):
        if "length" not in spec:
            raise ConfigError(f"evolve recipe: rounds[{k}].length is missing")
        length = int(spec["length"])
        folder = os.path.join(recipe["work_dir"], f"round_{k}")
        done = os.path.join(folder, "DONE")
        if os.path.exists(done):
            with open(done, encoding="utf-8") as fh:
                model = json.load(fh)["model"]
            log(f"[evolve] round {k} ({length} tokens) already done: {model}")
            models.append(model)
            continue
        os.makedirs(folder, exist_ok=True)
        name = f"longpo_round_{k}"
        build_cfg = LongPOBuildConfig(
            input=recipe["corpus"],
            output=os.path.join(folder, "data.jsonl"),
            model={**engine, "model_name_or_path": model},
            **{"min_doc_tokens": length // 2, "max_doc_tokens": length, **build, **spec.get("build", {})},
            dataset_name=name,
            dataset_info=os.path.join(folder, "dataset_info.json"),
        )
        log(f"[evolve] round {k}: building data at {length} tokens with {model}")
        generator = generator_factory(build_cfg.model) if generator_factory else None
        summary = build_longpo(build_cfg, generator=generator, log=log)
        del generator
        gc.collect()
        if summary["kept"] == 0:
            raise RuntimeError(f"round {k}: no record survived the filters; see {build_cfg.output}.summary.json")
        out_dir = os.path.join(folder, "model")
        cfg = {
            **train,
            "stage": "longpo",
            "do_train": True,
            "model_name_or_path": model,
            "dataset": name,
            "dataset_dir": folder,
            "output_dir": out_dir,
            "cutoff_len": train.get("cutoff_len", length + 4096),
            **({"policy_rope_theta": spec["policy_rope_theta"]} if "policy_rope_theta" in spec else {}),
        }
        cfg_path = os.path.join(folder, "train.yaml")
        with open(cfg_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg, fh, sort_keys=False)
        log(f"[evolve] round {k}: llamafactory-cli train {cfg_path}")
        _train(cfg_path, os.path.join(folder, "train.log"))
        if cfg.get("finetuning_type", "lora") == "lora":
            merged = os.path.join(folder, "merged")
            _export(model, out_dir, str(cfg.get("template", "default")), merged, os.path.join(folder, "export.log"))
            out_dir = merged
        with open(done, "w", encoding="utf-8") as fh:
            json.dump({"model": out_dir, "length": length, "data": summary}, fh, indent=2)
        model = out_dir
        models.append(model)
    return models
