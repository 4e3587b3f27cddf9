"""Tar shards -> samples of raw bytes, with every bad shard, member and sample counted by kind.

A sample is the group of consecutive tar members sharing a key (`KEY.jpg` + `KEY.txt` +
`KEY.json`, as img2dataset writes them). Reading never decodes an image: skipping samples (a
segment that starts inside a shard, or fast-forwarding after a resume) costs only the bytes.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import random
import tarfile
from collections.abc import Iterable, Iterator

import torch
from webdataset import gopen

from clipscale.data.sources import Segment, split_member_name

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
    "corrupt_foils",  # data.hard_negatives: a foils.json that is not a JSON list of strings
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
BLOCK = 512  # tar block size; an archive ends with a block of zeros
MAX_BARREN_SHARDS = 100  # consecutive shards without one sample: the data source is broken
LOGGED_SHARDS_PER_KIND = 20  # per process: shards named for one kind before it is only counted


class SkipCounter:
    """Counts skipped samples by kind since the last `take()`, and notes each (kind, shard) once.

    The counter lives in a loader worker; its notes travel with the batches to the training
    process, where `SkipLog` logs each (kind, shard) once however many workers met it.
    """

    def __init__(self) -> None:
        self.pending = dict.fromkeys(SKIP_KINDS, 0)
        self.total = dict.fromkeys(SKIP_KINDS, 0)
        self.notes: list[tuple[str, str, str]] = []  # (kind, shard, detail), not yet taken
        self.noted: set[tuple[str, str]] = set()

    def add(self, kind: str, shard: str, reason: object = "", item: str = "") -> None:
        """Count one skip of `kind` in `shard` (at member or key `item`); note it if first there."""
        self.pending[kind] += 1
        self.total[kind] += 1
        if (kind, shard) not in self.noted:
            self.noted.add((kind, shard))
            self.notes.append((kind, shard, f"{item} {reason}".strip()))

    def take(self) -> dict[str, torch.Tensor]:
        """Counts since the previous call, as 0-d LongTensors (the batch's `skipped` entry)."""
        counts = {kind: torch.tensor(n, dtype=torch.long) for kind, n in self.pending.items()}
        self.pending = dict.fromkeys(SKIP_KINDS, 0)
        return counts

    def take_notes(self) -> list[tuple[str, str, str]]:
        """The (kind, shard, detail) notes since the previous call (the batch's `skip_notes`)."""
        notes, self.notes = self.notes, []
        return notes


class SkipLog:
    """Logs a skip once per (kind, shard) in this process, whichever worker's note came first.

    A truncated shard drawn again and again by resampling, or a shard of many bad images, gives
    one line; after `LOGGED_SHARDS_PER_KIND` shards of one kind, that kind is only counted (the
    per-kind totals are logged at the end of training and in the metrics).
    """

    def __init__(self) -> None:
        self.logged: set[tuple[str, str]] = set()
        self.shards = dict.fromkeys(SKIP_KINDS, 0)

    def report(self, notes: Iterable[tuple[str, str, str]]) -> None:
        """Log the notes of (kind, shard) pairs not logged before."""
        for kind, shard, detail in notes:
            if (kind, shard) in self.logged:
                continue
            self.logged.add((kind, shard))
            self.shards[kind] += 1
            if self.shards[kind] <= LOGGED_SHARDS_PER_KIND:
                log.warning(
                    "skipped %s in %s (%s); later %s skips there are counted, not logged",
                    kind,
                    shard,
                    detail or "no detail",
                    kind,
                )
            if self.shards[kind] == LOGGED_SHARDS_PER_KIND:
                log.warning(
                    "%s met in %d shards: further shards with it are counted, not named",
                    kind,
                    LOGGED_SHARDS_PER_KIND,
                )


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
                parts = split_member_name(member.name)
                if member.isdir():
                    continue
                if not member.isfile() or parts is None:
                    counter.add("unreadable_member", url, item=member.name)
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


def read_segments(segments: Iterable[Segment], counter: SkipCounter) -> Iterator[dict]:
    """Samples of each segment in turn; raise if many segments in a row give nothing at all."""
    barren = 0
    for segment in segments:
        barren += 1
        samples = shard_samples(segment.url, counter)
        for sample in itertools.islice(samples, segment.start, segment.stop):
            barren = 0
            yield sample
        samples.close()  # a segment ending inside its shard releases the file or pipe now
        if barren >= MAX_BARREN_SHARDS:
            raise RuntimeError(
                f"{barren} shards in a row gave no sample (last {segment.url!r}); the data source "
                "is broken: check data.train_shards / data.val_shards and the skip warnings above"
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
