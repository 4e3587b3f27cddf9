"""Webdataset tar shards -> batches of images and tokens, with every bad sample counted by kind.

A sample is the group of consecutive tar members sharing a key (`KEY.jpg` + `KEY.txt` +
`KEY.json`, as img2dataset writes them). Stages run inside each loader worker:

    shard urls (resampled with weights, or split over ranks × workers)
      -> tar members grouped into samples      (unopenable/truncated/empty shards counted)
      -> shuffle buffer of raw bytes            (training only)
      -> decode + transform image, read caption (missing/corrupt members counted)
      -> batch + tokenise                       (counts since the previous batch attached)

Every batch carries `"skipped": {kind: LongTensor[]}` with all of `SKIP_KINDS`, so the sums taken
by the LightningModule have the same keys on every rank.
"""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import math
import multiprocessing
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator

import lightning as L
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import gopen

from clipscale import distributed
from clipscale.data.shards import expand_shards, read_sizes
from clipscale.models import build_tokenizer, build_transforms

log = logging.getLogger(__name__)

SKIP_KINDS = (
    "unopenable_shard",  # the shard could not be opened (missing file, failing pipe: command)
    "truncated_shard",  # the tar stream broke or ended early; the sample being read is dropped
    "empty_shard",  # the shard opened cleanly but held no sample
    "unreadable_member",  # a member that is not a regular file or has no KEY.EXT name
    "missing_image",  # a sample without a jpg/jpeg/png/webp member
    "missing_caption",  # a sample without a txt member, or with an empty caption
    "corrupt_image",  # image bytes that PIL cannot decode (truncated, not an image at all)
    "corrupt_caption",  # caption bytes that are not UTF-8
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
BLOCK = 512  # tar block size; an archive ends with a block of zeros
MAX_BARREN_SHARDS = 100  # consecutive shards without one sample: the data source is broken
LOGGED_PER_KIND = 5  # per worker, the first skips of each kind are logged one by one


class SkipCounter:
    """Counts skipped samples by kind since the last `take()`, logging the first ones by name."""

    def __init__(self) -> None:
        self.pending = dict.fromkeys(SKIP_KINDS, 0)
        self.total = dict.fromkeys(SKIP_KINDS, 0)

    def add(self, kind: str, where: str, reason: object = "") -> None:
        """Count one skip of `kind` at `where` (shard url and key); log it while still rare."""
        self.pending[kind] += 1
        self.total[kind] += 1
        count = self.total[kind]
        # Rate limit: the first few by name, then one line at each power of ten.
        if count <= LOGGED_PER_KIND or math.log10(count).is_integer():
            log.warning("skipped %s #%d in this worker: %s %s", kind, count, where, reason)

    def take(self) -> dict[str, torch.Tensor]:
        """Counts since the previous call, as 0-d LongTensors (the batch's `skipped` entry)."""
        counts = {kind: torch.tensor(n, dtype=torch.long) for kind, n in self.pending.items()}
        self.pending = dict.fromkeys(SKIP_KINDS, 0)
        return counts


class _TailReader:
    """A byte stream that remembers how many bytes passed and the last 64 KiB of them.

    Python's tarfile stops silently when a stream ends at a header boundary; checking for the
    zero block where the last header was read is what tells a complete archive from a cut one.
    """

    TAIL = 64 * 1024  # more than tarfile reads past a header (one 10 KiB record)

    def __init__(self, stream) -> None:
        self.stream = stream
        self.position = 0
        self.tail = bytearray()

    def read(self, size: int = -1) -> bytes:
        """Read like the wrapped stream, recording the bytes."""
        data = self.stream.read(size)
        self.position += len(data)
        self.tail += data
        del self.tail[: -self.TAIL]
        return data

    def zero_block_at(self, offset: int) -> bool:
        """True if a full block of zeros (the end-of-archive marker) was read at `offset`."""
        start = len(self.tail) - (self.position - offset)
        block = self.tail[start : start + BLOCK] if start >= 0 else b""
        return len(block) == BLOCK and not any(block)


def _split_name(name: str) -> tuple[str, str] | None:
    """`dir/KEY.EXT` -> (dir/KEY, ext lowercased), as webdataset splits at the first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not (stem and dot and ext):
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def shard_samples(url: str, counter: SkipCounter) -> Iterator[dict]:
    """Yield the samples of one shard as {"__key__", "__url__", ext: bytes}; never raises on bad data."""
    try:
        stream = gopen(url, "rb")
    except Exception as error:  # each scheme's opener raises its own types (OSError, ValueError...)
        counter.add("unopenable_shard", url, error)
        return
    reader = _TailReader(gzip.GzipFile(fileobj=stream) if url.endswith((".gz", ".tgz")) else stream)
    sample: dict = {}
    found = 0
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                parts = _split_name(member.name)
                if member.isdir():
                    continue
                if not member.isfile() or parts is None:
                    counter.add("unreadable_member", f"{url}:{member.name}")
                    continue
                if sample and parts[0] != sample["__key__"]:
                    # A new key closes the previous sample, before this member's data can fail.
                    found += 1
                    yield sample
                    sample = {}
                data = tar.extractfile(member).read()
                sample.update({"__key__": parts[0], "__url__": url, parts[1]: data})
            if not reader.zero_block_at(tar.offset):
                raise tarfile.ReadError(f"stream ends at byte {reader.position} without end block")
        stream.close()  # a pipe: url reports its command's exit status here
    except Exception as error:  # tarfile, gzip, zlib and pipe failures all mean a broken stream
        if reader.position > 0:
            counter.add("truncated_shard", url, error)
        elif isinstance(error, tarfile.ReadError) and _closes_cleanly(stream):
            counter.add("empty_shard", url, "zero bytes")
        else:
            counter.add("unopenable_shard", url, error)
        return
    finally:
        # Also when the consumer stops mid-shard (end of epoch): release the file or pipe.
        _closes_cleanly(stream)
    if sample:
        found += 1
        yield sample
    if found == 0:
        counter.add("empty_shard", url, "no samples")


def _closes_cleanly(stream) -> bool:
    """Close `stream` (again: harmless); False if that fails (a pipe: command's error exit)."""
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - any failure here means the source could not be read
        return False
    return True


def read_shards(urls: Iterable[str], counter: SkipCounter) -> Iterator[dict]:
    """Samples of each shard in turn; raise if many shards in a row give nothing at all."""
    barren = 0
    for url in urls:
        barren += 1
        for sample in shard_samples(url, counter):
            barren = 0
            yield sample
        if barren >= MAX_BARREN_SHARDS:
            raise RuntimeError(
                f"{barren} shards in a row gave no sample (last {url!r}); the data source is "
                "broken: check data.train_shards / data.val_shards and the skip warnings above"
            )


def shuffled(samples: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of `buffer_size` items (0 or 1: unchanged order)."""
    buffer: list = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def decoded(samples: Iterable[dict], counter: SkipCounter, transform: Callable) -> Iterator:
    """(key, image tensor [3,H,W], caption) for each usable sample; the rest are counted."""
    for sample in samples:
        where = f"{sample['__url__']}:{sample['__key__']}"
        image_ext = next((ext for ext in IMAGE_EXTS if ext in sample), None)
        if image_ext is None:
            counter.add("missing_image", where)
            continue
        if CAPTION_EXT not in sample:
            counter.add("missing_caption", where)
            continue
        try:
            caption = sample[CAPTION_EXT].decode("utf-8").strip()
        except UnicodeDecodeError as error:
            counter.add("corrupt_caption", where, error)
            continue
        if not caption:
            counter.add("missing_caption", where, "empty caption")
            continue
        try:
            with Image.open(io.BytesIO(sample[image_ext])) as image:
                rgb = image.convert("RGB")  # forces the full decode, so truncation shows here
        except UnidentifiedImageError:
            counter.add("corrupt_image", where, f"{image_ext} member is no image PIL can read")
            continue
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
            counter.add("corrupt_image", where, error)
            continue
        yield sample["__key__"], transform(rgb), caption


def _batch_buffer(batch_size: int, image: torch.Tensor) -> torch.Tensor:
    """An empty [batch_size, *image.shape] tensor, in shared memory inside a loader worker."""
    buffer = torch.empty((batch_size, *image.shape), dtype=image.dtype)
    # Allocated shared from the start, it crosses to the main process without another copy.
    return buffer.share_memory_() if get_worker_info() is not None else buffer


def batched(items: Iterable, counter: SkipCounter, batch_size: int, tokenizer, drop_last: bool):
    """Collate (key, image, caption) items into batch dicts carrying the skip counts."""
    iterator = iter(items)
    while True:
        images, keys, captions = None, [], []
        for key, image, caption in itertools.islice(iterator, batch_size):
            # Copying each image in as it comes lets the allocator reuse one image's memory for
            # the next; holding a list of them and stacking costs fresh pages every batch.
            images = _batch_buffer(batch_size, image) if images is None else images
            images[len(keys)] = image
            keys.append(key)
            captions.append(caption)
        if not keys or (drop_last and len(keys) < batch_size):
            return
        yield {
            "images": images[: len(keys)],  # [B, 3, H, W]
            "texts": tokenizer(captions),  # [B, context_length]
            "keys": keys,
            "skipped": counter.take(),
        }


def with_trailing_skips(batches: Iterable[dict], counter: SkipCounter) -> Iterator[dict]:
    """Hold one batch back so skips met after the last batch are added to it, not lost."""
    held = None
    for batch in batches:
        if held is not None:
            yield held
        held = batch
    if held is not None:
        for kind, count in counter.take().items():
            held["skipped"][kind] += count
        yield held


class ShardStream(IterableDataset):
    """Batches from shards for one rank: resampled for training, or each sample once.

    `rank`/`world_size` are explicit so one process can build every rank's view (tests); the
    WebDataModule passes Lightning's. Loader workers split the rank's share again.
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
    ) -> None:
        super().__init__()
        if not urls:
            raise ValueError("ShardStream needs at least one shard url")
        readers = world_size * max(1, num_workers)
        if not resampled and len(urls) < readers:
            raise ValueError(
                f"{len(urls)} shards cannot be split over {world_size} ranks x "
                f"{max(1, num_workers)} workers = {readers} readers without leaving some idle or "
                "reading a shard twice: lower data.num_workers, or write more, smaller shards"
            )
        self.urls = urls
        self.transform, self.tokenizer = transform, tokenizer
        self.batch_size, self.training, self.resampled = batch_size, training, resampled
        # Cumulative weights make each draw a bisection, not a pass over millions of shards.
        self.cum_weights = list(itertools.accumulate(shard_weights)) if shard_weights else None
        self.samples_per_epoch, self.shuffle_buffer = samples_per_epoch, shuffle_buffer
        self.seed, self.rank, self.world_size, self.num_workers = (
            seed,
            rank,
            world_size,
            num_workers,
        )
        # Shared memory, so that persistent workers see the epoch set in the main process.
        self.epoch = multiprocessing.Value("i", 0)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shard and sample order the next pass produces."""
        self.epoch.value = epoch

    def _batches_per_worker(self, workers: int) -> int | None:
        if self.samples_per_epoch is None:
            return None
        batches_per_rank = math.ceil(self.samples_per_epoch / (self.batch_size * self.world_size))
        return math.ceil(batches_per_rank / workers)

    def __len__(self) -> int:
        workers = max(1, self.num_workers)
        per_worker = self._batches_per_worker(workers)
        if per_worker is None:
            raise TypeError("a pass over all shards has no length known in advance")
        return per_worker * workers

    def _shard_urls(self, worker: int, workers: int, epoch: int) -> Iterator[str]:
        if self.resampled:
            rng = random.Random(f"shards:{self.seed}:{epoch}:{self.rank}:{worker}")
            while True:
                yield rng.choices(self.urls, cum_weights=self.cum_weights)[0]
        order = list(self.urls)
        if self.training:
            # One permutation for all ranks and workers (seeded without them): the strided
            # split below stays a partition of the shards.
            random.Random(f"order:{self.seed}:{epoch}").shuffle(order)
        yield from order[self.rank * workers + worker :: self.world_size * workers]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch.value
        counter = SkipCounter()
        samples = read_shards(self._shard_urls(worker, workers, epoch), counter)
        if self.training and self.shuffle_buffer > 1:
            rng = random.Random(f"samples:{self.seed}:{epoch}:{self.rank}:{worker}")
            samples = shuffled(samples, self.shuffle_buffer, rng)
        items = decoded(samples, counter, self.transform)
        batches = batched(items, counter, self.batch_size, self.tokenizer, self.training)
        per_worker = self._batches_per_worker(workers)
        if per_worker is not None:
            batches = itertools.islice(batches, per_worker)
        return with_trailing_skips(batches, counter)


class EpochLoader(DataLoader):
    """A DataLoader that sets its ShardStream's epoch each time a pass begins."""

    def __init__(self, dataset: ShardStream, current_epoch: Callable[[], int] | None, **kwargs):
        # Batches are made in the workers, so the loader itself must not batch again.
        super().__init__(dataset, batch_size=None, **kwargs)
        self.current_epoch = current_epoch
        self.passes = 0

    def __iter__(self):
        # The trainer's epoch keeps the order right after a resume; alone, count the passes.
        epoch = self.current_epoch() if self.current_epoch is not None else self.passes
        self.passes += 1
        self.dataset.set_epoch(epoch)
        return super().__iter__()


def _rank_and_world_size(trainer) -> tuple[int, int]:
    """This process's rank and the world size: Lightning's, else torch.distributed's, else 0/1."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    return distributed.rank(), distributed.world_size()


def _patterns(spec, key: str) -> list[str]:
    """A shard spec (pattern string, `a::b` string or list of patterns) as a list of patterns."""
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
                "null to read the count from sizes.json beside the shards"
            )
        self.train_patterns = (
            None if train_shards is None else _patterns(train_shards, "data.train_shards")
        )
        self.val_patterns = None if val_shards is None else _patterns(val_shards, "data.val_shards")
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
        self.samples_per_epoch, self.resampled = samples_per_epoch, resampled
        self.shuffle_buffer, self.batch_size, self.num_workers = (
            shuffle_buffer,
            batch_size,
            num_workers,
        )
        self.model_name, self.seed = model_name, seed
        self.uint8_images = uint8_images
        self.loader_options = {
            "num_workers": num_workers,
            "pin_memory": pin_memory and torch.cuda.is_available(),
            "persistent_workers": persistent_workers and num_workers > 0,
            "prefetch_factor": prefetch_factor if num_workers > 0 else None,
        }
        self.train_stream: ShardStream | None = None
        self.val_stream: ShardStream | None = None
        self.skipped_totals = dict.fromkeys(SKIP_KINDS, 0)

    def setup(self, stage: str | None = None) -> None:
        """Expand the shard lists and build this rank's streams (after the process group exists)."""
        rank, world_size = _rank_and_world_size(self.trainer)
        common = {
            "tokenizer": build_tokenizer(self.model_name),
            "batch_size": self.batch_size,
            "seed": self.seed,
            "rank": rank,
            "world_size": world_size,
            "num_workers": self.num_workers,
        }
        if stage in (None, "fit") and self.train_stream is None:
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
            samples = self.samples_per_epoch or read_sizes(urls, "data.train_shards")
            self.train_stream = ShardStream(
                urls,
                transform=build_transforms(
                    self.model_name, is_train=True, as_uint8=self.uint8_images
                ),
                training=True,
                resampled=self.resampled,
                shard_weights=weights,
                samples_per_epoch=samples,
                shuffle_buffer=self.shuffle_buffer,
                **common,
            )
            log.info(
                "train: %d shards, %d samples per epoch, rank %d of %d",
                len(urls),
                samples,
                rank,
                world_size,
            )
        if stage in (None, "fit", "validate") and self.val_patterns and self.val_stream is None:
            urls = [url for p in self.val_patterns for url in expand_shards(p, "data.val_shards")]
            self.val_stream = ShardStream(
                urls,
                transform=build_transforms(self.model_name, is_train=False),
                training=False,
                **common,
            )

    def train_dataloader(self) -> EpochLoader:
        """Resampled (or shuffled-shard) training batches for this rank."""
        current_epoch = (lambda: self.trainer.current_epoch) if self.trainer is not None else None
        return EpochLoader(self.train_stream, current_epoch, **self.loader_options)

    def val_dataloader(self) -> EpochLoader | list:
        """Each validation sample exactly once across ranks and workers; [] without val_shards."""
        if self.val_stream is None:
            return []
        return EpochLoader(self.val_stream, None, **self.loader_options)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Add the batch's skip counts to this rank's totals (still on the CPU: no device sync)."""
        for kind, count in batch.get("skipped", {}).items():
            self.skipped_totals[kind] += int(count)
        return batch

    def skipped_summary(self) -> dict[str, int]:
        """Samples skipped by kind in all batches this rank has received (every worker's)."""
        return dict(self.skipped_totals)

    def teardown(self, stage: str) -> None:
        """Log the samples skipped on this rank, by kind (the run's end-of-data summary)."""
        if any(self.skipped_totals.values()):
            rank = self.trainer.global_rank if self.trainer is not None else 0
            kinds = ", ".join(f"{k}={n}" for k, n in self.skipped_totals.items() if n)
            log.warning("data: samples skipped on rank %d: %s", rank, kinds)
