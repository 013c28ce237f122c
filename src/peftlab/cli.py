"""Command line: parses arguments and calls the library (imports stay lazy so --help is instant)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from peftlab.config import load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    from peftlab.train import train

    train(config)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from peftlab.metrics import headline
    from peftlab.pipeline import evaluate_run
    from peftlab.runs import load_run

    metrics = evaluate_run(args.run, args.overrides)
    print(headline(metrics))
    best = load_run(args.run).summary.get("best") or {}
    if not args.overrides and best:
        same = all(abs(metrics[k] - best[k]) <= 1e-6 for k in ("eval_loss", "accuracy", "f1_macro"))
        print("matches the run's saved best evaluation" if same else
              f"differs from the run's saved best evaluation: {headline(best)}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Fine-tune and compare text classifiers.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train and evaluate one run from a config",
                                description="Train one run. Overrides are dotted keys: method.r=16 train.epochs=5")
    train.add_argument("config", type=Path, help="YAML config file")
    train.add_argument("overrides", nargs="*", help="section.key=value overrides (values parse as YAML)")
    train.add_argument("--print-config", action="store_true", help="print the resolved, validated config and exit")
    train.set_defaults(func=_train)

    evaluate = commands.add_parser("eval", help="re-evaluate a finished run")
    evaluate.add_argument("run", type=Path, help="run directory (runs/<name>)")
    evaluate.add_argument("overrides", nargs="*", help="e.g. data.eval_file=other.csv")
    evaluate.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    evaluate.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Options may come after the overrides (`train CONFIG a.b=1 --print-config`): argparse leaves
    # such trailing overrides unparsed, so they are collected here.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from peftlab.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"peftlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peftlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
