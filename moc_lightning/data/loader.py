"""Resumable DataLoaders: they shard by rank themselves and can continue mid-epoch.

Lightning (2.6) saves a training dataloader's state in the checkpoint when the dataloader has
`state_dict()` and `load_state_dict()` (`lightning.fabric.utilities.types._Stateful`, checked by
`CombinedLoader._state_dicts`; the fit loop calls `load_state_dict` on restore before it creates the
iterator). Both loaders here do; their state says which epoch they are in and how many batches of it
were consumed, and a restored loader skips those batches, so a run resumed from a mid-epoch
checkpoint sees exactly the batches the uninterrupted run would have seen.

`ResumableDataLoader` (packed, map-style data):
  - order: a permutation of all blocks seeded by (seed, epoch), new every epoch (or the plain
    order when shuffle=False, for validation);
  - ranks: rank r of w takes every w-th entry of that order, after trimming it so that every rank
    has the same number of batches (DDP needs that); rank and world size come from
    torch.distributed when it is initialised. Its sampler is a `DistributedSampler`, so Lightning
    never replaces it, but run the Trainer with `use_distributed_sampler=False` all the same;
  - epochs: Lightning calls `sampler.set_epoch(e)` before each epoch; used outside Lightning the
    loader moves to the next epoch by itself when one ends;
  - state: `{'epoch', 'batches', ...}`, `batches` counted in the main process as batches are handed
    out (so worker processes, which run ahead, do not inflate it). After k batches the ranks
    together have consumed the first k * batch_size * world_size entries of the epoch's order,
    which also lets a run resume with another world size or batch size.

`StreamingDataLoader` (a stream of documents packed on the fly): its state is the number of batches
consumed in the current pass over the stream; a restored loader reads the stream from its start
and skips that many (simple and correct; the skipped part is tokenised again). Ranks take their
documents with `datasets.distributed.split_dataset_by_node`. It uses at most one worker process.
Lightning reads an unsized loader one batch ahead, so when the loader is given `consumed` (a
callable returning the trainer's count of batches consumed in the epoch; `MoCDataModule` does
this) it reports that count instead of the batches it has handed out.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from .config import DataError


def dist_rank_world() -> tuple:
    """(rank, world size) from torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _resolve_rank(rank: Optional[int], world_size: Optional[int]) -> tuple:
    auto_rank, auto_world = dist_rank_world()
    rank = auto_rank if rank is None else int(rank)
    world_size = auto_world if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    return rank, world_size


# -- map-style -----------------------------------------------------------------------------------


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks (a `datasets.Dataset` with input_ids: int32[seq_len]) read straight from Arrow:
    `__getitems__` returns an int32 array (n, seq_len) for a list of indices."""

    def __init__(self, blocks) -> None:
        self.blocks = blocks.with_format("arrow")
        feature = blocks.features["input_ids"]
        self.seq_len = int(getattr(feature, "length", -1))

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitems__(self, indices) -> np.ndarray:
        import pyarrow.compute as pc

        table = self.blocks[list(indices)]
        flat = pc.list_flatten(table.column("input_ids")).to_numpy()
        return flat.reshape(len(indices), -1)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.__getitems__([index])[0]


def collate_blocks(rows) -> dict:
    """A batch: {'input_ids': int64 tensor (batch, seq_len)}; labels are the same ids."""
    array = rows if isinstance(rows, np.ndarray) else np.stack([np.asarray(r) for r in rows])
    return {"input_ids": torch.from_numpy(array.astype(np.int64))}


class ResumableSampler(DistributedSampler):
    """This rank's block indices for one epoch, starting at a given batch (see the module doc)."""

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        rank, world_size = _resolve_rank(rank, world_size)
        super().__init__(range(num_items), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.drop_last_batch = bool(drop_last)
        self.start_batch = 0
        if drop_last:
            per_rank = (self.num_items // (world_size * self.batch_size)) * self.batch_size
        else:
            per_rank = self.num_items // world_size
        self.per_rank = per_rank
        self.num_samples = per_rank
        self.total_size = per_rank * world_size

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last_batch:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """All ranks' indices for an epoch, in the order they are consumed."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        return order[: self.total_size]

    def rank_indices(self, epoch: int) -> np.ndarray:
        return self.order(epoch)[self.rank :: self.num_replicas]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        indices = self.rank_indices(self.epoch)[self.start_batch * self.batch_size :]
        return iter(indices.tolist())

    def __len__(self) -> int:
        return self.per_rank


class _Progress:
    """Epoch bookkeeping shared by both loaders: which epoch the next pass is, a pending skip
    (from load_state_dict), and what the current pass has handed out."""

    def __init__(self) -> None:
        self.next_epoch = 0
        self.pending: Optional[tuple] = None  # (epoch, batches to skip)
        self.epoch: Optional[int] = None  # epoch of the current pass (None before the first)
        self.handed_out = 0  # batches of the current epoch handed out so far, skipped ones included
        self.finished = False

    def begin(self, epoch: int) -> int:
        """Start a pass over `epoch`; returns how many batches of it to skip."""
        skip = 0
        if self.pending is not None:
            pending_epoch, pending_skip = self.pending
            skip = pending_skip if pending_epoch == epoch else 0
            self.pending = None
        self.epoch, self.handed_out, self.finished = epoch, skip, False
        return skip

    def finish(self) -> bool:
        """Mark the current pass as complete; True the first time."""
        if self.finished:
            return False
        self.finished = True
        if self.next_epoch == self.epoch:
            self.next_epoch = self.epoch + 1
        return True


class _PassIterator:
    """The iterator of one pass. It starts the pass on its first `next` (not when created), so
    that an epoch set after `iter()` (as Lightning does) is honoured, worker processes included."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.inner = None

    def __iter__(self):
        return self

    def __next__(self):
        loader = self.loader
        if self.inner is None:
            self.inner = loader._begin_pass()
        try:
            batch = next(self.inner)
        except StopIteration:
            loader._finish_pass()
            raise
        loader._progress.handed_out += 1
        if loader._epoch_done():
            loader._finish_pass()
        return batch


class ResumableDataLoader(DataLoader):
    """A DataLoader over packed blocks with a seeded per-epoch shuffle, its own rank sharding and a
    resumable state (see the module's docstring). Batches: {'input_ids': int64 (batch, seq_len)}."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: Optional[bool] = None,
        num_workers: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        pin_memory: bool = False,
        **kwargs,
    ) -> None:
        if not isinstance(dataset, torch.utils.data.Dataset):
            dataset = BlockDataset(dataset)
        drop_last = shuffle if drop_last is None else drop_last
        sampler = ResumableSampler(
            len(dataset), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size
        )
        kwargs.setdefault("collate_fn", collate_blocks)
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=pin_memory,
            **kwargs,
        )
        self._progress = _Progress()

    # the pass ------------------------------------------------------------------------------

    def __iter__(self):
        return _PassIterator(self)

    def _begin_pass(self):
        sampler: ResumableSampler = self.sampler
        epoch = sampler.epoch
        sampler.start_batch = self._progress.begin(epoch)
        return super().__iter__()

    def _epoch_done(self) -> bool:
        return self._progress.handed_out >= self.sampler.batches_per_epoch

    def _finish_pass(self) -> None:
        # used outside Lightning, the next pass is the next epoch (Lightning sets the same epoch)
        if self._progress.finish() and self.sampler.epoch == self._progress.epoch:
            self.sampler.set_epoch(self._progress.epoch + 1)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    # state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        sampler: ResumableSampler = self.sampler
        progress = self._progress
        if progress.pending is not None:
            epoch, batches = progress.pending
        elif progress.epoch is None:
            epoch, batches = sampler.epoch, 0
        else:
            epoch, batches = progress.epoch, progress.handed_out
        return {
            "kind": "map",
            "epoch": int(epoch),
            "batches": int(batches),
            "samples": int(batches) * sampler.batch_size * sampler.num_replicas,
            "num_items": sampler.num_items,
            "batch_size": sampler.batch_size,
            "world_size": sampler.num_replicas,
            "seed": sampler.seed,
            "shuffle": sampler.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        sampler: ResumableSampler = self.sampler
        if state.get("kind") != "map":
            raise DataError(f"cannot resume a packed-data loader from a {state.get('kind')!r} loader state")
        for key, mine in (("num_items", sampler.num_items), ("seed", sampler.seed), ("shuffle", sampler.shuffle)):
            if state[key] != mine:
                raise DataError(
                    f"cannot resume the data loader: the checkpoint's {key} is {state[key]!r} and this run's is "
                    f"{mine!r} (the packed data or DataConfig changed since the checkpoint)"
                )
        epoch, batches = int(state["epoch"]), int(state["batches"])
        per_step = sampler.batch_size * sampler.num_replicas
        if state["batch_size"] != sampler.batch_size or state["world_size"] != sampler.num_replicas:
            samples = int(state["samples"])
            batches = samples // per_step
            if samples % per_step:
                warnings.warn(
                    f"resuming with {sampler.num_replicas} ranks x batch {sampler.batch_size} from a checkpoint taken "
                    f"with {state['world_size']} x {state['batch_size']}: {samples % per_step} blocks of the current "
                    "epoch are seen twice",
                    stacklevel=2,
                )
        if batches >= sampler.batches_per_epoch:
            epoch, batches = epoch + 1, 0
        sampler.set_epoch(epoch)
        self._progress = _Progress()
        self._progress.next_epoch = epoch
        self._progress.pending = (epoch, batches)


# -- streaming -----------------------------------------------------------------------------------


class PackedStream(IterableDataset):
    """Batches of blocks packed on the fly from a stream of documents.

    documents   a `datasets.IterableDataset` (or `Dataset`) with a 'text' column; this rank's share
                is taken with `split_dataset_by_node`
    split       None (all documents), 'train' or 'val' (by `packing.is_validation`)
    on_error    maps an exception met while reading to the one to raise (e.g. a DataError)
    """

    def __init__(
        self,
        documents,
        tokenizer,
        seq_len: int,
        batch_size: int,
        *,
        split: Optional[str] = None,
        val_fraction: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        on_error: Optional[Callable] = None,
    ) -> None:
        self.documents = documents
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.split = split
        self.val_fraction = float(val_fraction)
        self.rank, self.world_size = int(rank), int(world_size)
        self.on_error = on_error
        self.skip_batches = 0  # set by StreamingDataLoader before each pass
        self.epoch = 0

    def _rank_documents(self):
        documents = self.documents
        if hasattr(documents, "set_epoch"):
            documents.set_epoch(self.epoch)
        if self.world_size > 1:
            from datasets.distributed import split_dataset_by_node

            documents = split_dataset_by_node(documents, rank=self.rank, world_size=self.world_size)
        return documents

    def blocks(self):
        """This rank's blocks (int32 arrays of seq_len), from the start of the stream."""
        from .packing import stream_blocks, text_batches

        return stream_blocks(
            text_batches(self._rank_documents()),
            self.tokenizer,
            self.seq_len,
            split=self.split,
            val_fraction=self.val_fraction,
        )

    def __iter__(self):
        skip_blocks = self.skip_batches * self.batch_size
        blocks = self.blocks()
        buffer = []
        try:
            for i, block in enumerate(blocks):
                if i < skip_blocks:
                    continue
                buffer.append(block)
                if len(buffer) == self.batch_size:
                    yield collate_blocks(np.stack(buffer))
                    buffer = []
        except Exception as exc:
            if self.on_error is None:
                raise
            raise self.on_error(exc) from exc
        # the last, partial batch is dropped, like the packed loader's


class StreamingDataLoader(DataLoader):
    """A DataLoader over a `PackedStream`, with a resumable state (see the module's docstring)."""

    def __init__(self, stream: PackedStream, *, num_workers: int = 0, consumed: Optional[Callable] = None, **kwargs):
        kwargs.pop("persistent_workers", None)  # the stream is handed to its worker at each pass
        super().__init__(stream, batch_size=None, num_workers=min(int(num_workers), 1), **kwargs)
        self._progress = _Progress()
        self._consumed = consumed

    def __iter__(self):
        return _PassIterator(self)

    def _begin_pass(self):
        stream: PackedStream = self.dataset
        epoch = self._progress.next_epoch
        stream.epoch = epoch
        stream.skip_batches = self._progress.begin(epoch)
        return super().__iter__()

    def _epoch_done(self) -> bool:
        return False  # only the end of the stream ends a pass

    def _finish_pass(self) -> None:
        self._progress.finish()

    def set_epoch(self, epoch: int) -> None:
        self._progress.next_epoch = int(epoch)

    def _consumed_batches(self) -> int:
        progress = self._progress
        if self._consumed is not None and not progress.finished:
            try:
                count = self._consumed()
            except Exception:
                count = None
            if count is not None and 0 <= count <= progress.handed_out:
                return int(count)
        return progress.handed_out

    def state_dict(self) -> dict:
        stream: PackedStream = self.dataset
        progress = self._progress
        if progress.pending is not None:
            (epoch, batches), exhausted = progress.pending, False
        elif progress.epoch is None:
            epoch, batches, exhausted = progress.next_epoch, 0, False
        else:
            epoch, batches = progress.epoch, self._consumed_batches()
            exhausted = progress.finished
        return {
            "kind": "stream",
            "epoch": int(epoch),
            "batches": int(batches),
            "exhausted": bool(exhausted),
            "blocks": int(batches) * stream.batch_size,
            "batch_size": stream.batch_size,
            "world_size": stream.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        stream: PackedStream = self.dataset
        if state.get("kind") != "stream":
            raise DataError(f"cannot resume a streaming loader from a {state.get('kind')!r} loader state")
        if state["world_size"] != stream.world_size:
            raise DataError(
                f"cannot resume the streaming loader with {stream.world_size} ranks from a checkpoint taken with "
                f"{state['world_size']}: each rank's share of the stream would differ"
            )
        epoch = int(state["epoch"])
        blocks = int(state["blocks"])
        if state.get("exhausted"):
            epoch, blocks = epoch + 1, 0
        batches = blocks // stream.batch_size
        if blocks % stream.batch_size:
            warnings.warn(f"resuming the stream with batch {stream.batch_size}: {blocks % stream.batch_size} blocks are seen twice", stacklevel=2)
        self._progress = _Progress()
        self._progress.next_epoch = epoch
        self._progress.pending = (epoch, batches)
