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
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch

from ..errors import TrainingError
from .zero3 import gathered_model

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


def compute_values(
    model: torch.nn.Module,
    dataset: Any,
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
    score: Callable[[torch.nn.Module, dict[str, Any]], dict[str, torch.Tensor]],
    *,
    keys: tuple[str, ...],
    batch_size: int,
    device: torch.device,
    shards: tuple[int, int],
    desc: str,
) -> dict[str, list[float]]:
    """One no-grad pass: ``score`` on batches that ``collate`` makes of the samples of this rank's shard.

    ``shards`` = (count, index): with several processes each shard is scored by its ranks in lockstep (the
    same number of batches everywhere, which ZeRO-3's gathers need), then every rank gathers all values.
    Under sequence parallelism a shard belongs to a group, whose ranks score the same rows together.
    """
    import torch.distributed as dist
    from tqdm import tqdm

    count, index = shards
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    total = len(dataset)
    mine = list(range(index, total, count))
    steps = -(-len(range(0, total, count)) // batch_size)
    was_training = model.training
    model.eval()
    results: dict[int, dict[str, float]] = {}
    with torch.no_grad(), gathered_model(model):  # under ZeRO-3 the pass runs before the engine exists
        for step in tqdm(range(steps), desc=desc, disable=world > 1 and dist.get_rank() != 0):
            idx = mine[step * batch_size : (step + 1) * batch_size] or [mine[0] if mine else 0]
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([dataset[i] for i in idx]).items()}
            values = score(model, batch)
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


def cached_values(
    parts: dict[str, Any],
    rows: int,
    keys: tuple[str, ...],
    cache_dir: Optional[str],
    compute: Callable[[], dict[str, list[float]]],
    what: str,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> tuple[dict[str, list[float]], str, str]:
    """The values stored under the key of ``parts``, or ``compute()`` checked and stored there (rank 0 writes).

    Returns the values, the cache file and ``"hit"`` or ``"miss"``. ``what`` names the samples in the error a
    non-finite reference raises; ``log`` hears where the values come from, ``warn`` why a file could not be used.
    """
    import torch.distributed as dist

    key = cache_key({"version": CACHE_VERSION, **parts})
    path = os.path.join(cache_dir or DEFAULT_CACHE_DIR, f"{key}.pt")
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    values, why = None, ""
    if (not distributed or dist.get_rank() == 0) and os.path.exists(path):
        values, why = _load(path, key, rows, keys)
    if distributed:  # one decision for all ranks: with node-local caches, the others may lack (or differ in) the file
        box = [values, why]
        dist.broadcast_object_list(box, src=0)
        values, why = box
    if values is not None:
        log(f"reference log-probs ({what}): read from cache {path}")
        return values, path, "hit"
    if why:
        warn(f"reference cache {path}: {why}; computing it again")
    log(f"reference log-probs ({rows} {what}): computing once, cache {path}")
    values = compute()
    bad = [i for i in range(rows) if not all(math.isfinite(values[k][i]) for k in keys)]
    if bad:
        raise TrainingError(
            f"the reference model gives NaN or infinite log-probs for {len(bad)} {what} "
            f"(first: sample {bad[0]}); check the reference model and its dtype"
        )
    if not distributed or dist.get_rank() == 0:
        _save(path, key, rows, values)
    if distributed:
        dist.barrier()
    return values, path, "miss"


def precompute_reference(
    trainer: Any,
    model: torch.nn.Module,
    *,
    model_paths: list[Optional[str]],
    template: str,
    cache_dir: Optional[str],
    batch_size: int,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    """Before training: every sample's reference values become columns of ``trainer``'s train/eval datasets, from the
    cache or one no-grad pass of the frozen reference (:meth:`..trainer.ShortToLongTrainer.compute_reference_values`);
    then the trainer keeps no reference model. ``log`` and ``warn``: as in :func:`cached_values`."""
    import dataclasses

    plan = trainer.plan
    keys = plan.reference
    live = dataclasses.replace(trainer.data_collator, plan=plan.live())  # the pass scores the reference rows
    sp = trainer.sequence_parallel
    shards = (sp.dp_size, sp.dp_rank) if sp is not None else (trainer.args.world_size, trainer.args.process_index)

    def with_columns(dataset: Any, split: str) -> Any:
        scored = [c for c in dataset.column_names if c.endswith(("input_ids", "labels"))]
        parts = {
            "data": data_fingerprint(dataset, scored),
            "model": model_fingerprint(model_paths),
            "template": template,
            "dtype": str(next(model.parameters()).dtype),
            "stage": plan.target,
            "keys": keys,
        }

        def compute() -> dict[str, list[float]]:
            return compute_values(
                model,
                dataset,
                live,
                trainer.compute_reference_values,
                keys=keys,
                batch_size=batch_size,
                device=trainer.accelerator.device,
                shards=shards,
                desc=f"Reference log-probs ({split})",
            )

        values, path, status = cached_values(parts, len(dataset), keys, cache_dir, compute, f"{split} samples", log, warn)
        trainer.reference_cache[split] = (path, status)
        for name, column in values.items():
            dataset = dataset.add_column(name, column)
        return dataset

    if trainer.train_dataset is not None:
        trainer.train_dataset = with_columns(trainer.train_dataset, "train")
    if isinstance(trainer.eval_dataset, dict):  # eval_on_each_dataset: every member is scored on its own
        trainer.eval_dataset = {name: with_columns(d, f"eval {name}") for name, d in trainer.eval_dataset.items()}
    elif trainer.eval_dataset is not None:
        trainer.eval_dataset = with_columns(trainer.eval_dataset, "eval")
    trainer.ref_model = trainer.wiring.ref_model = None  # training reads the columns: no reference model is kept
