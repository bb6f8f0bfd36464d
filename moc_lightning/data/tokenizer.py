"""Tokenizers for pre-training: one small interface over `tokenizers` and `sentencepiece`.

`load_tokenizer(spec)` accepts
  - a `tokenizer.json` file (Hugging Face `tokenizers`),
  - a SentencePiece `.model` file,
  - a folder holding one of them (a `.model` file is preferred when both are there: for T5 both
    give the same ids, SentencePiece is several times faster, and its vocabulary is the 32,000
    pieces GaLore's configs use, where T5's tokenizer.json adds 100 sentinel tokens),
  - 'embedded': the byte-level BPE trained on the embedded corpus (see `embedded.py`),
  - a Hugging Face hub name such as 't5-base', looked up in the local HF cache only: nothing is
    ever downloaded, so a machine without network fails with a `DataError` that says where it
    looked and asks for a local path.

Encoding is the same for every backend: the tokenizer's own special tokens are not added (no BOS,
no template), and each document gets exactly one end-of-sequence id at its end, so documents can
be concatenated and packed.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

from .config import DataError

# Names an end-of-sequence token goes by, tried in this order when a tokenizer.json does not say.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")
# Files a tokenizer folder (or a hub snapshot) may hold, in order of preference.
SP_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.model")
JSON_FILE = "tokenizer.json"
# Hub names that moved under an organisation; a cache may hold either spelling.
_HUB_ALIASES = {n: f"google-t5/{n}" for n in ("t5-small", "t5-base", "t5-large", "t5-3b", "t5-11b")}
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class TextTokenizer(abc.ABC):
    """A tokenizer as the data pipeline sees it.

    encode_batch(texts) -> one list of ids per text, each ending with exactly one `eos_id`
    encode(text)        -> the same for one text
    decode(ids)         -> text (special tokens such as EOS are dropped)
    eos_id, vocab_size  -> ints; every id encode can produce is < vocab_size
    name                -> what it was loaded from (a path, a hub name or 'embedded-bpe-4096')
    identity            -> a short digest of the tokenizer file (changes when the vocabulary does)
    save(folder)        -> writes the tokenizer file into folder; load_tokenizer(folder) reads it back
    """

    kind = "abstract"

    def __init__(self, path: Path, name: str, eos_id: int, vocab_size: int) -> None:
        self.path = Path(path)
        self.name = str(name)
        self.eos_id = int(eos_id)
        self.vocab_size = int(vocab_size)
        self.identity = f"{self.kind}:{_file_digest(self.path)}"

    @abc.abstractmethod
    def _encode_plain(self, texts: list) -> list:
        """Each backend (tokenizers, sentencepiece) defines this."""

    def encode_batch(self, texts: Sequence[str]) -> list:
        ids = self._encode_plain(list(texts))
        eos = self.eos_id
        return [list(seq) + [eos] for seq in ids]

    def encode(self, text: str) -> list:
        return self.encode_batch([text])[0]

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Each backend (tokenizers, sentencepiece) defines this."""

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / self._saved_name()
        if target.resolve() != self.path.resolve():
            shutil.copyfile(self.path, target)
        return target

    @abc.abstractmethod
    def _saved_name(self) -> str:
        """Each backend (tokenizers, sentencepiece) defines this."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id})"
        )


class HFTokenizer(TextTokenizer):
    """A `tokenizers.Tokenizer` read from a tokenizer.json."""

    kind = "tokenizers"

    def __init__(self, path: Path, name: Optional[str] = None, eos_token: Optional[str] = None) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            self.backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library's message is long; keep ours short and specific
            raise DataError(f"cannot read the tokenizer file {path}: {exc}") from exc
        eos_id = self._find_eos(path, eos_token)
        super().__init__(path, name or str(path), eos_id, self.backend.get_vocab_size(with_added_tokens=True))

    def _find_eos(self, path: Path, eos_token: Optional[str]) -> int:
        candidates = [eos_token] if eos_token else []
        for meta in ("special_tokens_map.json", "tokenizer_config.json"):
            try:
                token = json.loads((path.parent / meta).read_text()).get("eos_token")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str):
                candidates.append(token)
        candidates += EOS_CANDIDATES
        for token in candidates:
            token_id = self.backend.token_to_id(token)
            if token_id is not None:
                return token_id
        raise DataError(
            f"the tokenizer {path} has no end-of-sequence token (looked for {', '.join(dict.fromkeys(candidates))})"
        )

    def _encode_plain(self, texts: list) -> list:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [enc.ids for enc in encode(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def _saved_name(self) -> str:
        return JSON_FILE


class SPTokenizer(TextTokenizer):
    """A SentencePiece model read from a .model file."""

    kind = "sentencepiece"

    def __init__(self, path: Path, name: Optional[str] = None) -> None:
        import sentencepiece

        path = Path(path)
        try:
            self.backend = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:
            raise DataError(f"cannot read the SentencePiece model {path}: {exc}") from exc
        eos_id = self.backend.eos_id()
        if eos_id < 0:
            raise DataError(f"the SentencePiece model {path} has no end-of-sequence piece (its eos_id is {eos_id})")
        super().__init__(path, name or str(path), eos_id, self.backend.get_piece_size())

    def _encode_plain(self, texts: list) -> list:
        return self.backend.encode(texts, out_type=int)

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids])

    def _saved_name(self) -> str:
        return self.path.name if self.path.suffix == ".model" else SP_FILES[0]

    # DataLoader workers and `datasets` processes receive tokenizers by pickling: rebuild from the file.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["backend"] = self.backend.serialized_model_proto()
        return state

    def __setstate__(self, state: dict) -> None:
        import sentencepiece

        proto = state.pop("backend")
        self.__dict__.update(state)
        self.backend = sentencepiece.SentencePieceProcessor(model_proto=proto)


def _from_folder(folder: Path, name: str) -> TextTokenizer:
    for fname in SP_FILES:
        if (folder / fname).is_file():
            return SPTokenizer(folder / fname, name)
    models = sorted(folder.glob("*.model"))
    if models:
        return SPTokenizer(models[0], name)
    if (folder / JSON_FILE).is_file():
        return HFTokenizer(folder / JSON_FILE, name)
    raise DataError(
        f"the folder {folder} holds no tokenizer: expected a SentencePiece .model file "
        f"({', '.join(SP_FILES)}) or a {JSON_FILE}"
    )


def _from_file(path: Path, name: str) -> TextTokenizer:
    if path.suffix == ".model":
        return SPTokenizer(path, name)
    if path.suffix == ".json":
        return HFTokenizer(path, name)
    raise DataError(
        f"unsupported tokenizer file {path}: expected a tokenizer.json, a SentencePiece .model file, "
        "or a folder holding one"
    )


def _from_hub_cache(spec: str) -> TextTokenizer:
    from huggingface_hub import constants, try_to_load_from_cache

    repos = [spec] + ([_HUB_ALIASES[spec]] if spec in _HUB_ALIASES else [])
    for repo in repos:
        for fname in SP_FILES + (JSON_FILE,):
            try:
                found = try_to_load_from_cache(repo, fname)
            except Exception:  # an invalid repo id for the hub's rules: treat as not cached
                found = None
            if isinstance(found, str) and Path(found).is_file():
                return _from_file(Path(found), spec)
    folders = " or ".join("models--" + r.replace("/", "--") for r in repos)
    raise DataError(
        f"tokenizer {spec!r} is not in the local Hugging Face cache (looked in {constants.HF_HUB_CACHE} for "
        f"{folders} holding {', '.join(SP_FILES + (JSON_FILE,))}) and nothing is downloaded here: pass a local "
        "path to a tokenizer.json, a SentencePiece .model or a folder holding one (e.g. ../shared/data/t5-tokenizer)"
    )


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1  # a hub name is 'name' or 'org/name'
        or spec.endswith((".json", ".model"))
        or not _HUB_NAME.match(spec)
    )


def load_tokenizer(
    spec: Union[str, os.PathLike, TextTokenizer], *, cache_dir: Union[str, os.PathLike, None] = None
) -> TextTokenizer:
    """A `TextTokenizer` from a path, a folder, 'embedded' or a hub name (see the module's docstring).

    cache_dir is only used by 'embedded' (where its trained tokenizer is kept).
    """
    if isinstance(spec, TextTokenizer):
        return spec
    if spec is None:
        raise DataError("no tokenizer given: pass a path to a tokenizer.json, a .model file, a folder, or 'embedded'")
    spec = os.fspath(spec)
    if spec == "embedded":
        from .embedded import embedded_tokenizer

        return embedded_tokenizer(cache_dir)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_folder(path, spec)
    if path.is_file():
        return _from_file(path, spec)
    if _looks_like_path(spec):
        raise DataError(f"no such file or folder: {path} (the tokenizer to load)")
    return _from_hub_cache(spec)
