"""The data config, validated when it is built, and the one error the data side raises.

This module imports nothing heavy (no `datasets`, no `torch`), so that configs can be built and
checked cheaply, e.g. by the command line before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

SOURCES = ("embedded", "files", "c4")

# The tokenizer each source uses when `DataConfig.tokenizer` is None. 'embedded' means the byte-level
# BPE trained on the embedded corpus (see `moc_lightning.data.embedded`); 't5-base' is GaLore's
# choice for C4 and is looked up in the local Hugging Face cache only (never downloaded): pass a
# local path (e.g. ../shared/data/t5-tokenizer) on a machine whose cache does not hold it.
DEFAULT_TOKENIZERS = {"embedded": "embedded", "files": "t5-base", "c4": "t5-base"}

CACHE_ENV = "MOC_CACHE_DIR"


class DataError(Exception):
    """Something about the data cannot work: a missing or malformed file, a missing field, a
    tokenizer that cannot be found. The message is one sentence that names the culprit."""


def _refuse(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"DataConfig.{name} = {value!r} is not allowed: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it is tokenised and packed, and how it is batched.

    source          'embedded' (default: English prose the Python installation carries, no network
                    and no files needed; for smoke runs), 'files' (local json / jsonl / json.gz /
                    parquet / txt files) or 'c4' (allenai/c4 'en', streamed from the Hub).
    paths           for 'files': files, folders (searched recursively for supported files) or glob
                    patterns; a single string is accepted. Must be empty for the other sources.
    text_field      the field holding the document text in json / parquet files (txt files have
                    no fields: every blank-line separated paragraph is one document).
    tokenizer       None (the source's default, DEFAULT_TOKENIZERS), 'embedded', a path to a
                    tokenizer.json, a SentencePiece .model or a folder holding one, or a Hugging
                    Face hub name (looked up in the local HF cache only).
    seq_len         tokens per packed block (>= 2).
    batch_size      blocks per batch, per device.
    val_fraction    fraction of documents held out for validation, chosen by a stable hash of each
                    document's text (0 <= val_fraction < 1). Not used by 'c4', whose validation
                    data is C4's own validation split.
    max_documents   read only the first N documents (None: all).
    cache_dir       where tokenised, packed data and trained tokenizers are kept; None means
                    $MOC_CACHE_DIR, or ~/.cache/moc_lightning when that is unset.
    num_workers     DataLoader worker processes (a streamed source uses at most 1).
    seed            seed of the per-epoch shuffle of the training blocks. It does not change which
                    documents are held out, so runs with different seeds validate on the same data.
    streaming       None: True for 'c4', False otherwise. True packs blocks on the fly from a
                    stream of documents instead of building a packed cache first ('c4' cannot be
                    used with False: C4 'en' is hundreds of GB).
    c4_val_blocks   for 'c4': how many packed blocks of C4's validation split are used for
                    validation (read once and cached).
    num_proc        processes `datasets` uses to tokenise when building the packed cache
                    (None: one).
    """

    source: str = "embedded"
    paths: list = field(default_factory=list)
    text_field: str = "text"
    tokenizer: Optional[str] = None
    seq_len: int = 256
    batch_size: int = 8
    val_fraction: float = 0.02
    max_documents: Optional[int] = None
    cache_dir: Optional[str] = None
    num_workers: int = 0
    seed: int = 0
    streaming: Optional[bool] = None
    c4_val_blocks: int = 2048
    num_proc: Optional[int] = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)

        if self.source not in SOURCES:
            raise _refuse("source", self.source, f"expected one of {', '.join(SOURCES)}")

        paths = self.paths
        if paths is None:
            paths = []
        elif isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (str, os.PathLike)) for p in paths):
            raise _refuse("paths", self.paths, "expected a list of file, folder or glob paths")
        paths = [os.fspath(p) for p in paths]
        if any(not p.strip() for p in paths):
            raise _refuse("paths", self.paths, "paths must not be empty strings")
        if self.source == "files" and not paths:
            raise _refuse("paths", self.paths, "source='files' needs at least one file, folder or glob")
        if self.source != "files" and paths:
            raise _refuse("paths", self.paths, f"paths are only read with source='files', not source={self.source!r}")
        set_("paths", paths)

        if not isinstance(self.text_field, str) or not self.text_field:
            raise _refuse("text_field", self.text_field, "expected the non-empty name of a field")

        if self.tokenizer is not None:
            if not isinstance(self.tokenizer, (str, os.PathLike)) or not os.fspath(self.tokenizer).strip():
                raise _refuse("tokenizer", self.tokenizer, "expected None, 'embedded', a path or a hub name")
            set_("tokenizer", os.fspath(self.tokenizer))

        if not _is_int(self.seq_len) or self.seq_len < 2:
            raise _refuse("seq_len", self.seq_len, "expected an integer >= 2")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise _refuse("batch_size", self.batch_size, "expected an integer >= 1")
        if (
            isinstance(self.val_fraction, bool)
            or not isinstance(self.val_fraction, (int, float))
            or not math.isfinite(self.val_fraction)
            or not 0.0 <= self.val_fraction < 1.0
        ):
            raise _refuse("val_fraction", self.val_fraction, "expected a number with 0 <= val_fraction < 1")
        set_("val_fraction", float(self.val_fraction))
        if self.max_documents is not None and (not _is_int(self.max_documents) or self.max_documents < 1):
            raise _refuse("max_documents", self.max_documents, "expected None (all) or an integer >= 1")
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)) or not os.fspath(self.cache_dir).strip():
                raise _refuse("cache_dir", self.cache_dir, "expected None or a folder path")
            set_("cache_dir", os.fspath(self.cache_dir))
        if not _is_int(self.num_workers) or self.num_workers < 0:
            raise _refuse("num_workers", self.num_workers, "expected an integer >= 0")
        if not _is_int(self.seed) or self.seed < 0:
            raise _refuse("seed", self.seed, "expected an integer >= 0")
        if self.streaming is not None and not isinstance(self.streaming, bool):
            raise _refuse("streaming", self.streaming, "expected None (the source's default), True or False")
        if self.source == "c4" and self.streaming is False:
            raise _refuse("streaming", self.streaming, "source='c4' is always streamed (C4 'en' is hundreds of GB)")
        if not _is_int(self.c4_val_blocks) or self.c4_val_blocks < 1:
            raise _refuse("c4_val_blocks", self.c4_val_blocks, "expected an integer >= 1")
        if self.num_proc is not None and (not _is_int(self.num_proc) or self.num_proc < 1):
            raise _refuse("num_proc", self.num_proc, "expected None (one process) or an integer >= 1")

    # -- resolved values ----------------------------------------------------------------------

    @property
    def is_streaming(self) -> bool:
        """Whether training blocks are packed on the fly (the resolved value of `streaming`)."""
        return self.source == "c4" if self.streaming is None else self.streaming

    @property
    def tokenizer_spec(self) -> str:
        """The tokenizer to load: `tokenizer`, or the source's default."""
        return self.tokenizer if self.tokenizer is not None else DEFAULT_TOKENIZERS[self.source]

    def resolved_cache_dir(self) -> Path:
        """`cache_dir`, else $MOC_CACHE_DIR, else ~/.cache/moc_lightning (absolute)."""
        return resolve_cache_dir(self.cache_dir)

    def replace(self, **changes) -> "DataConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_cache_dir(cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """The cache folder: the argument, else $MOC_CACHE_DIR, else ~/.cache/moc_lightning."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moc_lightning"
    return Path(cache_dir).expanduser().absolute()
