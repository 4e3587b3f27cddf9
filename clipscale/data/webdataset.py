"""Webdataset tar shards -> batches of images and tokens: the data module and its stream.

Stages, each in its own module, run inside every loader worker:

    sources.py   shard urls: resampled with weights, or one pass split over ranks × workers
    reading.py   tar members grouped into samples of raw bytes (bad shards/members counted)
                 -> shuffle buffer of raw bytes (training only)
    pipeline.py  check the caption (and foils.json), decode + augment the image, or with
                 data.decode=device read its header and draw its crop box (bad samples counted)
                 -> batch + tokenise (counts since the previous batch attached)
    decode.py    data.decode=device: the batch's bytes decoded, cropped, resized on the device
    stream.py    ShardStream: one rank's pass through those stages
    loader.py    the loader that starts each pass at a position (and decodes on the device)

Every batch carries `"skipped": {kind: LongTensor[]}` with all of `SKIP_KINDS`, so the sums taken
by the LightningModule have the same keys on every rank.
"""

from __future__ import annotations

import logging
import warnings

import lightning as L
import torch

from clipscale import distributed
from clipscale.data.decode import DECODE_MODES, DeviceDecoder, keep_samples
from clipscale.data.loader import EpochLoader, StreamPosition, gather_rank_states
from clipscale.data.reading import SKIP_KINDS
from clipscale.data.sources import check_countable, expand_shards, shard_urls
from clipscale.data.sources import shard_sizes as read_shard_sizes
from clipscale.data.stream import ShardStream
from clipscale.data.synthetic import check_hard_negatives
from clipscale.models import build_tokenizer, build_transforms, image_preprocess

__all__ = ["SKIP_KINDS", "EpochLoader", "ShardStream", "WebDataModule"]

log = logging.getLogger(__name__)
# Lightning warns that an IterableDataset's len may be wrong with several workers; the plan
# (sources.py) makes it exact, and the tests check it.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def _rank_and_world_size(trainer) -> tuple[int, int]:
    """This process's rank and the world size: Lightning's, else torch.distributed's, else 0/1."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    return distributed.rank(), distributed.world_size()


def _patterns(spec, key: str) -> list[str]:
    """The sources of a train spec (`a::b` or a list: one per entry, as train_weights counts)."""
    if isinstance(spec, str):
        return spec.split("::")
    patterns = list(spec)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{key}={spec!r}: expected a brace pattern or a list of them")
    return patterns


class WebDataModule(L.LightningDataModule):
    """Training and validation batches from webdataset shards (`data=webdataset`).

    `train_shards`/`val_shards`: a brace pattern (`/data/{00000..00999}.tar`), a `pipe:` command
    (`pipe:aws s3 cp s3://bucket/{0..9}.tar -`), `a::b`, or a list. With `train_weights`, each
    entry of the train list is a source drawn with that share of shards (resampling only).
    The training stream's position is part of the checkpoint (`state_dict`); `resume` says
    whether a resume continues it exactly or redraws the rest of the epoch.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        train_weights: list[float] | None = None,
        samples_per_epoch: int | None = None,
        resampled: bool = True,
        shuffle_buffer: int = 1000,
        batch_size: int = 256,
        num_workers: int = 4,
        model_name: str = "ViT-B-32",
        seed: int = 0,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        uint8_images: bool = True,
        resume: str = "exact",
        decode: str = "auto",
        hard_negatives: list[str] | None = None,
        max_hard_negatives: int = 3,
        model_config: dict | None = None,
    ) -> None:
        super().__init__()
        for key, value, least in [
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("prefetch_factor", prefetch_factor, 1),
        ]:
            if not isinstance(value, int) or value < least:
                raise ValueError(f"data.{key}={value!r}: expected an integer >= {least}")
        if samples_per_epoch is not None and (
            not isinstance(samples_per_epoch, int) or samples_per_epoch < 1
        ):
            raise ValueError(
                f"data.samples_per_epoch={samples_per_epoch!r}: expected a positive integer, or "
                "null to count the shards' samples (sizes.json beside them, else their tar headers)"
            )
        if resume not in ("exact", "approximate"):
            raise ValueError(f"data.resume={resume!r}: expected exact or approximate")
        if decode not in DECODE_MODES:
            raise ValueError(
                f"data.decode={decode!r}: expected one of {', '.join(DECODE_MODES)} (auto: on "
                "the training device with CUDA, else in the loader workers)"
            )
        # Shards carry no foil types: any listed type turns reading foils.json on.
        foils = check_hard_negatives(hard_negatives, max_hard_negatives, objects=2)
        self.max_foils = max_hard_negatives if foils else None
        self.train_patterns = (
            None if train_shards is None else _patterns(train_shards, "data.train_shards")
        )
        self.val_shards = val_shards
        self.train_weights = None if train_weights is None else [float(w) for w in train_weights]
        if self.train_weights is not None:
            if self.train_patterns is None or len(self.train_weights) != len(self.train_patterns):
                raise ValueError(
                    f"data.train_weights={train_weights!r} needs one weight per source in "
                    f"data.train_shards={train_shards!r}"
                )
            if min(self.train_weights) <= 0 or not resampled:
                raise ValueError(
                    f"data.train_weights={train_weights!r}: weights must be > 0 and need "
                    "data.resampled=true (a single pass cannot favour one source)"
                )
        build_transforms(model_name, is_train=False)  # fails here, naming a bad model_name
        # the images' mean/std/interpolation/resize mode follow the model's weights
        self.preprocess = image_preprocess(model_config)
        self.samples_per_epoch, self.resampled = samples_per_epoch, resampled
        self.shuffle_buffer, self.batch_size, self.num_workers = (
            shuffle_buffer,
            batch_size,
            num_workers,
        )
        self.model_name, self.seed, self.resume, self.decode = model_name, seed, resume, decode
        self.uint8_images = uint8_images
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.prefetch_factor = prefetch_factor
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | None = None
        self.position: StreamPosition | None = None
        self.loaded_state: dict | None = None  # a checkpoint's position, until setup builds ours
        self.trim_ranks = False  # one-pass training on several ranks: batches may come short
        self.skipped_totals = dict.fromkeys(SKIP_KINDS, 0)
        self.trimmed_samples = 0  # good samples dropped to match a shorter rank's batch

    def _workers_for(self, urls: list[str], key: str, world_size: int, resampled: bool) -> int:
        """Loader workers for a stream: one pass reads with at most one worker per shard."""
        if resampled or self.num_workers <= 1:
            return self.num_workers
        workers = min(self.num_workers, max(1, len(urls) // world_size))
        if workers < self.num_workers:
            log.info(
                "%s: %d shard(s) over %d rank(s): %d loader worker(s) per rank instead of "
                "data.num_workers=%d (a worker per shard at most)",
                key,
                len(urls),
                world_size,
                workers,
                self.num_workers,
            )
        return workers

    def _loader_options(self, workers: int) -> dict:
        return {
            "num_workers": workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers and workers > 0,
            "prefetch_factor": self.prefetch_factor if workers > 0 else None,
        }

    def _device(self) -> torch.device:
        """Where batches are decoded with decode=device: the trainer's device, else the CPU."""
        if self.trainer is None:
            return torch.device("cpu")
        return self.trainer.strategy.root_device

    def decode_mode(self) -> str:
        """`worker` or `device`; `auto` decodes on the device when it is a CUDA device."""
        if self.decode != "auto":
            return self.decode
        return "device" if self._device().type == "cuda" else "worker"

    def setup(self, stage: str | None = None) -> None:
        """Expand the shard lists and build this rank's streams (after the process group exists)."""
        rank, world_size = _rank_and_world_size(self.trainer)
        common = {
            "tokenizer": build_tokenizer(self.model_name),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": rank,
            "world_size": world_size,
            "decode": self.decode_mode(),
        }
        if stage in (None, "fit") and self.train_stream is None:
            self._setup_train(common, rank, world_size)
        if stage in (None, "fit", "validate") and self.val_shards and self.val_stream is None:
            urls = shard_urls(self.val_shards, "data.val_shards")
            self.val_stream = ShardStream(
                urls,
                transform=build_transforms(
                    self.model_name, is_train=False, preprocess=self.preprocess
                ),
                training=False,
                num_workers=self._workers_for(urls, "data.val_shards", world_size, False),
                **common,
            )

    def _setup_train(self, common: dict, rank: int, world_size: int) -> None:
        if self.train_patterns is None:
            raise ValueError(
                "data.train_shards is not set: give shards, e.g. "
                "data.train_shards='/data/laion/{00000..01023}.tar'"
            )
        sources = [expand_shards(p, "data.train_shards") for p in self.train_patterns]
        urls = [url for source in sources for url in source]
        weights = None
        if self.train_weights is not None:
            # Each shard of source i gets w_i / n_i, so source i supplies a w_i share of shards.
            weights = [
                w / len(s) for w, s in zip(self.train_weights, sources, strict=True) for _ in s
            ]
        workers = self._workers_for(urls, "data.train_shards", world_size, self.resampled)
        check_countable(
            urls,
            "data.train_shards",
            resampled=self.resampled,
            samples_per_epoch=self.samples_per_epoch,
        )
        sizes = None  # a resampled epoch of samples_per_epoch needs no counts
        if not self.resampled or self.samples_per_epoch is None:
            sizes = read_shard_sizes(urls, count_unlisted=True)
        samples = self.samples_per_epoch if sizes is None else sum(sizes)
        self.train_stream = ShardStream(
            urls,
            transform=build_transforms(
                self.model_name,
                is_train=True,
                as_uint8=self.uint8_images,
                preprocess=self.preprocess,
            ),
            training=True,
            resampled=self.resampled,
            shard_weights=weights,
            samples_per_epoch=samples,
            shuffle_buffer=self.shuffle_buffer,
            num_workers=workers,
            shard_sizes=sizes,
            max_foils=self.max_foils,
            **common,
        )
        batches = self.train_stream.batches_per_epoch()
        if batches == 0:
            raise ValueError(
                f"data.train_shards: {samples} samples over {world_size} rank(s) give no full "
                f"batch of data.batch_size={self.batch_size} per rank in a one-pass epoch; lower "
                "data.batch_size, add shards, or set data.resampled=true"
            )
        layout = {
            "world_size": world_size,
            "workers": max(1, workers),
            "batch_size": self.batch_size,
            "resampled": self.resampled,
            "shards": len(urls),
            "shuffle_buffer": self.shuffle_buffer,
        }
        self.position = StreamPosition(rank, max(1, workers), layout, self.resume)
        if self.loaded_state is not None:
            self.position.load_state_dict(self.loaded_state)
        # Batches come short on some rank when one pass ends its range past skipped samples, and
        # with decode=device when an image fails only on the device: every rank then trims to
        # the shortest, so the gathered contrastive batch keeps equal shapes over ranks.
        self.trim_ranks = (not self.resampled or self.decode_mode() == "device") and world_size > 1
        left_out = samples - batches * self.batch_size * world_size
        log.info(
            "train: %d shards, %d samples per epoch, rank %d of %d: %d batches of %d per epoch%s",
            len(urls),
            samples,
            rank,
            world_size,
            batches,
            self.batch_size,
            f"; {left_out} samples per epoch left out (drop_last: the remainder below a full "
            "batch on every rank)"
            if not self.resampled and left_out
            else "",
        )

    def train_dataloader(self) -> EpochLoader:
        """Resampled (or one-pass) training batches for this rank, starting at its position."""
        current_epoch = (lambda: self.trainer.current_epoch) if self.trainer is not None else None
        options = self._loader_options(self.train_stream.workers if self.num_workers else 0)
        return EpochLoader(
            self.train_stream,
            current_epoch,
            self.position,
            decoder=self._decoder(self.train_stream),
            **options,
        )

    def _decoder(self, stream: ShardStream) -> DeviceDecoder | None:
        """The device decoder for a stream that ships bytes (decode=device), else None."""
        return (
            DeviceDecoder(stream.transform, self._device()) if stream.decode == "device" else None
        )

    def val_dataloader(self) -> EpochLoader | list:
        """Each validation sample exactly once across ranks and workers; [] without val_shards."""
        if self.val_stream is None:
            return []
        options = self._loader_options(self.val_stream.workers if self.num_workers else 0)
        return EpochLoader(self.val_stream, None, decoder=self._decoder(self.val_stream), **options)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Count the batch's skips and note the stream position (on the CPU: no device sync)."""
        for kind, count in batch.get("skipped", {}).items():
            self.skipped_totals[kind] += int(count)
        position = batch.pop("position", None)
        if position is not None and self.position is not None:
            self.position.record(position)
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Several ranks: trim every rank to the shortest batch (one pass, or decode=device).

        A short batch (samples skipped as corrupt, some only at device decode) is trained as
        it is: no padding or duplicated sample enters the contrastive loss, and every rank
        drops its last samples down to the shortest rank's count, so the all-gathered
        embeddings have equal shapes. The dropped samples are counted in `epoch_samples`.
        """
        training = self.trainer is None or self.trainer.training
        if self.position is None or "keys" not in batch or not training:
            return batch
        if self.trim_ranks:
            received = len(batch["texts"])
            batch = trim_to_shortest(batch)
            self.trimmed_samples += received - len(batch["texts"])
        self.position.count_samples(len(batch["texts"]))
        return batch

    def state_dict(self) -> dict:
        """Every rank's training stream position (gathered: rank 0 writes the checkpoint)."""
        if self.position is None:
            return {}
        return {"ranks": gather_rank_states(self.position.state_dict())}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue the training stream from a checkpoint's position for this rank."""
        ranks = state_dict.get("ranks")
        if not ranks:
            return
        rank, _ = _rank_and_world_size(self.trainer)
        self.loaded_state = ranks[rank] if rank < len(ranks) else {**ranks[0], "layout": {}}
        if self.position is not None:
            self.position.load_state_dict(self.loaded_state)

    def skipped_summary(self) -> dict[str, int]:
        """Samples skipped by kind in all batches this rank has received (every worker's)."""
        return dict(self.skipped_totals)

    def teardown(self, stage: str) -> None:
        """Log the samples each epoch used and those skipped on this rank, by kind."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if self.position is not None and self.position.epoch_samples:
            used = ", ".join(f"{e}: {n}" for e, n in self.position.epoch_samples.items())
            log.info("data: samples used per epoch on rank %d: %s", rank, used)
        if self.trimmed_samples:
            log.warning(
                "data: %d readable samples left out on rank %d to match a shorter rank's batch",
                self.trimmed_samples,
                rank,
            )
        if any(self.skipped_totals.values()):
            kinds = ", ".join(f"{k}={n}" for k, n in self.skipped_totals.items() if n)
            log.warning("data: samples skipped on rank %d: %s", rank, kinds)


def trim_to_shortest(batch: dict) -> dict:
    """Cut this rank's batch to the smallest batch over ranks (one all-reduce of a count, on the
    process group's device: with host staging the images stay on the CPU under NCCL)."""
    keep = distributed.min_over_ranks(len(batch["keys"]))
    return batch if keep == len(batch["keys"]) else keep_samples(batch, keep)
