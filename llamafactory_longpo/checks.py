"""Checks made before a command writes or loads anything, each failing as one :class:`ConfigError` line.

A run that fails after it started has often changed something already (an output folder's log, an evaluation's
results file), and under torchrun a failure in the workers is printed once per rank. What can be known from the
files alone is therefore checked here first: by the launching process before torchrun starts, by each worker
again (silently when it passes), and by the helper commands before they load a model.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigError

# any one of these holds a tokenizer's vocabulary (fast tokenizers, sentencepiece, GPT-2 BPE, WordPiece, tiktoken)
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)


def _looks_local(name: str) -> bool:
    """A path, not a hub id (``org/name``): hub ids have exactly one slash and no leading ``.``, ``/`` or ``~``."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep != "/" and os.sep in name


def check_model_folder(name: str, key: str = "model_name_or_path", tokenizer: bool = True) -> None:
    """A local model folder must exist and hold a ``config.json`` and, when ``tokenizer``, a tokenizer's files.

    Hub exports often carry only the weights and ``config.json``; transformers then builds an empty tokenizer,
    and training and evaluation run on empty text without an error. A hub id is left to the toolkit's download.
    """
    path = os.path.expanduser(name)
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise ConfigError(f"{key}: {name} is a file, not a model folder")
        if _looks_local(name):
            raise ConfigError(f"{key}: {name} does not exist")
        return
    files = set(os.listdir(path))
    missing = [] if "config.json" in files else ["config.json"]
    if tokenizer and not files.intersection(TOKENIZER_FILES) and not any(f.endswith(".tiktoken") for f in files):
        missing.append(f"a tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    if missing:
        held = ", ".join(sorted(files)[:6]) + (", ..." if len(files) > 6 else "") if files else "nothing"
        raise ConfigError(
            f"{key}: {name} lacks {' and '.join(missing)}; it holds {held}; copy the missing files from the model "
            "it was exported from"
        )


def check_run(raw: dict[str, Any]) -> dict[str, Any]:
    """The file checks of a ``longpo``/``solopo`` training run's arguments, made before anything is loaded."""
    if isinstance(raw.get("model_name_or_path"), str):
        check_model_folder(raw["model_name_or_path"])
    return raw
