"""Reference log-probs computed once, before training, and cached on disk.

LongPO's reference only ever sees SHORT rows and never changes; SoLo-DPO's reference is frozen too. One
no-grad pass over the dataset gives every sample's reference log-prob sums, which become dataset
columns: training then runs no reference model and holds none in memory.

The cache file is named by a key over everything the numbers depend on: the exact token ids and labels
the reference scores, the reference model's identity (path, config, weight files), the template, the
compute dtype and the stage's reference options. A changed dataset or model gives another key, so a
stale cache is never read; a file whose stored key or size does not match is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from typing import Any, Optional

import torch

from ..errors import TrainingError

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "llamafactory_longpo", "ref_logps")


def _file_fingerprint(path: str, edge: int = 1 << 20) -> list[Any]:
    """Size plus a hash of the first and last MiB: cheap for 15 GB shards, changes when weights change."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read(edge))
        if size > edge:
            fh.seek(max(edge, size - edge))
            h.update(fh.read(edge))
    return [os.path.basename(path), size, h.hexdigest()]


def model_fingerprint(paths: Iterable[Optional[str]]) -> list[Any]:
    """Identity of a model folder (or hub id) and its adapters."""
    out: list[Any] = []
    for path in paths:
        if not path:
            continue
        if not os.path.isdir(path):
            out.append(path)
            continue
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name.endswith((".safetensors", ".bin", ".pt")) and os.path.isfile(full):
                out.append(_file_fingerprint(full))
            elif name in ("config.json", "adapter_config.json"):
                with open(full, encoding="utf-8") as fh:
                    out.append([name, hashlib.sha256(fh.read().encode()).hexdigest()])
    return out


def data_fingerprint(dataset: Any, columns: list[str]) -> str:
    """Hash of the token ids/labels the reference scores, row by row."""
    h = hashlib.sha256()
    for row in dataset.select_columns(columns):
        for col in columns:
            h.update(col.encode())
            h.update(json.dumps(row[col], separators=(",", ":")).encode())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _load(path: str, key: str, rows: int, keys: tuple[str, ...]) -> tuple[Optional[dict[str, list[float]]], str]:
    """The cached values, or ``None`` and why the file cannot be used (it is then recomputed and replaced).

    ``weights_only`` loading never runs code from the file, but a loadable file can still hold anything: every
    column is checked for its name, length, dtype and finiteness, since a NaN reference trains NaN gradients.
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, partial or unsafe file
        return None, f"unreadable ({type(err).__name__})"
    if not isinstance(blob, dict) or blob.get("key") != key or blob.get("rows") != rows:
        return None, "not a cache of this data and model"
    values = blob.get("values")
    if not isinstance(values, dict) or any(k not in values for k in keys):
        return None, f"lacks the columns {', '.join(keys)}"
    for k in keys:
        v = values[k]
        if not torch.is_tensor(v) or v.dtype != torch.float32 or tuple(v.shape) != (rows,):
            return None, f"column {k} is not {rows} float32 values"
        if not bool(torch.isfinite(v).all()):
            return None, f"column {k} holds NaN or infinite values"
    return {k: values[k].tolist() for k in keys}, ""


def _save(path: str, key: str, rows: int, values: dict[str, list[float]]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"key": key, "rows": rows, "values": {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}}, tmp)
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache


def _gathered(model: torch.nn.Module) -> Any:
    """Under ZeRO-3 the parameters are partitioned from load on, and this pass runs before DeepSpeed's engine
    (and its gathering hooks) exists: gather them for the pass (a full model per rank, for the pass only)."""
    from contextlib import nullcontext

    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def compute_values(
    trainer: Any, model: torch.nn.Module, dataset: Any, keys: tuple[str, ...], batch_size: int, desc: str
) -> dict[str, list[float]]:
    """One no-grad pass; under several processes each rank scores a shard in lockstep, then all gather.

    Under sequence parallelism the shard belongs to the rank's group (its ranks score the same rows together).
    """
    import torch.distributed as dist
    from tqdm import tqdm

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    sp = getattr(trainer, "sequence_parallel", None)
    shards, shard = (sp.dp_size, sp.dp_rank) if sp is not None else (world, rank)
    total = len(dataset)
    mine = list(range(shard, total, shards))
    steps = -(-len(range(0, total, shards)) // batch_size)  # same number of batches on every rank (ZeRO-3 needs lockstep)
    device = trainer.accelerator.device
    was_training = model.training
    model.eval()
    results: dict[int, dict[str, float]] = {}
    with torch.no_grad(), _gathered(model):
        for step in tqdm(range(steps), desc=desc, disable=rank != 0):
            idx = mine[step * batch_size : (step + 1) * batch_size] or [mine[0] if mine else 0]
            features = [dataset[i] for i in idx]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in trainer.data_collator(features).items()}
            values = trainer.compute_reference_values(model, batch)
            for j, i in enumerate(idx):
                if i in mine:
                    results[i] = {k: float(values[k][j]) for k in keys}
    if was_training:
        model.train()
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, results)
        results = {i: v for part in gathered for i, v in part.items()}
    return {k: [results[i][k] for i in range(total)] for k in keys}


def precompute_reference(
    trainer: Any,
    model: torch.nn.Module,
    *,
    model_paths: list[Optional[str]],
    template: str,
    cache_dir: Optional[str],
    batch_size: int,
    logger: Any,
) -> None:
    """Add the reference columns to the trainer's train/eval datasets, from the cache or one pass."""
    import torch.distributed as dist

    both = (
        bool(getattr(trainer.train_dataset, "column_names", None))
        and "long_rejected_input_ids" in trainer.train_dataset.column_names
    )
    keys = trainer.needed_reference_keys(both)
    if not keys:
        return
    cache_dir = cache_dir or DEFAULT_CACHE_DIR
    trainer.reference_cache = {}  # split -> (path, "hit" | "miss"), for logs and tests
    splits = {"train": trainer.train_dataset, "eval": trainer.eval_dataset}
    for split, dataset in splits.items():
        if dataset is None or isinstance(dataset, dict):
            continue
        scored = [c for c in dataset.column_names if c.endswith(("input_ids", "labels"))]
        parts = {
            "version": CACHE_VERSION,
            "data": data_fingerprint(dataset, scored),
            "model": model_fingerprint(model_paths),
            "template": template,
            "dtype": str(next(model.parameters()).dtype),
            "stage": trainer.stage,
            "keys": keys,
        }
        key = cache_key(parts)
        path = os.path.join(cache_dir, f"{key}.pt")
        values, why = _load(path, key, len(dataset), keys) if os.path.exists(path) else (None, "")
        trainer.reference_cache[split] = (path, "miss" if values is None else "hit")
        if values is None:
            if why:
                logger.warning_rank0(f"reference cache {path}: {why}; computing it again")
            logger.info_rank0(f"reference log-probs ({split}, {len(dataset)} samples): computing once, cache {path}")
            values = compute_values(trainer, model, dataset, keys, batch_size, f"Reference log-probs ({split})")
            bad = [i for i in range(len(dataset)) if not all(math.isfinite(values[k][i]) for k in keys)]
            if bad:
                raise TrainingError(
                    f"the reference model gives NaN or infinite log-probs for {len(bad)} {split} samples "
                    f"(first: sample {bad[0]}); check the reference model and its dtype"
                )
            if not dist.is_initialized() or dist.get_rank() == 0:
                _save(path, key, len(dataset), values)
            if dist.is_initialized():
                dist.barrier()
        else:
            logger.info_rank0(f"reference log-probs ({split}): read from cache {path}")
        for name, column in values.items():
            dataset = dataset.add_column(name, column)
        if split == "train":
            trainer.train_dataset = dataset
        else:
            trainer.eval_dataset = dataset
