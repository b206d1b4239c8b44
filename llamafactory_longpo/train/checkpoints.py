"""Checkpoints written whole or not at all, and recording which run wrote them.

transformers writes a checkpoint's files one by one into ``checkpoint-N`` itself: a full disk or a kill part-way
leaves a folder that looks like the newest checkpoint, and the next run auto-resumes from it and fails.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from safetensors import SafetensorError
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..checks import RUN_RECORD, write_failure
from ..errors import TrainingError
from .callbacks import last_checkpoint_note

STAGING = ".partial-checkpoint"  # a checkpoint is written in this folder of output_dir, then renamed into place


class AtomicCheckpointMixin:
    """Trainer methods (mixed in before the toolkit's trainer): ``checkpoint-N`` is staged, then renamed into place.

    Reads the trainer's ``identity`` (:func:`..checks.run_identity`, written into each checkpoint; ``None``: not
    recorded) and keeps ``_staging`` (True while a save writes).
    """

    identity: Any = None
    _staging: bool = False

    def _get_output_dir(self, trial: Any) -> str:
        """The run's folder; while :meth:`_save_checkpoint` writes, the staging folder inside it."""
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write ``checkpoint-N`` whole or not at all.

        transformers writes a checkpoint's files one by one into ``checkpoint-N`` itself: a full disk or a kill
        part-way leaves a folder that looks like the newest checkpoint. Here the Trainer's own save writes into
        ``<output_dir>/.partial-checkpoint/checkpoint-N`` (:meth:`_get_output_dir` points it there), every rank
        waits, and the saving rank renames the folder into place; ``rename(2)`` within one file system is atomic
        (POSIX), so ``checkpoint-N`` appears complete or not at all. A failed write stops the run with one line
        naming the checkpoint and why (:func:`..checks.write_failure`), and the staging folder is removed.
        """
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = os.path.join(run_dir, STAGING), os.path.join(run_dir, name)
        staged = os.path.join(staging, name)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while it saved
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
            if self.state.best_model_checkpoint == staged:  # the Trainer recorded the folder it wrote to
                self.state.best_model_checkpoint = final
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
            if self.args.should_save and self.identity is not None:  # what a resumed run is compared with
                with open(os.path.join(staged, RUN_RECORD), "w", encoding="utf-8") as fh:
                    json.dump(self.identity, fh)
        except (OSError, RuntimeError, SafetensorError) as err:
            why = write_failure(err, staged)
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise TrainingError(f"saving checkpoint {final} failed: {why}; {last_checkpoint_note(run_dir)}") from None
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.isdir(final):  # the same step, saved by an earlier run into this output_dir
                os.replace(final, os.path.join(staging, "replaced"))
            os.replace(staged, final)
            shutil.rmtree(staging)
            # the Trainer rotated its staging folder (one checkpoint: nothing to delete); the run folder's turn
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
