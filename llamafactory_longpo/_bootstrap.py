"""Target of ``llamafactory_longpo.pth``: runs at interpreter start in every process.

It only installs a ``sys.meta_path`` finder that waits for LLaMA-Factory's own modules to load and
then lets :mod:`llamafactory_longpo.integration` patch them. No torch, no toolkit import here, and
nothing may raise: a Python process that never imports LLaMA-Factory pays nothing and cannot break.
"Nothing" is literal: this module imports only ``os`` and ``sys``, which every interpreter has loaded
before it reads ``.pth`` files (``importlib.abc`` or ``typing`` would pull in dozens of modules, tens of
milliseconds for every Python process of the environment). The finder and loader therefore follow the
import protocols by duck typing, and there is no ``from __future__`` import (``__future__`` is a module).
Set ``LLAMAFACTORY_LONGPO_DISABLE=1`` to turn the plugin off; it is checked before anything else. The ``.pth``
then imports this module only for ``llamafactory-cli train``, whose run of a plugin stage would otherwise end in
the toolkit's traceback about keys or a stage it does not know: :func:`refuse_plugin_stage` says why in one line.
"""

import os
import sys

DISABLE_ENV = "LLAMAFACTORY_LONGPO_DISABLE"
PLUGIN_STAGES = ("longpo", "solopo", "s2ld")
# module name -> name of the integration function that patches it once it has executed
WATCHED = {
    "llamafactory.extras.constants": "patch_constants",
    "llamafactory.hparams.parser": "patch_parser",
    "llamafactory.data.parser": "patch_dataset_attr",
    "llamafactory.data.loader": "patch_loader",
    "llamafactory.train.tuner": "patch_tuner",
    "llamafactory.launcher": "patch_launcher",
    "llamafactory.webui.runner": "patch_runner",
    "llamafactory.webui.components.train": "patch_webui_train",
}


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").lower() in ("1", "true", "yes")


class _PatchingLoader:
    """Wraps the real loader of a watched module (``importlib.abc.Loader`` protocol)."""

    def __init__(self, wrapped: object, patcher: str) -> None:
        self.wrapped = wrapped
        self.patcher = patcher

    def create_module(self, spec: object) -> object:
        return self.wrapped.create_module(spec)

    def exec_module(self, module: object) -> None:
        self.wrapped.exec_module(module)
        try:
            from llamafactory_longpo import integration

            getattr(integration, self.patcher)(module)
        except Exception as err:  # a broken plugin must not break the toolkit
            print(f"[llamafactory-longpo] could not patch {module.__name__}: {err!r}", file=sys.stderr)
            if os.environ.get("LLAMAFACTORY_LONGPO_STRICT") == "1":
                raise

    def __getattr__(self, name: str) -> object:  # is_package, get_code, get_source... of the real loader
        return getattr(self.wrapped, name)


class _Finder:
    """A ``sys.meta_path`` finder (``importlib.abc.MetaPathFinder`` protocol) for the watched modules."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> object:
        patcher = WATCHED.get(fullname)
        if patcher is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, patcher)
                return spec
        return None


def train_stage(argv: list) -> str:
    """The ``stage`` of ``llamafactory-cli train`` with ``argv`` ("" when none is found): a ``stage=``/``--stage``
    argument, else the top-level ``stage:`` line of its YAML file, read as text (no YAML parser is loaded at
    interpreter start; a file the toolkit cannot read either is left to its own error)."""
    stage = ""
    if len(argv) > 2 and argv[2].endswith((".yaml", ".yml")):
        try:
            with open(argv[2], encoding="utf-8") as fh:
                for line in fh:
                    key, colon, value = line.split("#")[0].partition(":")
                    if colon and key == "stage":
                        stage = value.strip().strip("\"'")
        except (OSError, ValueError):
            pass
    for i, arg in enumerate(argv[2:], 2):
        if arg.startswith(("stage=", "--stage=")):
            stage = arg.split("=", 1)[1]
        elif arg == "--stage" and i + 1 < len(argv):
            stage = argv[i + 1]
    return stage


def refuse_plugin_stage() -> None:
    """With the plugin off, ``llamafactory-cli train`` of a plugin stage stops at interpreter start, in one line:
    nothing is loaded or written yet (``os._exit``: ``SystemExit`` cannot leave a ``.pth`` line cleanly)."""
    stage = train_stage(sys.argv) if sys.argv[1:2] == ["train"] else ""
    if stage in PLUGIN_STAGES:
        sys.stderr.write(
            f"[llamafactory-longpo] error: stage {stage} comes from the llamafactory-longpo plugin, which "
            f"{DISABLE_ENV}={os.environ.get(DISABLE_ENV)} turns off; unset {DISABLE_ENV} to run it\n"
        )
        sys.stderr.flush()
        os._exit(1)


def install() -> None:
    if disabled():
        refuse_plugin_stage()
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


try:
    install()
except Exception:  # never raise at interpreter start
    pass
