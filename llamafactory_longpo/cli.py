"""``llamafactory-longpo``: the plugin's helper commands (training itself is ``llamafactory-cli train``)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

from .errors import TRACEBACK_ENV, ConfigError, ShortToLongError, one_line


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
    tiny.add_argument("--force", action="store_true", help="write into a folder that is not empty (its files are replaced)")

    demo = sub.add_parser("make-demo-data", help="(re)write data/*.jsonl and dataset_info.json under ROOT")
    demo.add_argument("root")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="replace data files that differ from the demo's (edited ones)")

    build = sub.add_parser("build", help="build short-to-long data with the model itself (the toolkit's engines)")
    build.add_argument("kind", choices=["solopo", "longpo"])
    build.add_argument("config", help="YAML: input, output, model (llamafactory-cli chat keys), and builder knobs")
    build.add_argument("--strict", action="store_true", help="a malformed input line is fatal")

    evolve = sub.add_parser("evolve", help="LongPO self-evolution: build, train, repeat at longer lengths")
    evolve.add_argument("recipe")

    ev = sub.add_parser("eval", help="long-context evaluation")
    ev.add_argument("suite", choices=["ruler", "kv"], help="ruler: RULER-style tasks; kv: the key-value task by length")
    ev.add_argument(
        "config",
        help="YAML: ruler: model (chat keys), output_dir, tasks, lengths, ...; kv: models, output_dir, items, ...",
    )
    ev.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="override a config key (a YAML value; models.NAME=PATH sets one model)"
    )

    est = sub.add_parser("estimate", help="predict each GPU's peak memory (and the step's FLOPs) of a training YAML")
    est.add_argument("config", help="the YAML given to llamafactory-cli train")
    est.add_argument("--gpus", type=int, default=1, help="GPUs of the run (ZeRO partitions over all of them)")
    est.add_argument("--lengths", type=int, nargs="+", default=None, help="long-row lengths in tokens (default: cutoff_len)")
    est.add_argument("--device-memory", type=float, default=80.0, help="GiB per GPU for the fit verdict (default 80)")
    est.add_argument("--sequence-parallel", type=int, default=None, help="override sequence_parallel_size")
    est.add_argument("--response-tokens", type=int, default=None, help="scored tokens per row (default 512)")
    est.add_argument("--validate", action="store_true", help="on a GPU: run a reduced-depth real step and compare")
    est.add_argument("--gpus-per-node", type=int, default=8, help="GPUs sharing one host's memory (default 8)")
    est.add_argument("--host-memory", type=float, default=None, help="GiB of host memory per node for a host verdict")
    est.add_argument("--pcie-gbps", type=float, default=25.0, help="GB/s each way between a GPU and the host (default 25)")
    est.add_argument("--tflops", type=float, default=400.0, help="dense TFLOP/s one GPU sustains (default 400)")

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ShortToLongError as err:
        print(f"llamafactory-longpo: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"llamafactory-longpo: interrupted{_resume_note(args)}", file=sys.stderr)
        return 130
    except Exception as err:  # the toolkit's or the system's errors (a missing file, a bad model path): one line too
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"llamafactory-longpo: error: {one_line(err)} (set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        return 1


def _resume_note(args: argparse.Namespace) -> str:
    """Where an interrupted build's records are (every finished one is kept, a rerun resumes)."""
    if args.command != "build":
        return ""
    try:
        from . import yamlio

        output = yamlio.read_mapping(args.config)["output"]
    except Exception:  # the note is a courtesy: never fail on it
        return ""
    kept = 0
    if os.path.exists(output):
        with open(output, "rb") as fh:
            kept = sum(1 for line in fh if line.endswith(b"\n"))
    return f"; {kept} finished record(s) are in {output}; run the same command again to resume"


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
_WORDS = {
    "int": "an integer",
    "float": "a finite number",
    "str": "a string",
    "bool": "true or false",
    "list": "a list",
    "dict": "a mapping",
}


def _check_type(path: str, key: str, value: Any, annotation: str) -> None:
    """Refuse a value of the wrong kind for a plain ``int``/``float``/``str``/``bool``/``list``/``dict`` field."""
    optional = annotation.startswith("Optional[")
    kind = annotation.removeprefix("Optional[").removesuffix("]") if optional else annotation
    if value is None and optional:
        return
    outer, _, inner = kind.partition("[")
    expected = _TYPES.get(outer) or {"list": (list,), "dict": (dict,)}.get(outer)
    if expected is None:
        return
    ok = isinstance(value, expected) and not (isinstance(value, bool) and outer in ("int", "float"))
    if ok and outer == "float":
        ok = math.isfinite(value)
    if not ok:
        raise ConfigError(f"{path}: {key}: {value!r} is not {_WORDS[outer]}")
    item = inner.removesuffix("]")
    if outer == "list" and item in _TYPES:
        for i, v in enumerate(value):
            _check_type(path, f"{key}[{i}]", v, item)


def apply_overrides(path: str, raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs on the command line over the YAML's keys (the value read as YAML, as
    ``llamafactory-cli train x.yaml key=value`` does); ``a.b=value`` sets key ``b`` of mapping ``a``."""
    from . import yamlio

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r}: expected KEY=VALUE")
        head, dot, sub = key.partition(".")
        parsed = yamlio.load(value) if value else ""
        if dot:
            if not isinstance(raw.get(head, {}), dict):
                raise ConfigError(f"{path}: {head}: not a mapping, so {key!r} cannot be set")
            raw.setdefault(head, {})[sub] = parsed
        else:
            raw[key] = parsed
    return raw


def _config_ranges() -> dict[str, Any]:
    """The numeric keys of the builders' and evaluations' configs, by name, with the values a user could mean."""
    from .hparams import Range

    tokens = Range(1, 1 << 24)  # a context, document or chunk length (the laptop replication's chunks are 13 tokens)
    return {
        "num_samples": Range(1, 1024),
        "max_turns": Range(1, 64),
        "pool_size": Range(1, 1024),
        "max_records": Range(1, 1e9),
        "samples_per_cell": Range(1, 1e5),
        "batch_size": Range(1, 4096),
        "max_new_tokens": Range(1, 1 << 20),
        "target_tokens": tokens,
        "min_doc_tokens": tokens,
        "max_doc_tokens": tokens,
        "chunk_min_tokens": tokens,
        "chunk_max_tokens": tokens,
        "lengths": tokens,
        "depths": Range(0, 1),
        "temperature": Range(0, 10),
        "instruct_temperature": Range(0, 10),
        "answer_temperature": Range(0, 10),
        "top_p": Range(0, 1, open_low=True),
        "instruct_top_p": Range(0, 1, open_low=True),
        "seed": Range(0, 2**32 - 1),
    }


def check_fields(cls: type, path: str, raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` as keyword arguments of dataclass ``cls``: no unknown key, each value of its field's plain
    type, every required field present; ``path`` (a file, or the option the values came from) leads the error."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(f"{path}: unknown key {key!r}; allowed: {', '.join(sorted(fields))}")
        _check_type(path, key, raw[key], str(fields[key].type))
    ranges = _config_ranges()
    for key in set(raw) & set(ranges):
        for value in raw[key] if isinstance(raw[key], list) else [raw[key]]:
            ranges[key].check(f"{path}: {key}", value)
    required = [f.name for f in fields.values() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for key in required:
        if key not in raw:
            raise ConfigError(f"{path}: {key!r} is missing")
    return raw


def _load_config(cls: type, path: str, strict: bool, overrides: Sequence[str] = ()) -> Any:
    import functools

    from . import yamlio
    from .keys import admits_bool_in

    admits_bool = functools.partial(admits_bool_in, [cls])  # keys cls lacks are judged by check_fields
    yamlio.check_override_bool_words(list(overrides), admits_bool)
    raw = check_fields(cls, path, apply_overrides(path, yamlio.read_mapping(path, admits_bool), overrides))
    if strict:
        raw["strict"] = True  # only the builders have it
    return cls(**raw)


# the sizes a tiny model can be built with: a byte-level tokenizer needs its 256 bytes and 3 special tokens
TINY_SIZES: dict[str, tuple[int, int]] = {
    "tokenizer_vocab": (259, 1 << 20),
    "vocab_size": (1, 1 << 20),
    "hidden_size": (2, 16384),
    "intermediate_size": (1, 65536),
    "layers": (1, 256),
    "heads": (1, 256),
    "kv_heads": (1, 256),
}


def _check_tiny_sizes(args: argparse.Namespace) -> None:
    """``make-tiny-model``'s sizes, refused before anything is built (a zero width divided by the heads otherwise)."""
    for name, (low, high) in TINY_SIZES.items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            raise ConfigError(f"--{name.replace('_', '-')}: {value} must be between {low} and {high}")
    if args.hidden_size % args.heads or (args.hidden_size // args.heads) % 2:
        raise ConfigError(f"--hidden-size: {args.hidden_size} must be --heads ({args.heads}) times an even head size")
    if args.heads % args.kv_heads:
        raise ConfigError(f"--kv-heads: {args.kv_heads} must divide --heads ({args.heads})")


def _run(args: argparse.Namespace) -> int:
    if args.command == "make-tiny-model":
        from .tiny import make_tiny_model

        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise ConfigError(f"{args.out_dir}: exists and is not a folder")
        _check_tiny_sizes(args)
        held = sorted(os.listdir(args.out_dir)) if os.path.isdir(args.out_dir) else []
        if held and not args.force:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise ConfigError(
                f"{args.out_dir}: not empty (holds {shown}); choose an empty folder, or add --force to write into it"
            )

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

        if os.path.exists(args.root) and not os.path.isdir(args.root):
            raise ConfigError(f"{args.root}: exists and is not a folder")

        for name, path in write(args.root, args.seed, args.force).items():
            print(f"{name}: {path}")
    elif args.command == "build":
        if args.kind == "solopo":
            from .builders.solopo import SoLoPOBuildConfig, build_solopo

            build_solopo(_load_config(SoLoPOBuildConfig, args.config, args.strict))
        else:
            from .builders.longpo import LongPOBuildConfig, build_longpo

            build_longpo(_load_config(LongPOBuildConfig, args.config, args.strict))
    elif args.command == "eval" and args.suite == "kv":
        from .eval.kv_eval import KVEvalConfig, run_kv_eval

        run_kv_eval(_load_config(KVEvalConfig, args.config, False, args.overrides))
    elif args.command == "eval":
        from .eval.ruler import RulerConfig, run_ruler

        run_ruler(_load_config(RulerConfig, args.config, False, args.overrides))
    elif args.command == "estimate":
        from .hparams import Range
        from .planner import run_estimate

        Range(0, 4096, open_low=True).check("--device-memory", args.device_memory)  # GiB per GPU
        Range(1, 1 << 20).check("--response-tokens", args.response_tokens)
        Range(1, 1024).check("--gpus-per-node", args.gpus_per_node)
        Range(0, 1 << 20, open_low=True).check("--host-memory", args.host_memory)  # GiB per node
        Range(0, 1 << 20, open_low=True).check("--pcie-gbps", args.pcie_gbps)
        Range(0, 1 << 20, open_low=True).check("--tflops", args.tflops)
        from .planner.plan import Node

        print(
            run_estimate(
                args.config,
                gpus=args.gpus,
                lengths=args.lengths,
                device_gib=args.device_memory,
                sp=args.sequence_parallel,
                response=args.response_tokens,
                validate=args.validate,
                node=Node(args.gpus_per_node, args.host_memory, args.pcie_gbps, args.tflops),
            )
        )
    elif args.command == "evolve":
        from . import yamlio
        from .builders.evolve import run_recipe

        run_recipe(yamlio.read_mapping(args.recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
