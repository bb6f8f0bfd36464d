"""Data for pre-training: documents from the embedded corpus, local files or C4, read with Hugging
Face `datasets`, tokenised, packed into fixed-length blocks, cached, and served by resumable
DataLoaders through `MoCDataModule`.

    from moc_lightning.data import DataConfig, MoCDataModule
    dm = MoCDataModule(DataConfig(source="files", paths=["corpus/"], tokenizer="path/to/t5-tokenizer"))

`DataConfig` and `DataError` are light to import; the rest (which imports `datasets`, `torch` and
`lightning`) is loaded on first use, so that HF_HUB_OFFLINE / HF_DATASETS_OFFLINE can still be set
after importing this package and before touching the data.
"""

from __future__ import annotations

import importlib

from .config import DEFAULT_TOKENIZERS, SOURCES, DataConfig, DataError

_LAZY = {
    "MoCDataModule": "datamodule",
    "TextTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "embedded_documents": "embedded",
    "embedded_tokenizer": "embedded",
    "embedded_corpus_key": "embedded",
    "train_bpe_tokenizer": "embedded",
    "PackedData": "packing",
    "get_packed": "packing",
    "is_validation": "packing",
    "stream_blocks": "packing",
    "ResumableDataLoader": "loader",
    "StreamingDataLoader": "loader",
    "PackedStream": "loader",
    "resolve_files": "sources",
    "SUPPORTED_EXTENSIONS": "sources",
}

__all__ = ["DataConfig", "DataError", "SOURCES", "DEFAULT_TOKENIZERS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
