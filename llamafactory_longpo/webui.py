"""LlamaBoard (web UI) support for the plugin stages."""

from __future__ import annotations

from typing import Any


def add_train_args(runner: Any, data: dict[Any, Any], args: dict[str, Any]) -> None:
    """Give ``longpo``/``solopo`` runs the preference controls that the board sends for ``dpo``.

    The toolkit only forwards ``pref_beta``/``pref_ftx``/``pref_loss`` when the stage is dpo or kto;
    plugin knobs may also be passed through the board's extra-arguments JSON box.
    """
    get = lambda elem_id: data[runner.manager.get_elem_by_id(elem_id)]  # noqa: E731
    args.setdefault("pref_beta", get("train.pref_beta"))
    args.setdefault("pref_ftx", get("train.pref_ftx"))
    args.setdefault("pref_loss", get("train.pref_loss"))
