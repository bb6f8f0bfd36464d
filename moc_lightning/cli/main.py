"""`moc <command> [key=value ...]`: the console script."""

from __future__ import annotations

import argparse
import os
import sys

from moc_lightning.cli.config import ConfigError

USAGE_ERRORS = (ConfigError, ValueError, FileNotFoundError)


def _user_errors() -> tuple:
    from moc_lightning.data import DataError

    return (*USAGE_ERRORS, DataError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moc", description="Mixture-of-Channels language models: train, compare, decode.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="pre-train a model (the main job)",
        description="Compose conf/train.yaml with the overrides and train; the same command resumes a killed run.",
        epilog="examples:\n  moc train\n  moc train model=llama-130m ffn=moc_2-8 data=c4-sample trainer=gpu\n"
               "  moc train experiment=smoke ffn.k=16 trainer.max_steps=50",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("overrides", nargs="*", help="Hydra-style overrides: group=option or section.key=value")
    train.add_argument("--config-dir", help="folder holding train.yaml (default: the checkout's conf/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from moc_lightning.cli.train import run_train

            run_train(args.overrides, config_dir=args.config_dir)
        return 0
    except _user_errors() as exc:
        if os.environ.get("MOC_DEBUG"):
            raise
        message = " ".join(str(exc).split())  # one paragraph, however the message was built
        print(f"moc {args.command}: error: {message}\n(set MOC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
