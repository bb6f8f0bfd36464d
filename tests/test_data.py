"""The data side: config, tokenizers, sources, packing and its cache, resumable loaders, Lightning resume.

Everything here runs offline: the Hub is switched off before `datasets` is imported, and every test
builds into its own temporary cache folder. Expected blocks are computed independently of the
package (sentencepiece, gzip + json, plain string splitting and hashlib).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import gzip  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from moc_lightning.data import DataConfig, DataError, MoCDataModule, load_tokenizer  # noqa: E402

C4 = "c4-en-sample-1000.json.gz"


@pytest.fixture(autouse=True, scope="module")
def _offline_quiet_datasets():
    import datasets

    # in case `datasets` was imported before this module set the variables
    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    yield
    datasets.config.HF_HUB_OFFLINE = saved


# -- independent references ----------------------------------------------------------------------


def read_c4(shared: Path, n: int | None = None) -> list:
    with gzip.open(shared / C4, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    return docs[:n] if n else docs


@pytest.fixture(scope="module")
def spm(shared_data):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(shared_data / "t5-tokenizer" / "spiece.model"))


def pack_reference(spm, docs: list, seq_len: int) -> np.ndarray:
    """sentencepiece ids of each document + eos 1, concatenated, cut into seq_len, remainder dropped."""
    stream = [i for doc in docs for i in spm.encode(doc) + [1]]
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def held_out(text: str, fraction: float) -> bool:
    """The documented split rule: BLAKE2b-64 of the UTF-8 text, as a fraction of 2**64, below val_fraction."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return h / 2.0**64 < fraction


def rows(ds) -> np.ndarray:
    """The input_ids of a packed split as an (n, seq_len) array."""
    return np.asarray(ds.with_format("numpy")["input_ids"], dtype=np.int64)


def c4_config(shared_data, tmp_path, **kw) -> DataConfig:
    base = dict(
        source="files",
        paths=[str(shared_data / C4)],
        tokenizer=str(shared_data / "t5-tokenizer"),
        seq_len=64,
        batch_size=4,
        val_fraction=0.0,
        max_documents=60,
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return DataConfig(**base)


def built(cfg: DataConfig) -> MoCDataModule:
    dm = MoCDataModule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# -- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("source", "wikipedia"),
        ("seq_len", 1),
        ("seq_len", 3.5),
        ("batch_size", 0),
        ("val_fraction", 1.0),
        ("val_fraction", -0.1),
        ("max_documents", 0),
        ("num_workers", -1),
        ("c4_val_blocks", 0),
        ("text_field", ""),
        ("streaming", "yes"),
        ("num_proc", 0),
    ],
)
def test_config_refuses_bad_values_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        DataConfig(**{field: value})
    message = str(err.value)
    assert f"DataConfig.{field}" in message and repr(value) in message and "allowed" in message


def test_config_source_rules_and_defaults(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"DataConfig\.paths"):
        DataConfig(source="files")
    with pytest.raises(ValueError, match=r"DataConfig\.paths"):
        DataConfig(source="embedded", paths=["x.txt"])
    with pytest.raises(ValueError, match=r"DataConfig\.streaming"):
        DataConfig(source="c4", streaming=False)
    assert DataConfig(source="c4").is_streaming and not DataConfig().is_streaming
    assert DataConfig(source="files", paths="a.txt").paths == ["a.txt"]
    assert DataConfig().tokenizer_spec == "embedded" and DataConfig(source="c4").tokenizer_spec == "t5-base"
    monkeypatch.setenv("MOC_CACHE_DIR", str(tmp_path / "env-cache"))
    assert DataConfig().resolved_cache_dir() == tmp_path / "env-cache"
    assert DataConfig(cache_dir=str(tmp_path / "c")).resolved_cache_dir() == tmp_path / "c"


# -- tokenizers ----------------------------------------------------------------------------------


def test_t5_tokenizer_json_and_sentencepiece_give_identical_ids_on_the_c4_sample(shared_data, spm):
    docs = read_c4(shared_data)
    via_json = load_tokenizer(shared_data / "t5-tokenizer" / "tokenizer.json")
    via_spm = load_tokenizer(shared_data / "t5-tokenizer" / "spiece.model")
    assert via_json.eos_id == via_spm.eos_id == 1
    assert via_spm.vocab_size == 32000 and via_json.vocab_size == 32100
    a, b = via_json.encode_batch(docs), via_spm.encode_batch(docs)
    assert a == b
    assert a[0] == spm.encode(docs[0]) + [1]
    assert all(seq[-1] == 1 and 1 not in seq[:-1] for seq in a)  # exactly one EOS, at the end
    assert sum(map(len, a)) == 507_135  # the README's count, EOS included
    # the folder holds both: the .model is used
    assert load_tokenizer(shared_data / "t5-tokenizer").kind == "sentencepiece"
    assert via_spm.decode(a[3]) == spm.decode(spm.encode(docs[3]))


def test_tokenizer_save_load_and_pickle(shared_data, tmp_path):
    for name in ("tokenizer.json", "spiece.model"):
        tok = load_tokenizer(shared_data / "t5-tokenizer" / name)
        saved = tok.save(tmp_path / name.split(".")[0])
        again = load_tokenizer(saved.parent)
        text = "Packing documents into blocks of 256 tokens."
        assert again.encode(text) == tok.encode(text)
        assert again.identity == tok.identity
        assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_tokenizer_hub_name_only_from_the_local_cache(shared_data, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    empty = tmp_path / "hub"
    empty.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(empty))
    with pytest.raises(DataError) as err:
        load_tokenizer("t5-base")
    message = str(err.value)
    assert str(empty) in message and "models--t5-base" in message and "local path" in message
    # a cache laid out as huggingface_hub does it is found, under the name's new organisation too
    snapshot = empty / "models--google-t5--t5-base" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (empty / "models--google-t5--t5-base" / "refs").mkdir()
    (empty / "models--google-t5--t5-base" / "refs" / "main").write_text("abc123")
    (snapshot / "spiece.model").write_bytes((shared_data / "t5-tokenizer" / "spiece.model").read_bytes())
    tok = load_tokenizer("t5-base")
    assert tok.kind == "sentencepiece" and tok.encode("Hello world") == [8774, 296, 1]


def test_tokenizer_missing_path(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_tokenizer(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(DataError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)


# -- packing the C4 sample -----------------------------------------------------------------------


def test_c4_sample_blocks_are_the_sentencepiece_ids_concatenated_and_cut(shared_data, tmp_path, spm):
    cfg = c4_config(shared_data, tmp_path, seq_len=128, max_documents=50)
    dm = built(cfg)
    train = rows(dm.packed.train)
    expected = pack_reference(spm, read_c4(shared_data, 50), 128)
    assert train.shape == expected.shape and train.shape[1] == 128
    np.testing.assert_array_equal(train, expected)
    assert len(dm.packed.val) == 0
    info = dm.describe()
    assert info["documents"] == 50 and info["train_blocks"] == len(expected) and info["val_blocks"] == 0
    assert info["train_tokens"] == len(expected) * 128 and info["files"] == [str(shared_data / C4)]
    # the loader hands out these blocks: every batch is (batch, seq_len) int64 and the epoch covers them
    loader = dm.train_dataloader()
    seen = torch.cat([b["input_ids"] for b in loader])
    assert seen.dtype == torch.int64 and seen.shape == (len(loader) * 4, 128)
    assert len(loader) == len(expected) // 4
    kept = {tuple(r) for r in expected.tolist()}
    assert all(tuple(r) in kept for r in seen.tolist())


def test_split_is_by_document_disjoint_and_identical_on_two_builds(shared_data, tmp_path, spm):
    docs = read_c4(shared_data, 300)
    val_docs = [d for d in docs if held_out(d, 0.2)]
    train_docs = [d for d in docs if not held_out(d, 0.2)]
    assert 30 < len(val_docs) < 90
    builds = []
    for name in ("one", "two"):
        dm = built(c4_config(shared_data, tmp_path / name, val_fraction=0.2, max_documents=300))
        builds.append((rows(dm.packed.train), rows(dm.packed.val)))
        # each split is made of its own documents only, so they share none
        np.testing.assert_array_equal(builds[-1][0], pack_reference(spm, train_docs, 64))
        np.testing.assert_array_equal(builds[-1][1], pack_reference(spm, val_docs, 64))
        assert dm.describe()["val_documents"] == len(val_docs)
        assert dm.describe()["train_documents"] == len(train_docs)
    np.testing.assert_array_equal(builds[0][0], builds[1][0])
    np.testing.assert_array_equal(builds[0][1], builds[1][1])
    # the seed shuffles, it does not move documents between splits
    dm = built(c4_config(shared_data, tmp_path / "one", val_fraction=0.2, max_documents=300, seed=7))
    np.testing.assert_array_equal(rows(dm.packed.val), builds[0][1])


def test_second_build_loads_from_the_cache(shared_data, tmp_path, monkeypatch):
    from moc_lightning.data.tokenizer import TextTokenizer

    cfg = c4_config(shared_data, tmp_path, val_fraction=0.1)
    first = built(cfg)
    folder = first.packed.path
    assert folder.parent == tmp_path / "cache" / "packed" and (folder / "meta.json").is_file()

    def refuse(self, texts):
        raise AssertionError("tokenised again instead of loading the cache")

    monkeypatch.setattr(TextTokenizer, "encode_batch", refuse)
    second = built(cfg)
    assert second.packed.path == folder
    np.testing.assert_array_equal(rows(second.packed.train), rows(first.packed.train))
    # what the blocks depend on changes the fingerprint
    with pytest.raises(AssertionError, match="tokenised again"):
        built(cfg.replace(seq_len=32))
    with pytest.raises(AssertionError, match="tokenised again"):
        built(cfg.replace(max_documents=61))
    monkeypatch.undo()
    assert built(cfg.replace(seq_len=32)).packed.path != folder
    assert built(cfg.replace(seed=3)).packed.path == folder  # the seed only orders the loader


# -- other file kinds ----------------------------------------------------------------------------


def test_tinyshakespeare_txt_one_document_per_paragraph(shared_data, tmp_path, spm):
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    cfg = DataConfig(
        source="files",
        paths=[str(shared_data / "tinyshakespeare.txt")],
        tokenizer=str(shared_data / "t5-tokenizer" / "spiece.model"),
        seq_len=256,
        val_fraction=0.05,
        cache_dir=str(tmp_path),
    )
    dm = built(cfg)
    info = dm.describe()
    assert info["documents"] == len(paragraphs) > 7000
    train = [p for p in paragraphs if not held_out(p, 0.05)]
    val = [p for p in paragraphs if held_out(p, 0.05)]
    np.testing.assert_array_equal(rows(dm.packed.train), pack_reference(spm, train, 256))
    np.testing.assert_array_equal(rows(dm.packed.val), pack_reference(spm, val, 256))
    assert info["val_blocks"] > 0


def test_jsonl_and_parquet_files_and_folders(shared_data, tmp_path, spm):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = read_c4(shared_data, 40)
    folder = tmp_path / "corpus"
    folder.mkdir()
    with open(folder / "a.jsonl", "w") as f:
        for d in docs[:20]:
            f.write(json.dumps({"content": d, "id": 1}) + "\n")
    pq.write_table(pa.table({"content": docs[20:], "n": list(range(20))}), folder / "b.parquet")
    (folder / "notes.md").write_text("not data")
    tok = str(shared_data / "t5-tokenizer")
    common = dict(source="files", tokenizer=tok, seq_len=64, val_fraction=0.0, text_field="content")

    jsonl = built(DataConfig(paths=[str(folder / "a.jsonl")], cache_dir=str(tmp_path / "c1"), **common))
    np.testing.assert_array_equal(rows(jsonl.packed.train), pack_reference(spm, docs[:20], 64))
    parquet = built(DataConfig(paths=[str(folder / "b.parquet")], cache_dir=str(tmp_path / "c2"), **common))
    np.testing.assert_array_equal(rows(parquet.packed.train), pack_reference(spm, docs[20:], 64))
    # a folder: its supported files in sorted order, documents concatenated across kinds
    both = built(DataConfig(paths=[str(folder)], cache_dir=str(tmp_path / "c3"), **common))
    np.testing.assert_array_equal(rows(both.packed.train), pack_reference(spm, docs, 64))
    assert both.describe()["num_files"] == 2
    # a glob
    glob = built(DataConfig(paths=[str(folder / "*.parquet")], cache_dir=str(tmp_path / "c4"), **common))
    assert glob.describe()["files"] == [str(folder / "b.parquet")]
    # streamed, the folder's two kinds of files give the same blocks
    streamed = built(DataConfig(paths=[str(folder)], cache_dir=str(tmp_path / "c5"), streaming=True, **common))
    stream = streamed.train_dataloader().dataset
    np.testing.assert_array_equal(np.stack(list(stream.blocks())), rows(both.packed.train))


# -- errors --------------------------------------------------------------------------------------


def _bad_jsonl(tmp_path: Path) -> list:
    lines = ['{"text": "first document"}', '{"text": "second document"}', '{"text": "third, broken', '{"text": "x"}']
    plain = tmp_path / "broken.jsonl"
    plain.write_text("\n".join(lines) + "\n")
    zipped = tmp_path / "broken.jsonl.gz"
    with gzip.open(zipped, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return [plain, zipped]


@pytest.mark.parametrize("streaming", [False, True])
def test_malformed_json_names_the_file_and_line(shared_data, tmp_path, streaming):
    tok = str(shared_data / "t5-tokenizer")
    for path in _bad_jsonl(tmp_path):
        cfg = DataConfig(source="files", paths=[str(path)], tokenizer=tok, seq_len=4, val_fraction=0.0,
                         cache_dir=str(tmp_path / "cache"), streaming=streaming)
        with pytest.raises(DataError) as err:
            dm = built(cfg)
            next(iter(dm.train_dataloader()))
        assert str(path) in str(err.value) and "line 3" in str(err.value)


def test_path_errors_are_data_errors_with_clear_words(shared_data, tmp_path):
    tok = str(shared_data / "t5-tokenizer")

    def build(paths, **kw):
        built(DataConfig(source="files", paths=paths, tokenizer=tok, cache_dir=str(tmp_path / "c"), **kw))

    with pytest.raises(DataError, match="no such file or folder: .*missing.jsonl"):
        build([str(tmp_path / "missing.jsonl")])
    with pytest.raises(DataError, match="no files matched"):
        build([str(tmp_path / "*.jsonl")])
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"unsupported file extension.*table\.csv.*\.parquet"):
        build([str(tmp_path / "table.csv")])
    (tmp_path / "body.jsonl").write_text('{"body": "hello", "url": "u"}\n')
    with pytest.raises(DataError) as err:
        build([str(tmp_path / "body.jsonl")])
    assert "body.jsonl" in str(err.value) and "no field 'text'" in str(err.value) and "body, url" in str(err.value)
    with pytest.raises(DataError, match="no field 'text'"):
        build([str(tmp_path / "body.jsonl")], streaming=True)


# -- the embedded corpus -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("embedded-cache")


def test_embedded_corpus_offline_deterministic_and_large_enough():
    from moc_lightning.data import embedded

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    docs = embedded.embedded_documents()
    assert sum(map(len, docs)) >= 1_000_000 and len(docs) > 300
    assert all(isinstance(d, str) and d.strip() for d in docs)
    # same sources, same corpus (checked on a part of the stdlib to keep the test fast)
    part = embedded.stdlib_root() / "email"
    assert embedded.extract_documents(part) == embedded.extract_documents(part)
    assert embedded.embedded_corpus_key() == embedded.embedded_corpus_key()
    assert not any("/test/" in str(p) for p in embedded.stdlib_source_files())


def test_embedded_tokenizer_trained_once_deterministic_and_round_trips(embedded_cache):
    from moc_lightning.data import embedded

    tok = load_tokenizer("embedded", cache_dir=embedded_cache)
    assert tok.vocab_size == 4096 and tok.eos_id == tok.backend.token_to_id("<|endoftext|>")
    sentence = "Return a new list containing all items from the iterable in ascending order."
    ids = tok.encode(sentence)
    assert ids[-1] == tok.eos_id and tok.decode(ids) == sentence
    assert len(ids) < len(sentence) / 2.5  # it learned merges
    path = embedded.embedded_tokenizer_path(embedded_cache)
    mtime = path.stat().st_mtime_ns
    assert load_tokenizer("embedded", cache_dir=embedded_cache).identity == tok.identity
    assert path.stat().st_mtime_ns == mtime  # loaded, not trained again
    few = embedded.embedded_documents()[:80]
    one = embedded.train_bpe_tokenizer(few, vocab_size=600)
    two = embedded.train_bpe_tokenizer(few, vocab_size=600)
    assert one.to_str() == two.to_str()


def test_embedded_datamodule_builds(embedded_cache):
    dm = built(DataConfig(seq_len=128, batch_size=4, cache_dir=str(embedded_cache)))
    info = dm.describe()
    assert info["source"] == "embedded" and info["train_blocks"] > 1000 and info["val_blocks"] > 0
    assert dm.vocab_size == 4096
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 128) and int(batch["input_ids"].max()) < dm.vocab_size


# -- resumable loaders ---------------------------------------------------------------------------


def _blocks(n: int, seq_len: int = 4):
    import datasets

    from moc_lightning.data.packing import _features

    data = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)
    return datasets.Dataset.from_dict({"input_ids": data.tolist()}, features=_features(seq_len))


def _ids(batches) -> list:
    return [b["input_ids"][:, 0].div(4, rounding_mode="floor").tolist() for b in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_resumes_with_the_next_batch_of_the_same_epoch(num_workers):
    from moc_lightning.data.loader import ResumableDataLoader

    blocks = _blocks(50)
    make = lambda: ResumableDataLoader(blocks, 4, seed=3, num_workers=num_workers)  # noqa: E731
    first = make()
    epoch0 = _ids(first)
    epoch1 = _ids(first)  # a new pass is the next epoch, with a new order
    assert len(epoch0) == len(first) == 12 and epoch0 != epoch1
    assert sorted(sum(epoch0, [])) == sorted(set(sum(epoch0, [])))  # no block twice in an epoch

    run = make()
    it = iter(run)
    consumed = [next(it) for _ in range(5)]
    assert _ids(consumed) == epoch0[:5]
    state = run.state_dict()
    assert state["epoch"] == 0 and state["batches"] == 5
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict()["batches"] == 5
    assert _ids(resumed) == epoch0[5:]  # batch 6 onwards, then the epoch ends
    assert _ids(resumed) == epoch1
    # a state taken at the end of an epoch resumes at the start of the next
    done = make()
    list(done)
    after = make()
    after.load_state_dict(done.state_dict())
    assert _ids(after) == epoch1


def test_loader_shards_ranks_and_resumes_across_world_sizes():
    from moc_lightning.data.loader import ResumableDataLoader

    blocks = _blocks(64)
    single = _ids(ResumableDataLoader(blocks, 2, seed=1, world_size=1, rank=0))
    flat = sum(single, [])
    ranks = [_ids(ResumableDataLoader(blocks, 2, seed=1, world_size=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 16
    assert sorted(sum(ranks[0] + ranks[1], [])) == sorted(flat)  # disjoint, together the whole epoch
    assert set(sum(ranks[0], [])).isdisjoint(sum(ranks[1], []))
    # 6 batches of 2 on one rank = 12 blocks = 3 steps of 2 ranks x 2
    run = ResumableDataLoader(blocks, 2, seed=1)
    it = iter(run)
    for _ in range(6):
        next(it)
    state = run.state_dict()
    rest = []
    for r in (0, 1):
        loader = ResumableDataLoader(blocks, 2, seed=1, world_size=2, rank=r)
        loader.load_state_dict(state)
        rest += sum(_ids(loader), [])
    assert sorted(rest) == sorted(flat[12:])


def test_validation_loader_keeps_order_and_every_block():
    from moc_lightning.data.loader import ResumableDataLoader

    loader = ResumableDataLoader(_blocks(10), 4, shuffle=False)
    assert _ids(loader) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_loader_refuses_a_state_from_other_data():
    from moc_lightning.data.loader import ResumableDataLoader

    state = ResumableDataLoader(_blocks(20), 2).state_dict()
    with pytest.raises(DataError, match="num_items"):
        ResumableDataLoader(_blocks(21), 2).load_state_dict(state)


# -- streaming -----------------------------------------------------------------------------------


def test_streaming_gives_the_same_blocks_as_the_packed_path(shared_data, tmp_path):
    cfg = c4_config(shared_data, tmp_path, val_fraction=0.1, max_documents=120, batch_size=5)
    packed = built(cfg)
    streamed = built(cfg.replace(streaming=True))
    assert streamed.describe()["streaming"] and streamed.describe()["train_blocks"] is None
    batches = list(streamed.train_dataloader())
    stream_rows = torch.cat([b["input_ids"] for b in batches]).numpy()
    train = rows(packed.packed.train)
    assert len(batches) == len(train) // 5
    np.testing.assert_array_equal(stream_rows, train[: len(stream_rows)])
    np.testing.assert_array_equal(rows(streamed.packed.val), rows(packed.packed.val))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_streaming_loader_resumes(shared_data, tmp_path, num_workers):
    cfg = c4_config(shared_data, tmp_path, max_documents=40, streaming=True, num_workers=num_workers)
    dm = built(cfg)
    everything = [b["input_ids"] for b in dm.train_dataloader()]
    loader = dm.train_dataloader()
    it = iter(loader)
    for _ in range(7):
        next(it)
    state = loader.state_dict()
    assert state["batches"] == 7 and state["blocks"] == 28
    again = built(cfg).train_dataloader()
    again.load_state_dict(state)
    rest = [b["input_ids"] for b in again]
    assert len(rest) == len(everything) - 7
    assert all(torch.equal(a, b) for a, b in zip(rest, everything[7:]))


def test_streaming_ranks_read_alternate_documents(shared_data, tmp_path, spm):
    from moc_lightning.data.loader import PackedStream
    from moc_lightning.data.sources import load_documents

    cfg = c4_config(shared_data, tmp_path, max_documents=30, streaming=True)
    tok = load_tokenizer(cfg.tokenizer)
    docs = read_c4(shared_data, 30)
    for rank in (0, 1):
        stream = PackedStream(load_documents(cfg, streaming=True), tok, 64, 4, rank=rank, world_size=2)
        np.testing.assert_array_equal(np.stack(list(stream.blocks())), pack_reference(spm, docs[rank::2], 64))


def test_c4_source_streams_train_and_caches_validation_blocks(shared_data, tmp_path, spm, monkeypatch):
    """The 'c4' code path, offline: the Hub's allenai/c4 is replaced by the local C4 sample."""
    import datasets

    asked = []
    real = datasets.load_dataset

    def local_c4(name, config=None, *, split, streaming=False, **kw):
        asked.append((name, config, split, streaming))
        return real("json", data_files=str(shared_data / C4), split="train", streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", local_c4)  # sources imports it at call time
    cfg = DataConfig(source="c4", tokenizer=str(shared_data / "t5-tokenizer"), seq_len=64, batch_size=4,
                     max_documents=30, c4_val_blocks=5, cache_dir=str(tmp_path))
    dm = built(cfg)
    expected = pack_reference(spm, read_c4(shared_data), 64)
    np.testing.assert_array_equal(rows(dm.packed.val), expected[:5])
    first = next(iter(dm.train_dataloader()))["input_ids"].numpy()
    np.testing.assert_array_equal(first, expected[:4])
    assert ("allenai/c4", "en", "validation", True) in asked and ("allenai/c4", "en", "train", True) in asked
    assert dm.describe()["val_blocks"] == 5


# -- Lightning: stop, resume from a mid-epoch checkpoint, see the same batches --------------------


def _recorder(vocab_size: int):
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab_size, 4)
            self.head = torch.nn.Linear(4, vocab_size)
            self.seen = {}

        def training_step(self, batch, batch_idx):
            ids = batch["input_ids"]
            self.seen[self.global_step] = ids.clone()
            logits = self.head(self.embed(ids[:, :-1]))
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Recorder()


def _fit(cfg: DataConfig, root: Path, max_steps: int, ckpt_path=None, every: int = 0):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    dm = MoCDataModule(cfg)
    model = _recorder(dm.vocab_size)
    callbacks = [ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=bool(every),
        callbacks=callbacks,
        default_root_dir=root,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.seen, dm


@pytest.mark.parametrize("streaming", [False, True])
def test_lightning_resume_from_mid_epoch_checkpoint_sees_the_same_batches(shared_data, tmp_path, streaming):
    import warnings

    warnings.filterwarnings("ignore", module="lightning")
    cfg = c4_config(shared_data, tmp_path, max_documents=3, seq_len=16, batch_size=4, streaming=streaming)
    per_epoch = built(cfg.replace(streaming=False)).describe()["train_blocks"] // 4
    assert per_epoch >= 6
    total = per_epoch + 4
    full, _ = _fit(cfg, tmp_path / "ckpt", total, every=1)
    assert sorted(full) == list(range(total))
    # a new epoch brings a new order (packed) or the same stream again (streamed)
    assert torch.equal(full[0], full[per_epoch]) is streaming

    # mid-epoch, the checkpoint at the last batch of the first epoch, and mid-way through the second
    for stop in (3, per_epoch, per_epoch + 2):
        ckpt = tmp_path / "ckpt" / f"step={stop}.ckpt"
        assert ckpt.is_file()
        resumed, _ = _fit(cfg, tmp_path / f"resumed-{stop}", total, ckpt_path=str(ckpt))
        assert sorted(resumed) == list(range(stop, total))
        for step, ids in resumed.items():
            assert torch.equal(ids, full[step]), f"step {step} after resuming at {stop}"
