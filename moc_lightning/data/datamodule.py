"""`MoCDataModule`: the data side of training as one LightningDataModule.

    dm = MoCDataModule(DataConfig(source="files", paths=["c4/*.json.gz"], tokenizer="t5-tokenizer"))
    vocab = dm.vocab_size                     # build the model with a vocabulary >= this
    trainer = Trainer(..., use_distributed_sampler=False)
    trainer.fit(model, datamodule=dm)         # batches: {'input_ids': int64 (batch, seq_len)}

prepare_data() (one process per node) builds what can be cached: the embedded tokenizer, the packed
splits (or, streamed, the validation blocks). setup() loads them on every process (building them if
prepare_data was not called). The training loader shuffles per epoch with `seed`, shards by rank
itself and is resumable mid-epoch through Lightning's checkpoints; the validation loader keeps the
stored order. Labels are the input ids (the model shifts them).
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl

from .config import DataConfig, DataError
from .loader import PackedStream, ResumableDataLoader, StreamingDataLoader, dist_rank_world
from .packing import PackedData, get_packed, get_stream_val
from .tokenizer import TextTokenizer, load_tokenizer


class MoCDataModule(pl.LightningDataModule):
    """Data for pre-training from a `DataConfig` (or its fields as keyword arguments)."""

    def __init__(self, config: Optional[DataConfig] = None, **fields) -> None:
        super().__init__()
        if config is None:
            config = DataConfig(**fields)
        elif fields:
            config = config.replace(**fields)
        if not isinstance(config, DataConfig):
            raise TypeError(f"MoCDataModule needs a DataConfig, not {type(config).__name__}")
        self.config = config
        self._tokenizer: Optional[TextTokenizer] = None
        self.packed: Optional[PackedData] = None  # map-style: both splits; streamed: validation only
        self._train_loader = None
        self._ready = False

    # -- tokenizer ------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            cfg = self.config
            self._tokenizer = load_tokenizer(cfg.tokenizer_spec, cache_dir=cfg.resolved_cache_dir())
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size: every id in a batch is below it."""
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    # -- Lightning hooks ------------------------------------------------------------------------

    def prepare_data(self) -> None:
        cfg = self.config
        if cfg.is_streaming:
            get_stream_val(cfg, self.tokenizer)
        else:
            get_packed(cfg, self.tokenizer)

    def setup(self, stage: Optional[str] = None) -> None:
        if self._ready:
            return
        cfg = self.config
        self.packed = get_stream_val(cfg, self.tokenizer) if cfg.is_streaming else get_packed(cfg, self.tokenizer)
        self._ready = True

    def train_dataloader(self):
        self.setup("fit")
        cfg = self.config
        rank, world_size = dist_rank_world()
        if cfg.is_streaming:
            loader = StreamingDataLoader(
                self._train_stream(rank, world_size), num_workers=cfg.num_workers, consumed=self._consumed_batches
            )
        else:
            loader = ResumableDataLoader(
                self.packed.train,
                cfg.batch_size,
                shuffle=True,
                seed=cfg.seed,
                num_workers=cfg.num_workers,
                rank=rank,
                world_size=world_size,
            )
        self._train_loader = loader
        return loader

    def val_dataloader(self):
        self.setup("validate")
        cfg = self.config
        rank, world_size = dist_rank_world()
        return ResumableDataLoader(
            self.packed.val,
            cfg.batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=cfg.num_workers,
            rank=rank,
            world_size=world_size,
        )

    def _train_stream(self, rank: int, world_size: int) -> PackedStream:
        from functools import partial

        from .sources import load_c4_documents, load_documents, stream_error

        cfg = self.config
        if cfg.source == "c4":
            documents, split = load_c4_documents("train", max_documents=cfg.max_documents), None
        else:
            documents, split = load_documents(cfg, streaming=True), "train"
        return PackedStream(
            documents,
            self.tokenizer,
            cfg.seq_len,
            cfg.batch_size,
            split=split,
            val_fraction=cfg.val_fraction,
            rank=rank,
            world_size=world_size,
            on_error=partial(stream_error, cfg),
        )

    def _consumed_batches(self) -> Optional[int]:
        """The trainer's count of training batches consumed in the current epoch (Lightning reads an
        unsized loader one batch ahead, so the loader's own count runs one over)."""
        trainer = self.trainer
        if trainer is None or getattr(trainer.state, "fn", None) != "fit":
            return None
        try:
            return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        except AttributeError:
            return None

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What the checkpoint records about the data (the loader's position is saved by Lightning
        from the loader itself)."""
        state = {"config": self.config.to_dict(), "tokenizer": self.tokenizer.identity}
        if self.packed is not None:
            state["fingerprint"] = self.packed.meta.get("fingerprint")
        return state

    def load_state_dict(self, state: dict) -> None:
        mine = self.tokenizer.identity
        if state.get("tokenizer") not in (None, mine):
            raise DataError(
                f"the checkpoint was trained with tokenizer {state['tokenizer']} but this run loads {mine} "
                f"({self.tokenizer.name}): the token ids would not mean the same"
            )

    # -- logging --------------------------------------------------------------------------------

    def describe(self) -> dict:
        """A short summary for logging: source, files, documents, blocks and tokens per split."""
        self.setup()
        cfg, meta = self.config, (self.packed.meta if self.packed is not None else {})
        files = meta.get("files") or []
        summary = {
            "source": cfg.source,
            "streaming": cfg.is_streaming,
            "files": files[:10] + ([f"... {len(files) - 10} more"] if len(files) > 10 else []),
            "num_files": len(files),
            "tokenizer": self.tokenizer.name,
            "vocab_size": self.vocab_size,
            "seq_len": cfg.seq_len,
            "batch_size": cfg.batch_size,
            "cache": str(self.packed.path) if self.packed is not None else None,
        }
        if cfg.is_streaming:
            summary.update(
                documents=None, train_documents=None, val_documents=None, train_blocks=None, train_tokens=None,
                val_blocks=meta.get("val_blocks"), val_tokens=meta.get("val_tokens"),
            )
        else:
            summary.update(
                documents=meta.get("documents"),
                train_documents=meta.get("train_documents"),
                val_documents=meta.get("val_documents"),
                train_blocks=meta.get("train_blocks"),
                val_blocks=meta.get("val_blocks"),
                train_tokens=meta.get("train_blocks", 0) * cfg.seq_len,
                val_tokens=meta.get("val_blocks", 0) * cfg.seq_len,
            )
        return summary
