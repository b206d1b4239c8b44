"""YAML read the way LLaMA-Factory reads it.

``llamafactory-cli train x.yaml key=value`` loads the file and the overrides through OmegaConf, whose loader
takes ``1e-5`` as a number. Plain YAML 1.1 (PyYAML's ``safe_load``) wants a dot, ``1.0e-5``, and reads
``1e-5`` as the string ``"1e-5"``; a config the toolkit trains with would then fail this package's checks
or its memory planner. OmegaConf's loader itself is private API, so the one rule is repeated here.
"""

from __future__ import annotations

import re
from typing import IO, Any, Union

import yaml


class _Loader(yaml.SafeLoader):
    """The safe loader, plus floats written with an exponent and no dot (``1e-5``, ``-3E2``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load(stream: Union[str, IO[str]]) -> Any:
    """Parse YAML text or an open file; raises :class:`yaml.YAMLError` as ``yaml.safe_load`` does."""
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
