"""``llamafactory-longpo``: the plugin's helper commands (training itself is ``llamafactory-cli train``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional


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

    args = parser.parse_args(argv)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
