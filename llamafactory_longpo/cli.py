"""``llamafactory-longpo``: the plugin's helper commands (training itself is ``llamafactory-cli train``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, Optional

from .errors import ConfigError, ShortToLongError


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="llamafactory-longpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny-model", help="build an offline tiny Qwen2 model + tokenizer")
    tiny.add_argument("out_dir")
    tiny.add_argument("--vocab-size", type=int, default=None, help="model vocabulary (>= tokenizer size)")
    tiny.add_argument("--tokenizer-vocab", type=int, default=2048)
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--intermediate-size", type=int, default=128)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--kv-heads", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("make-demo-data", help="(re)write data/*.jsonl and dataset_info.json under ROOT")
    demo.add_argument("root")
    demo.add_argument("--seed", type=int, default=0)

    build = sub.add_parser("build", help="build short-to-long data with the model itself (the toolkit's engines)")
    build.add_argument("kind", choices=["solopo", "longpo"])
    build.add_argument("config", help="YAML: input, output, model (llamafactory-cli chat keys), and builder knobs")
    build.add_argument("--strict", action="store_true", help="a malformed input line is fatal")

    evolve = sub.add_parser("evolve", help="LongPO self-evolution: build, train, repeat at longer lengths")
    evolve.add_argument("recipe")

    ev = sub.add_parser("eval", help="long-context evaluation")
    ev.add_argument("suite", choices=["ruler"])
    ev.add_argument("config", help="YAML: model (llamafactory-cli chat keys), output_dir, tasks, lengths, depths, ...")

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ShortToLongError as err:
        print(f"llamafactory-longpo: error: {err}", file=sys.stderr)
        return 1


def _load_config(cls: type, path: str, strict: bool) -> Any:
    import dataclasses

    import yaml

    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"{path}: unknown key {key!r}; allowed: {', '.join(sorted(names))}")
    required = [
        f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for key in required:
        if key not in raw:
            raise ConfigError(f"{path}: {key!r} is missing")
    if strict:
        raw["strict"] = True  # only the builders have it
    return cls(**raw)


def _run(args: argparse.Namespace) -> int:
    if args.command == "make-tiny-model":
        from .tiny import make_tiny_model

        out = make_tiny_model(
            args.out_dir,
            vocab_size=args.vocab_size,
            tokenizer_vocab=args.tokenizer_vocab,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            seed=args.seed,
        )
        print(f"tiny model written to {out}")
    elif args.command == "make-demo-data":
        from .demo import write

        for name, path in write(args.root, args.seed).items():
            print(f"{name}: {path}")
    elif args.command == "build":
        if args.kind == "solopo":
            from .build.solopo import SoLoPOBuildConfig, build_solopo

            build_solopo(_load_config(SoLoPOBuildConfig, args.config, args.strict))
        else:
            from .build.longpo import LongPOBuildConfig, build_longpo

            build_longpo(_load_config(LongPOBuildConfig, args.config, args.strict))
    elif args.command == "eval":
        from .eval.ruler import RulerConfig, run_ruler

        run_ruler(_load_config(RulerConfig, args.config, False))
    elif args.command == "evolve":
        import yaml

        from .build.evolve import run_recipe

        with open(args.recipe, encoding="utf-8") as fh:
            run_recipe(yaml.safe_load(fh) or {})
    return 0


if __name__ == "__main__":
    sys.exit(main())
