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
    from moc_lightning.cli.generate import add_generate_parser

    add_generate_parser(sub)
    _add_pipeline_parser(sub)
    _add_search_parser(sub)
    return parser


def _add_pipeline_parser(sub) -> None:
    pipeline = sub.add_parser(
        "pipeline",
        help="run one of the paper's comparisons or ablations (one MLflow parent run, a child per training)",
        description="Run a pipeline at a scale (conf/pipeline/<name>.yaml); the same command skips the children "
                    "that finished and resumes a killed one. Overrides starting with 'pipeline.' change the "
                    "pipeline's settings, the others the main job of every child.",
        epilog="pipelines: compare, placement, k-sweep, batch-scaling, profile\nexamples:\n"
               "  moc pipeline compare --scale smoke\n  moc pipeline k-sweep --scale gpu-small pipeline.k_values=[128,256]\n"
               "  moc pipeline compare --scale paper-60m pipeline.only=[swiglu,moc]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pipeline.add_argument("name", help="compare | placement | k-sweep | batch-scaling | profile")
    pipeline.add_argument("--scale", default="smoke", help="smoke (default; 2 CPU cores), gpu-small, paper-60m, ...")
    pipeline.add_argument("overrides", nargs="*", help="pipeline.key=value, or main-job overrides (group=option, section.key=value)")
    pipeline.add_argument("--config-dir", help="folder holding train.yaml and pipeline/ (default: the checkout's conf/)")


def _add_search_parser(sub) -> None:
    search = sub.add_parser(
        "search",
        help="Optuna search over K, grouped a:b sparsity and Top-K placement (one MLflow parent run per study)",
        description="Run (or resume) an Optuna study whose space is conf/search/<space>.yaml at a scale. "
                    "Overrides starting with 'search.' change the study's settings, the others the main job.",
        epilog="examples:\n  moc search --n-trials 6 --workers 2\n"
               "  moc search --scale gpu-small search.objectives=[ppl,memory]\n"
               "  moc search --storage postgresql://user@host/db --study shared-130m --scale paper-130m",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search.add_argument("--space", default="moc", help="search space: conf/search/<space>.yaml (default: moc)")
    search.add_argument("--scale", default="smoke", help="smoke (default; 2 CPU cores), gpu-small, paper-130m, ...")
    search.add_argument("--n-trials", type=int, help="trials the study should have finished (default: the space's)")
    search.add_argument("--workers", "--n-jobs", dest="workers", type=int, default=1,
                        help="parallel worker processes on the study's storage (default 1)")
    search.add_argument("--storage", help="Optuna storage URL (default: sqlite:///optuna.db in the working directory)")
    search.add_argument("--study", help="study name (default: derived from the space, the scale and the overrides)")
    search.add_argument("overrides", nargs="*", help="search.key=value, or main-job overrides")
    search.add_argument("--config-dir", help="folder holding train.yaml and search/ (default: the checkout's conf/)")


def _run_pipeline(args) -> None:
    try:  # the pipelines sit on top of the library: imported only when asked for
        from pipelines import run_pipeline
    except ModuleNotFoundError as exc:
        if exc.name != "pipelines":
            raise
        raise FileNotFoundError("the 'pipelines' package is not importable: run from the checkout "
                                "or install it with `pip install -e .`") from None
    run_pipeline(args.name, args.scale, args.overrides, config_dir=args.config_dir)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse matches a subcommand's positionals at their first run, so overrides after an option
    # (`moc pipeline compare --scale smoke model=...`) come back unmatched: they are overrides too.
    if extra and (args.command not in ("pipeline", "search") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "train":
            from moc_lightning.cli.train import run_train

            run_train(args.overrides, config_dir=args.config_dir)
        elif args.command == "generate":
            from moc_lightning.cli.generate import run_generate

            run_generate(args)
        elif args.command == "pipeline":
            _run_pipeline(args)
        elif args.command == "search":
            from moc_lightning.search import run_search

            run_search(args.space, args.scale, args.overrides, n_trials=args.n_trials, workers=args.workers,
                       storage=args.storage, study_name=args.study, config_dir=args.config_dir)
        return 0
    except _user_errors() as exc:
        if os.environ.get("MOC_DEBUG"):
            raise
        message = " ".join(str(exc).split())  # one paragraph, however the message was built
        print(f"moc {args.command}: error: {message}\n(set MOC_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
