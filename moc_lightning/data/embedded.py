"""The embedded default corpus: English prose that every Python installation already carries.

What it is: the docstrings of the standard library, read from its .py source files with `ast`
(nothing is imported or executed). One document per module: the module's docstring followed by the
docstrings of its classes, functions and methods in source order, joined by blank lines. Test
folders, site-packages and `__pycache__` are skipped, files are read in sorted order, and a
docstring already seen in an earlier module is not repeated, so the corpus is deterministic for a
given Python installation. The help pages of `pydoc_data.topics` (the language reference's prose
that `help()` shows) are added as one document each. With CPython 3.11 this is about 700 documents
and 2.2M characters (roughly 0.6M tokens with the tokenizer below).

Its tokenizer is a byte-level BPE (vocabulary 4096, `<|endoftext|>` as the end-of-sequence token)
trained with `tokenizers` on this corpus the first time it is needed and kept under the cache
folder; training is deterministic, so the same corpus gives the same tokenizer.

It exists so that training, tests and demos run on a fresh machine with no network and no data
files. It is small and narrow (technical English about Python): real experiments use C4
(`DataConfig(source='c4')`) or local files (`source='files'`).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Union

from .config import DataError, resolve_cache_dir

EMBEDDED_EOS = "<|endoftext|>"
EMBEDDED_VOCAB_SIZE = 4096
# Bump when the extraction changes, so that caches built from the old corpus are not reused.
EXTRACTOR_VERSION = 1
MIN_CHARACTERS = 200_000  # below this the installation has no usable sources (e.g. a .pyc-only build)

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(root: Optional[Path] = None) -> list:
    """The standard library's .py files, sorted by their path relative to root, tests skipped."""
    root = Path(root) if root is not None else stdlib_root()
    found = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS and not d.startswith("."))
        found.extend(Path(folder) / f for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _docstrings_in_source_order(node: ast.AST) -> Iterable[str]:
    if isinstance(node, _DOC_NODES):
        doc = ast.get_docstring(node, clean=True)
        if doc and doc.strip():
            yield doc.strip()
    for child in ast.iter_child_nodes(node):
        yield from _docstrings_in_source_order(child)


def _topic_pages(tree: ast.Module) -> list:
    """The string values of `topics = {...}` in pydoc_data/topics.py."""
    pages = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Dict):
            if any(isinstance(t, ast.Name) and t.id == "topics" for t in stmt.targets):
                for value in stmt.value.values:
                    if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value.strip():
                        pages.append(value.value.strip())
    return pages


def extract_documents(root: Optional[Path] = None) -> list:
    """Build the corpus from the sources under root (default: this interpreter's stdlib); uncached."""
    root = Path(root) if root is not None else stdlib_root()
    documents, seen = [], set()
    for path in stdlib_source_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):  # e.g. lib2to3 grammar test inputs
            continue
        if path.relative_to(root).as_posix() == "pydoc_data/topics.py":
            for page in _topic_pages(tree):
                if page not in seen:
                    seen.add(page)
                    documents.append(page)
            continue
        parts = []
        for doc in _docstrings_in_source_order(tree):
            if doc not in seen:
                seen.add(doc)
                parts.append(doc)
        if parts:
            documents.append("\n\n".join(parts))
    return documents


def embedded_corpus_key(root: Optional[Path] = None) -> str:
    """A digest identifying the corpus without building it: the interpreter's version, the
    extractor's version and the path, size and modification time of every source file read."""
    root = Path(root) if root is not None else stdlib_root()
    digest = hashlib.sha256(f"v{EXTRACTOR_VERSION}|{sys.implementation.name}|{sys.version}|".encode())
    for path in stdlib_source_files(root):
        st = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def _cached_documents(key: str, root: str) -> tuple:
    return tuple(extract_documents(Path(root)))


def embedded_documents() -> list:
    """The embedded corpus (built once per process): a list of documents (str)."""
    root = stdlib_root()
    documents = list(_cached_documents(embedded_corpus_key(root), str(root)))
    total = sum(map(len, documents))
    if total < MIN_CHARACTERS:
        raise DataError(
            f"the embedded corpus needs the standard library's .py sources but {root} gave only {total} "
            "characters of docstrings: use DataConfig(source='files') or source='c4' on this installation"
        )
    return documents


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = EMBEDDED_VOCAB_SIZE, eos_token: str = EMBEDDED_EOS):
    """A byte-level BPE `tokenizers.Tokenizer` trained on texts, with eos_token as its special token
    (id 0). Byte-level: any text can be encoded, nothing maps to an unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    return tokenizer


def embedded_tokenizer_path(cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """Where the embedded corpus's tokenizer.json is kept for this corpus."""
    folder = f"embedded-bpe{EMBEDDED_VOCAB_SIZE}-{embedded_corpus_key()}"
    return resolve_cache_dir(cache_dir) / "tokenizers" / folder / "tokenizer.json"


def embedded_tokenizer(cache_dir: Union[str, os.PathLike, None] = None):
    """The embedded corpus's BPE tokenizer as a `TextTokenizer`, trained on first use and cached."""
    from .tokenizer import HFTokenizer

    path = embedded_tokenizer_path(cache_dir)
    if not path.is_file():
        tokenizer = train_bpe_tokenizer(embedded_documents())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokenizer-", suffix=".json")
        os.close(fd)
        try:
            tokenizer.save(tmp)
            os.replace(tmp, path)  # atomic: concurrent processes never see a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return HFTokenizer(path, name=f"embedded-bpe-{EMBEDDED_VOCAB_SIZE}", eos_token=EMBEDDED_EOS)
