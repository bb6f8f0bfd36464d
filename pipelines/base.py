"""What every pipeline is: a plan of children, how they run, and the report they end in."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from moc_lightning.sweep import Child, ChildResult, ParentRun


@dataclass
class Context:
    """One invocation: its resolved settings, and the main job's overrides around each child's own.

    A child's overrides are the scale's (`settings['train']`), then the child's, then the user's
    command-line overrides, so that the command line has the last word.
    """

    pipeline: str
    scale: str
    settings: dict
    user_train: list[str]
    config_dir: str | None = None
    say: Callable[[str], None] = print

    def child(self, name: str, overrides: list[str], **tags: Any) -> Child:
        all_tags = {"moc.pipeline": self.pipeline, "moc.scale": self.scale, "moc.variant": name}
        all_tags.update({f"moc.{k}": str(v) for k, v in tags.items()})
        return Child(name, (*self.settings["train"], *overrides, *self.user_train), all_tags)

    def selected(self, variants: dict[str, list[str]]) -> dict[str, list[str]]:
        """`variants`, restricted to `settings['only']` when that is set (in its order)."""
        only = self.settings.get("only")
        if not only:
            return dict(variants)
        unknown = [name for name in only if name not in variants]
        if unknown:
            from moc_lightning.cli.config import ConfigError

            raise ConfigError(f"pipeline {self.pipeline}: pipeline.only names unknown variant(s) {', '.join(unknown)}; "
                              f"the variants are {', '.join(variants)}")
        return {name: variants[name] for name in only}


@dataclass
class Report:
    """What a pipeline logs on its parent run: tables (markdown + CSV), figures (png), JSON files."""

    tables: dict[str, list[dict]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    json: dict[str, Any] = field(default_factory=dict)
    main_table: str = "results"


class Pipeline(abc.ABC):
    name: ClassVar[str]
    summary: ClassVar[str]

    @abc.abstractmethod
    def plan(self, ctx: Context) -> list[Child]:
        """Every child this invocation may run, in order (composed and fingerprinted up front)."""

    def execute(self, ctx: Context, parent: ParentRun, children: list[Child]) -> list[ChildResult]:
        """Run the children one after another (skipping those that finished before)."""
        results = []
        for i, child in enumerate(children, 1):
            results.append(announce(ctx, parent.run_child(child), i, len(children)))
        return results

    @abc.abstractmethod
    def report(self, ctx: Context, results: list[ChildResult]) -> Report:
        """Tables and figures from the children's results."""


def announce(ctx: Context, result: ChildResult, index: int, total: int) -> ChildResult:
    """One line per child: what this invocation did with it, and its perplexity."""
    ppl = result.value("final/val/ppl", "val/ppl")
    what = {"skipped": "finished before, skipped", "oom": "out of memory"}.get(result.outcome, result.outcome)
    ctx.say(f"moc pipeline {ctx.pipeline}: [{index}/{total}] {result.name}: {what}"
            + (f" (val/ppl {ppl:.4g})" if ppl is not None else ""))
    return result
