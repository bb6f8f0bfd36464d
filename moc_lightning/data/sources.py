"""Reading documents: local files, C4 from the Hub, or the embedded corpus, all through `datasets`.

Every function here returns a `datasets.Dataset` (or, streamed, a `datasets.IterableDataset`) with
one column, 'text', one row per document, in a deterministic order.

Local files (`DataConfig(source='files', paths=[...])`): each path is a file, a folder (searched
recursively, sorted) or a glob pattern. Supported:
  .json .jsonl .json.gz .jsonl.gz   json lines (C4's own shards are .json.gz), or one JSON array,
                                    read with the `json` builder; the text is in `text_field`
  .parquet                          read with the `parquet` builder; the text is in `text_field`
  .txt .txt.gz                      read with the `text` builder, one document per paragraph
                                    (blocks separated by a blank line), so that a single long file
                                    can still be split into training and validation documents
Files of different kinds may be mixed; documents keep the order of the files as listed.

Errors are `DataError`s with one sentence naming the path, the line or the field at fault.
`datasets`' own message for malformed JSON does not say where, so on a failure the file is scanned
(gzip included) to report the 1-based number of its first bad line.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from pathlib import Path
from typing import Optional

from .config import DataConfig, DataError

# extension -> `datasets` builder
SUPPORTED_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "json",
    ".json.gz": "json",
    ".jsonl.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".txt.gz": "text",
}
C4_REPO, C4_CONFIG = "allenai/c4", "en"
TEXT = "text"


def _extension(path: Path) -> Optional[str]:
    name = path.name.lower()
    for ext in sorted(SUPPORTED_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return None


def _supported_list() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS)


def builder_for(path: Path) -> str:
    ext = _extension(Path(path))
    if ext is None:
        raise DataError(f"unsupported file extension for {path}: supported are {_supported_list()}")
    return SUPPORTED_EXTENSIONS[ext]


def resolve_files(paths) -> list:
    """The files named by paths (files, folders, globs), absolute, de-duplicated, in order."""
    files: list = []
    for raw in paths:
        spec = os.path.expanduser(os.fspath(raw))
        if glob.has_magic(spec):
            matched = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            matched = [m for m in matched if _extension(m) is not None]
            if not matched:
                raise DataError(f"no files matched {spec!r} (supported extensions: {_supported_list()})")
            files.extend(matched)
        elif os.path.isdir(spec):
            matched = sorted(
                (Path(folder) / f for folder, _, names in os.walk(spec) for f in names),
                key=lambda p: p.as_posix(),
            )
            matched = [m for m in matched if _extension(m) is not None and not m.name.startswith(".")]
            if not matched:
                raise DataError(f"no files matched in the folder {spec} (supported extensions: {_supported_list()})")
            files.extend(matched)
        elif os.path.isfile(spec):
            builder_for(Path(spec))  # refuse unsupported extensions now, with the file's name
            files.append(Path(spec))
        else:
            raise DataError(f"no such file or folder: {spec}")
    unique = dict.fromkeys(p.absolute() for p in files)
    return list(unique)


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="strict")
    return open(path, encoding="utf-8", errors="strict")


def find_bad_json(path: Path) -> Optional[str]:
    """None if every record of the json / jsonl file (gzip or not) parses; otherwise a sentence
    naming the file and the 1-based line of its first bad record."""
    path = Path(path)
    try:
        with _open_text(path) as f:
            first_bad = None
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    first_bad = (lineno, f"{type(exc).__name__}: {exc}")
                    break
                if not isinstance(record, dict):
                    first_bad = (lineno, f"a JSON {type(record).__name__}, not an object")
                    break
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        return f"cannot read {path}: {exc}"
    if first_bad is None:
        return None
    lineno, why = first_bad
    if lineno == 1:
        # maybe not json lines but one JSON document (an array of records) spread over lines
        try:
            with _open_text(path) as f:
                json.load(f)
            return None
        except json.JSONDecodeError as exc:
            if exc.lineno > 1:
                lineno, why = exc.lineno, f"JSONDecodeError: {exc.msg}"
        except (ValueError, OSError, EOFError):
            pass
    return f"malformed JSON in {path} at line {lineno} ({why})"


def _fields_of(path: Path, builder: str) -> Optional[list]:
    """The field names of a file's first record (None when they cannot be read cheaply)."""
    try:
        if builder == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if builder == "json":
            with _open_text(path) as f:
                for line in f:
                    if line.strip():
                        record = json.loads(line)
                        return list(record) if isinstance(record, dict) else None
    except Exception:
        return None
    return None


def check_text_field(files: list, builder: str, text_field: str) -> None:
    """Raise a DataError naming the first file whose first record has no text_field."""
    if builder == "text":
        return
    for path in files:
        fields = _fields_of(path, builder)
        if fields is not None and text_field not in fields:
            raise DataError(
                f"{path} has no field {text_field!r} (its fields: {', '.join(fields) or 'none'}); "
                "set DataConfig.text_field"
            )


def _file_problem(files: list, builder: str, text_field: str) -> Optional[DataError]:
    """The first malformed JSON line or missing text field among files, as a DataError (or None)."""
    if builder == "json":
        for path in files:
            problem = find_bad_json(path)
            if problem:
                return DataError(problem)
    try:
        check_text_field(files, builder, text_field)
    except DataError as err:
        return err
    return None


def _diagnose(files: list, builder: str, text_field: str, exc: BaseException) -> DataError:
    """Turn a failure of `datasets` into a DataError that says which file and where."""
    problem = _file_problem(files, builder, text_field)
    if problem is not None:
        return problem
    names = ", ".join(str(p) for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return DataError(f"could not read {names}: {type(exc).__name__}: {exc}")


def _groups(files: list) -> list:
    """Consecutive runs of files read by the same builder: [(builder, [files])]."""
    groups: list = []
    for path in files:
        builder = builder_for(path)
        if groups and groups[-1][0] == builder:
            groups[-1][1].append(path)
        else:
            groups.append((builder, [path]))
    return groups


def _builder_kwargs(builder: str) -> dict:
    return {"sample_by": "paragraph"} if builder == "text" else {}


def _load_group(builder: str, files: list, text_field: str, *, streaming: bool, hf_cache: Optional[Path]):
    import datasets

    column = TEXT if builder == "text" else text_field
    if streaming:
        check_text_field(files[:1], builder, column)
    kwargs = dict(data_files=[str(p) for p in files], split="train", streaming=streaming, **_builder_kwargs(builder))
    if not streaming and hf_cache is not None:
        kwargs["cache_dir"] = str(hf_cache)
    try:
        ds = datasets.load_dataset(builder, **kwargs)
    except Exception as exc:
        raise _diagnose(files, builder, column, exc) from exc
    names = ds.column_names
    if names is not None and column not in names:
        check_text_field(files, builder, column)  # names the file when it can
        raise DataError(f"{files[0]} has no field {column!r} (its fields: {', '.join(names)}); set DataConfig.text_field")
    ds = ds.select_columns([column])
    if column != TEXT:
        ds = ds.rename_column(column, TEXT)
    return ds


def stream_error(cfg: DataConfig, exc: BaseException) -> DataError:
    """A DataError for a failure met while iterating a streamed 'files' source (streamed files are
    only read then): the first malformed or field-less file, or the original error."""
    if isinstance(exc, DataError):
        return exc
    if cfg.source != "files":
        return DataError(f"reading the {cfg.source} documents failed: {type(exc).__name__}: {exc}")
    for builder, group in _groups(resolve_files(cfg.paths)):
        problem = _file_problem(group, builder, TEXT if builder == "text" else cfg.text_field)
        if problem is not None:
            return problem
    return DataError(f"reading the files {cfg.paths} failed: {type(exc).__name__}: {exc}")


def load_file_documents(cfg: DataConfig, *, streaming: bool = False, hf_cache: Optional[Path] = None):
    """The documents of cfg.paths as one dataset with a 'text' column (streamed if asked)."""
    import datasets

    files = resolve_files(cfg.paths)
    parts = [
        _load_group(builder, group, cfg.text_field, streaming=streaming, hf_cache=hf_cache)
        for builder, group in _groups(files)
    ]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if cfg.max_documents is not None:
        ds = ds.take(cfg.max_documents) if streaming else ds.select(range(min(cfg.max_documents, len(ds))))
    return ds


def load_embedded_documents(cfg: DataConfig, *, streaming: bool = False):
    """The embedded corpus as a dataset with a 'text' column."""
    import datasets

    from .embedded import embedded_documents

    docs = embedded_documents()
    if cfg.max_documents is not None:
        docs = docs[: cfg.max_documents]
    ds = datasets.Dataset.from_dict({TEXT: docs})
    return ds.to_iterable_dataset() if streaming else ds


def load_c4_documents(split: str, *, max_documents: Optional[int] = None):
    """C4 'en' (train or validation), streamed from the Hugging Face Hub; needs network."""
    import datasets

    try:
        ds = datasets.load_dataset(C4_REPO, C4_CONFIG, split=split, streaming=True)
    except Exception as exc:
        raise DataError(
            f"could not open {C4_REPO} ({C4_CONFIG}, {split}) for streaming; it needs access to the Hugging Face Hub "
            f"(or use DataConfig(source='files') with local C4 shards): {type(exc).__name__}: {exc}"
        ) from exc
    ds = ds.select_columns([TEXT])
    return ds.take(max_documents) if max_documents is not None else ds


def load_documents(cfg: DataConfig, *, streaming: bool = False, hf_cache: Optional[Path] = None):
    """The documents of an 'embedded' or 'files' source (C4 goes through load_c4_documents)."""
    if cfg.source == "files":
        return load_file_documents(cfg, streaming=streaming, hf_cache=hf_cache)
    if cfg.source == "embedded":
        return load_embedded_documents(cfg, streaming=streaming)
    return load_c4_documents("train", max_documents=cfg.max_documents)


def source_files(cfg: DataConfig) -> list:
    """The files a config reads (empty for 'embedded' and 'c4')."""
    return resolve_files(cfg.paths) if cfg.source == "files" else []
