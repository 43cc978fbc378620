"""The ``rzenembed`` command line.

rzenembed tiny-model OUT [--seed N]               write the tiny offline Qwen2-VL folder
rzenembed sample-data OUT [--seed N] [--scale K]  write the generated sample corpus
rzenembed config CONFIG.yaml [--set K=V ...]       validate a config, print it resolved
"""

from __future__ import annotations

import argparse
import json
import sys

from rzenembed.config import ConfigError, config_digest, load_config


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from rzenembed.modeling.tiny import build_tiny_model

    out = build_tiny_model(args.out, seed=args.seed)
    print(f"tiny Qwen2-VL model written to {out}")
    return 0


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from rzenembed.data.sample import build_sample_corpus

    corpus = build_sample_corpus(args.out, seed=args.seed, scale=args.scale)
    rows = sum(d.rows for d in corpus.datasets)
    print(
        f"sample corpus written to {corpus.root}: {len(corpus.datasets)} datasets, {rows} rows, "
        f"{len(corpus.eval_sets)} eval sets; sources in {corpus.sources_yaml}"
    )
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    print(f"# config digest: {config_digest(cfg)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rzenembed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny-model", help="write the tiny offline Qwen2-VL model folder")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--seed", type=int, default=0, help="weight/tokenizer seed (default 0)")
    tiny.set_defaults(func=_cmd_tiny_model)

    sample = sub.add_parser("sample-data", help="write the generated sample corpus")
    sample.add_argument("out", help="output folder")
    sample.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    sample.add_argument(
        "--scale", type=int, default=1, help="multiply the image datasets' rows (default 1)"
    )
    sample.set_defaults(func=_cmd_sample_data)

    config = sub.add_parser("config", help="validate a config and print it fully resolved")
    config.add_argument("config", help="YAML config file")
    config.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override"
    )
    config.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
