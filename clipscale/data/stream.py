"""One rank's stream of batches from shards: the plan of sources.py read through the stages.

The stream is an IterableDataset whose pass (epoch, start position) the EpochLoader sets in
shared memory before each iteration, so that persistent workers see it.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import random
from collections.abc import Callable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from clipscale.data.decode import random_crop_of
from clipscale.data.pipeline import batched, decoded, encoded, with_trailing_skips
from clipscale.data.reading import SkipCounter, read_segments, shuffled
from clipscale.data.sources import (
    check_countable,
    cumulative,
    epoch_order,
    one_pass_plan,
    resampled_urls,
    strided_plan,
    worker_batch_ids,
)
from clipscale.data.sources import shard_sizes as read_shard_sizes


class ShardStream(IterableDataset):
    """Batches from shards for one rank: resampled for training, or each sample once per epoch.

    `rank`/`world_size` are explicit so one process can build every rank's view (tests); the
    WebDataModule passes Lightning's. `num_workers` must be the loader's: the plan gives worker
    w the batches k with k mod W = w, the order in which the DataLoader collects them.
    `decode="device"` ships encoded bytes for decode.DeviceDecoder; `max_foils` reads each
    sample's foils.json into `foil_texts`/`foil_mask`. One pass (`resampled=False`) needs
    per-shard sample counts: `shard_sizes`, else sizes.json beside the shards, else (training)
    the local shards' tar headers; an evaluation stream without them deals whole shards out.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        transform: Callable,
        tokenizer: Callable,
        batch_size: int,
        training: bool,
        resampled: bool = False,
        shard_weights: list[float] | None = None,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shard_sizes: list[int] | None = None,
        decode: str = "worker",
        max_foils: int | None = None,
    ) -> None:
        super().__init__()
        if decode not in ("worker", "device"):
            raise ValueError(f"ShardStream decode={decode!r}: expected worker or device")
        if not urls:
            raise ValueError("ShardStream needs at least one shard url")
        self.urls = urls
        if training:
            check_countable(
                urls, "data.train_shards", resampled=resampled, samples_per_epoch=samples_per_epoch
            )
        self.sizes = None
        if not resampled:
            self.sizes = shard_sizes or read_shard_sizes(urls, count_unlisted=training)
        if resampled and samples_per_epoch is None:
            raise ValueError("resampled shards need samples_per_epoch (the epoch never runs dry)")
        self.transform, self.tokenizer = transform, tokenizer
        # decode=device: ship bytes (+ the crop box RandomResizedCrop would draw) instead of pixels
        self.decode, self.crop = decode, random_crop_of(transform) if training else None
        self.max_foils = max_foils  # foils.json captions per sample (hard negatives), or None
        self.batch_size, self.training, self.resampled = batch_size, training, resampled
        self.cum_weights = cumulative(shard_weights)
        self.samples_per_epoch, self.shuffle_buffer = samples_per_epoch, shuffle_buffer
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.workers = max(1, num_workers)
        # Shared memory, so that persistent workers see what the main process sets per pass.
        self.epoch = multiprocessing.Value("q", 0)
        self.done = multiprocessing.Value("q", 0)  # batches of the epoch taken before this pass
        self.salt = multiprocessing.Value("q", 0)  # > 0: an approximate resume's fresh draw
        self.cursors = multiprocessing.Array("q", self.workers)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard and sample order the next pass produces, from its start."""
        self.start(epoch, 0, [0] * self.workers, 0)

    def start(self, epoch: int, done: int, cursors: list[int], salt: int) -> None:
        """Make the next pass continue `epoch` after `done` batches, each worker at its cursor."""
        self.epoch.value, self.done.value, self.salt.value = epoch, done, salt
        self.cursors[:] = cursors

    def plan(self, epoch: int, salt: int = 0):
        """This rank's EpochPlan for a one-pass epoch (None when resampled)."""
        if self.resampled:
            return None
        order = epoch_order(len(self.urls), _tag(self.seed, salt), epoch, shuffle=self.training)
        if self.sizes is None:
            return strided_plan(self.urls, order, self.rank, self.world_size, self.workers)
        return one_pass_plan(
            self.urls,
            self.sizes,
            order,
            rank=self.rank,
            world_size=self.world_size,
            workers=self.workers,
            batch_size=self.batch_size,
            drop_last=self.training,
        )

    def batches_per_epoch(self) -> int | None:
        """Batches this rank receives per epoch; None when unknown (shards without sizes)."""
        if self.resampled:
            return math.ceil(self.samples_per_epoch / (self.batch_size * self.world_size))
        return self.plan(0).batches if self.sizes is not None else None

    def __len__(self) -> int:
        batches = self.batches_per_epoch()
        if batches is None:
            raise TypeError("a pass over shards without sizes.json has no length known in advance")
        return batches

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != self.workers:
            raise RuntimeError(
                f"ShardStream was planned for {self.workers} loader workers but runs in "
                f"{info.num_workers if info else 0}; pass the loader's num_workers"
            )
        epoch, done, salt = self.epoch.value, self.done.value, self.salt.value
        # The loader's round robin restarts at physical worker 0, which must make batch `done`.
        worker = (physical + done) % self.workers
        tag = f"{_tag(self.seed, salt)}:{epoch}:{self.rank}:{worker}"
        counter = SkipCounter()
        if self.resampled:
            segments = resampled_urls(self.urls, self.cum_weights, tag)
        else:
            segments = self.plan(epoch, salt).segments[worker]
        mine = None  # evaluation: until the worker's samples end (its share is exact already)
        if self.training:
            planned = worker_batch_ids(self.batches_per_epoch(), self.workers, worker)
            mine = len(planned) - len(worker_batch_ids(done, self.workers, worker))
        samples = read_segments(segments, counter)
        if self.training and self.shuffle_buffer > 1:
            samples = shuffled(samples, self.shuffle_buffer, random.Random(f"samples:{tag}"))
        indexed = enumerate(samples)
        cursor = self.cursors[worker] if done else 0
        if cursor:
            # Fast-forward on raw bytes (no decoding): the skips met were counted before.
            next(itertools.islice(indexed, cursor - 1, None), None)
            counter.take()
        with_foils = bool(self.max_foils)
        if self.decode == "device":
            items = encoded(indexed, counter, self.crop, tag, with_foils)
        else:
            items = decoded(indexed, counter, self.transform, tag, with_foils)
        position = (epoch, worker, cursor) if self.training else None
        stream = batched(
            items,
            counter,
            batch_size=self.batch_size,
            tokenizer=self.tokenizer,
            batches=mine,
            drop_last=self.training,
            position=position,
            encoded=self.decode == "device",
            max_foils=self.max_foils,
        )
        return with_trailing_skips(stream, counter)


def _tag(seed: int, salt: int) -> str:
    """The seed part of every RNG name; an approximate resume's salt makes a fresh draw."""
    return f"{seed}" if not salt else f"{seed}~{salt}"
