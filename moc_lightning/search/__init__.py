"""`moc search`: an Optuna study over MoC's K (or K/d_ffn), grouped a:b sparsity and Top-K placement.

Single-objective (validation perplexity, under an optional memory budget that the sampler treats as
a constraint) or multi-objective (perplexity and memory, reporting the Pareto front). Trials are
pruned from the validation perplexity reported at each validation step. Each trial is an MLflow
child run of the study's parent run. The study lives in an SQLite file by default or any RDB URL;
`--workers` runs parallel worker processes on it, and an interrupted study resumes (dead trials are
found by their heartbeat, marked FAIL and retried from their checkpoint). Spaces: conf/search/.
"""

from moc_lightning.search.pruning import StepPruningCallback
from moc_lightning.search.report import pareto_indices
from moc_lightning.search.settings import SearchSettings
from moc_lightning.search.study import SearchOutcome, run_search

__all__ = ["SearchOutcome", "SearchSettings", "StepPruningCallback", "pareto_indices", "run_search"]
