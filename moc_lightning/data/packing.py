"""Tokenise documents, split them into training and validation, and pack them into fixed blocks.

Packing: every document is tokenised and ends with one EOS; the documents of a split are
concatenated in their order and cut into blocks of `seq_len` tokens; the remainder that does not
fill a last block is dropped. A block may therefore hold the end of one document and the start of
the next (separated by EOS), as in GaLore and most LLM pre-training. Rows are
`{'input_ids': int32[seq_len]}`; the labels are the input ids themselves (the model shifts them).

Split: a document goes to validation when a stable hash of its text (BLAKE2b, never Python's
salted `hash()`) falls below `val_fraction`. The split depends on nothing else (not on the seed,
the order or the other documents), so it is the same on every build and machine, identical texts
always land on the same side, and the two sides share no document. Blank documents are dropped.

Caching: the packed splits are built once with `datasets` (`.map(batched=True)` to tokenise, one
sequential pass to pack) and saved with `save_to_disk` under
`<cache_dir>/packed/<source>-<fingerprint>/{train,val}`, with a `meta.json` of counts. The
fingerprint covers what the blocks depend on: the source, the files' paths, sizes and modification
times (or the embedded corpus's key), the text field, the tokenizer's identity (a digest of its
file), seq_len, val_fraction and max_documents. The shuffle seed is not part of it: the blocks do not
depend on it, only the order the loader visits them in. Builds write to a temporary folder that
is renamed into place, so concurrent processes never read a half-built cache.

Streaming: `stream_blocks` yields the same blocks on the fly from an iterable of documents, with the
same tokenisation, split and packing, so a streamed source and a packed one agree block for block.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from .config import DataConfig, DataError
from .tokenizer import TextTokenizer

FORMAT_VERSION = 1
TOKENIZE_BATCH = 1000  # documents per `datasets.map` batch
STREAM_BATCH = 256  # documents tokenised together when streaming


# -- split ---------------------------------------------------------------------------------------


def _cache_meta(cfg, digest, what, tokenizer) -> dict:
    """What every packed cache records about where it came from (checked when it is reused)."""
    return {
        "format": FORMAT_VERSION,
        "fingerprint": digest,
        "source": cfg.source,
        "files": [s[0] for s in what.get("files", [])],
        "tokenizer": tokenizer.name,
        "tokenizer_identity": tokenizer.identity,
    }


def validation_score(text: str) -> float:
    """A number in [0, 1) fixed by the text alone (the first 8 bytes of its BLAKE2b digest)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_validation(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split."""
    return val_fraction > 0.0 and validation_score(text) < val_fraction


def _keep(text) -> bool:
    return isinstance(text, str) and bool(text.strip())


# -- packing -------------------------------------------------------------------------------------


class BlockPacker:
    """Cuts a token stream, given in pieces of any length, into blocks of seq_len tokens."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = int(seq_len)
        self._carry = np.empty(0, dtype=np.int32)
        self.tokens_seen = 0

    def add(self, tokens) -> np.ndarray:
        """The full blocks completed by these tokens, as an int32 array (n, seq_len)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        self.tokens_seen += tokens.size
        buffer = np.concatenate([self._carry, tokens]) if self._carry.size else tokens
        n = buffer.size // self.seq_len
        self._carry = buffer[n * self.seq_len :].copy()
        return buffer[: n * self.seq_len].reshape(n, self.seq_len)

    @property
    def pending(self) -> int:
        """Tokens waiting for the next block (dropped if the stream ends)."""
        return int(self._carry.size)


class _TokenizeDocuments:
    """The `datasets.map` function: drop blank documents, tokenise, mark the validation ones."""

    def __init__(self, tokenizer: TextTokenizer, val_fraction: float) -> None:
        self.tokenizer = tokenizer
        self.val_fraction = val_fraction

    def __call__(self, batch: dict) -> dict:
        texts = [t for t in batch["text"] if _keep(t)]
        return {
            "input_ids": self.tokenizer.encode_batch(texts) if texts else [],
            "is_val": [is_validation(t, self.val_fraction) for t in texts],
        }


def stream_blocks(
    text_batches: Iterable,
    tokenizer: TextTokenizer,
    seq_len: int,
    *,
    split: Optional[str] = None,
    val_fraction: float = 0.0,
) -> Iterator[np.ndarray]:
    """Blocks (int32 arrays of seq_len) packed on the fly from batches (lists) of document texts.

    split None keeps every document; 'train' / 'val' keep that side of the split (as
    `is_validation` decides). The same documents in the same order give the same blocks as the
    packed cache.
    """
    if split not in (None, "train", "val"):
        raise ValueError(f"split must be None, 'train' or 'val', not {split!r}")
    packer = BlockPacker(seq_len)
    for texts in text_batches:
        texts = [t for t in texts if _keep(t)]
        if split is not None:
            want_val = split == "val"
            texts = [t for t in texts if is_validation(t, val_fraction) == want_val]
        if not texts:
            continue
        ids = tokenizer.encode_batch(texts)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32)
        yield from packer.add(flat)


def text_batches(documents, batch_docs: int = STREAM_BATCH) -> Iterator[list]:
    """Lists of texts from a `datasets` (Iterable)Dataset with a 'text' column, or any iterable of str."""
    if hasattr(documents, "iter") and hasattr(documents, "column_names"):
        for batch in documents.iter(batch_size=batch_docs):
            yield list(batch["text"])
        return
    it = iter(documents)
    while True:
        chunk = list(itertools.islice(it, batch_docs))
        if not chunk:
            return
        yield chunk


# -- the packed cache ----------------------------------------------------------------------------


@dataclass
class PackedData:
    """The packed splits (`datasets.Dataset`s with one column, input_ids: int32[seq_len]) and
    their meta (counts, files, tokenizer); `path` is the cache folder they were loaded from."""

    train: object
    val: object
    meta: dict = field(default_factory=dict)
    path: Optional[Path] = None


def _int32_list(length: int = -1):
    """An int32 list feature (`datasets.List` since datasets 4, `Sequence` before)."""
    import datasets

    kind = getattr(datasets, "List", None) or datasets.Sequence
    return kind(datasets.Value("int32"), length=length)


def _features(seq_len: int):
    import datasets

    return datasets.Features({"input_ids": _int32_list(seq_len)})


def empty_blocks(seq_len: int):
    """An empty packed split (save_to_disk cannot store one)."""
    import datasets

    return datasets.Dataset.from_dict({"input_ids": []}, features=_features(seq_len))


class _BlockWriter:
    """Writes blocks to an Arrow stream file that `datasets.Dataset.from_file` can map."""

    def __init__(self, path: Path, seq_len: int) -> None:
        import pyarrow as pa

        self._pa = pa
        self.path = path
        self.seq_len = seq_len
        self.schema = pa.schema([pa.field("input_ids", pa.list_(pa.int32(), seq_len))])
        self._file = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._file, self.schema)
        self.blocks = 0

    def write(self, blocks: np.ndarray) -> None:
        if len(blocks) == 0:
            return
        pa = self._pa
        values = pa.array(np.ascontiguousarray(blocks, dtype=np.int32).reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(values, self.seq_len)
        self._writer.write_batch(pa.record_batch([column], schema=self.schema))
        self.blocks += len(blocks)

    def close(self) -> None:
        self._writer.close()
        self._file.close()


def _save_split(writer: _BlockWriter, target: Path) -> None:
    import datasets

    writer.close()
    if writer.blocks:
        ds = datasets.Dataset.from_file(str(writer.path))
        ds.save_to_disk(str(target))
        del ds


def _load_split(folder: Path, blocks: int, seq_len: int):
    import datasets

    if blocks == 0:
        return empty_blocks(seq_len)
    return datasets.load_from_disk(str(folder))


def _file_stamps(cfg: DataConfig) -> list:
    from .sources import resolve_files

    stamps = []
    for path in resolve_files(cfg.paths):
        st = path.stat()
        stamps.append([str(path), st.st_size, st.st_mtime_ns])
    return stamps


def fingerprint(cfg: DataConfig, tokenizer: TextTokenizer, kind: str = "packed") -> tuple:
    """(digest, the dict it was computed from) for the data a config and tokenizer produce."""
    what = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "source": cfg.source,
        "text_field": cfg.text_field if cfg.source == "files" else None,
        "tokenizer": tokenizer.identity,
        "seq_len": cfg.seq_len,
        "val_fraction": cfg.val_fraction if cfg.source != "c4" else None,
        "max_documents": cfg.max_documents,
    }
    if cfg.source == "files":
        what["files"] = _file_stamps(cfg)
    elif cfg.source == "embedded":
        from .embedded import embedded_corpus_key

        what["corpus"] = embedded_corpus_key()
    else:
        what["c4_val_blocks"] = cfg.c4_val_blocks
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return digest, what


def cache_folder(cfg: DataConfig, tokenizer: TextTokenizer, kind: str = "packed") -> Path:
    digest, _ = fingerprint(cfg, tokenizer, kind)
    suffix = "" if kind == "packed" else f"-{kind}"
    return cfg.resolved_cache_dir() / "packed" / f"{cfg.source}{suffix}-{digest}"


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished build into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _new_build_folder(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".building-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _read_meta(folder: Path) -> Optional[dict]:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT_VERSION else None


def load_packed(cfg: DataConfig, tokenizer: TextTokenizer) -> Optional[PackedData]:
    """The cached packed splits for this config and tokenizer, or None when not built yet."""
    folder = cache_folder(cfg, tokenizer)
    meta = _read_meta(folder)
    if meta is None:
        return None
    train = _load_split(folder / "train", meta["train_blocks"], cfg.seq_len)
    val = _load_split(folder / "val", meta["val_blocks"], cfg.seq_len)
    return PackedData(train=train, val=val, meta=meta, path=folder)


def build_packed(cfg: DataConfig, tokenizer: TextTokenizer) -> PackedData:
    """Read, tokenise, split and pack the documents of an 'embedded' or 'files' config, and cache
    the result (replacing nothing: an existing cache for the same fingerprint is kept)."""
    import datasets

    from .sources import load_documents

    if cfg.source == "c4":
        raise DataError("source='c4' is streamed: it has no packed cache (use build_stream_val for its validation)")
    digest, what = fingerprint(cfg, tokenizer)
    final = cache_folder(cfg, tokenizer)
    started = time.time()
    tmp = _new_build_folder(final)
    work = tmp / "work"
    work.mkdir()
    try:
        documents = load_documents(cfg, streaming=False, hf_cache=cfg.resolved_cache_dir() / "hf")
        n_documents = len(documents)
        tokens = documents.map(
            _TokenizeDocuments(tokenizer, cfg.val_fraction),
            batched=True,
            batch_size=TOKENIZE_BATCH,
            remove_columns=documents.column_names,
            features=datasets.Features({"input_ids": _int32_list(), "is_val": datasets.Value("bool")}),
            num_proc=cfg.num_proc,
            new_fingerprint=f"{digest}-tokens",
            cache_file_name=str(work / "tokens.arrow"),
            desc="Tokenising",
        )
        counts = _pack_tokens(tokens, cfg.seq_len, tmp, work)
        del tokens, documents
        meta = {
            **_cache_meta(cfg, digest, what, tokenizer),
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "seq_len": cfg.seq_len,
            "val_fraction": cfg.val_fraction,
            "max_documents": cfg.max_documents,
            "documents": n_documents,
            **counts,
            "build_seconds": round(time.time() - started, 2),
            "inputs": what,
        }
        if meta["train_blocks"] == 0:
            raise DataError(
                f"the {cfg.source} data give no training block: {meta['train_tokens']} training tokens from "
                f"{meta['train_documents']} documents, fewer than seq_len = {cfg.seq_len}"
            )
        shutil.rmtree(work, ignore_errors=True)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_packed(cfg, tokenizer)


def _pack_tokens(tokens, seq_len: int, out: Path, work: Path) -> dict:
    """One pass over the tokenised documents in order: route each to its split's packer."""
    import pyarrow as pa
    import pyarrow.compute as pc

    writers = {s: _BlockWriter(work / f"{s}.arrow", seq_len) for s in ("train", "val")}
    packers = {s: BlockPacker(seq_len) for s in ("train", "val")}
    documents = {"train": 0, "val": 0}
    for table in tokens.with_format("arrow").iter(batch_size=10_000):
        is_val = table.column("is_val").to_numpy(zero_copy_only=False).astype(bool)
        ids = table.column("input_ids")
        for split, mask in (("train", ~is_val), ("val", is_val)):
            n = int(mask.sum())
            if n == 0:
                continue
            documents[split] += n
            flat = pc.list_flatten(pc.filter(ids, pa.array(mask))).to_numpy()
            writers[split].write(packers[split].add(flat))
    for split in ("train", "val"):
        _save_split(writers[split], out / split)
    return {
        "train_documents": documents["train"],
        "val_documents": documents["val"],
        "train_tokens": packers["train"].tokens_seen,
        "val_tokens": packers["val"].tokens_seen,
        "train_blocks": writers["train"].blocks,
        "val_blocks": writers["val"].blocks,
    }


def get_packed(cfg: DataConfig, tokenizer: TextTokenizer) -> PackedData:
    """The packed splits, from the cache when there, built (once) otherwise."""
    return load_packed(cfg, tokenizer) or build_packed(cfg, tokenizer)


# -- validation blocks of a streamed source ------------------------------------------------------


def load_stream_val(cfg: DataConfig, tokenizer: TextTokenizer) -> Optional[PackedData]:
    folder = cache_folder(cfg, tokenizer, kind="val")
    meta = _read_meta(folder)
    if meta is None:
        return None
    return PackedData(train=None, val=_load_split(folder / "val", meta["val_blocks"], cfg.seq_len), meta=meta, path=folder)


def build_stream_val(cfg: DataConfig, tokenizer: TextTokenizer) -> PackedData:
    """The validation blocks of a streamed source, read once and cached like a packed split:
    for 'c4' the first `c4_val_blocks` blocks of C4's validation split; otherwise every block of the
    validation documents (the same blocks the packed cache would hold)."""
    from .sources import load_c4_documents, load_documents, stream_error

    digest, what = fingerprint(cfg, tokenizer, kind="val")
    final = cache_folder(cfg, tokenizer, kind="val")
    started = time.time()
    tmp = _new_build_folder(final)
    try:
        writer = _BlockWriter(tmp / "val.arrow", cfg.seq_len)
        if cfg.source == "c4":
            documents = load_c4_documents("validation")
            blocks = itertools.islice(stream_blocks(text_batches(documents), tokenizer, cfg.seq_len), cfg.c4_val_blocks)
        elif cfg.val_fraction > 0:
            documents = load_documents(cfg, streaming=True)
            blocks = stream_blocks(
                text_batches(documents), tokenizer, cfg.seq_len, split="val", val_fraction=cfg.val_fraction
            )
        else:
            blocks = iter(())
        try:
            for chunk in _chunks(blocks, 1024):
                writer.write(chunk)
        except Exception as exc:
            raise stream_error(cfg, exc) from exc
        _save_split(writer, tmp / "val")
        (tmp / "val.arrow").unlink(missing_ok=True)
        meta = {
            **_cache_meta(cfg, digest, what, tokenizer),
            "seq_len": cfg.seq_len,
            "val_blocks": writer.blocks,
            "val_tokens": writer.blocks * cfg.seq_len,
            "build_seconds": round(time.time() - started, 2),
            "inputs": what,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_stream_val(cfg, tokenizer)


def get_stream_val(cfg: DataConfig, tokenizer: TextTokenizer) -> PackedData:
    return load_stream_val(cfg, tokenizer) or build_stream_val(cfg, tokenizer)


def _chunks(blocks: Iterator[np.ndarray], n: int) -> Iterator[np.ndarray]:
    while True:
        chunk = list(itertools.islice(blocks, n))
        if not chunk:
            return
        yield np.stack(chunk)
