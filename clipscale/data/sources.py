"""Which shards, and which samples of them, each rank and loader worker reads in an epoch.

Shard specs expand to urls here (`shard_urls`), and each shard's sample count comes from the
sizes.json beside it or, for a local shard it does not list, from the tar headers
(`count_samples`). Two ways to read a shard set:
- resampled: each worker draws shards with replacement from an RNG seeded by
  (seed, epoch, rank, worker), forever; the epoch ends after a fixed number of batches.
- one pass: the epoch's shards (shuffled for training) are laid end to end as one sequence of
  N samples (the counts above). Rank r reads samples [r·N/P, (r+1)·N/P); inside it, each
  worker reads one contiguous block. A block may begin or end inside a shard: the reader skips
  the shard's first samples without decoding them. Every sample has exactly one reader.

The loader takes batch k of a rank from worker k mod W (DataLoader's round robin), so the batch
count of worker w is the number of k < batches with k mod W = w, and the order of batches a rank
receives is fixed by the plan alone; this is what makes the position resumable.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import math
import os
import random
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from webdataset.shardlists import expand_urls

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"


def local_path(url: str) -> str | None:
    """The file path of a local shard url, None for pipe:/remote urls."""
    if url.startswith("file:"):
        return url.removeprefix("file://").removeprefix("file:")
    return None if url.startswith("pipe:") or "://" in url else url


def expand_shards(pattern: str, key: str = "shards") -> list[str]:
    """Urls of a shard pattern: braces expanded, local globs matched; raise if nothing matches."""
    urls = []
    for url in expand_urls(pattern):
        path = local_path(url)
        if path is not None and any(c in path for c in "*?["):
            urls.extend(sorted(glob.glob(path)))
        else:
            urls.append(url)
    local = [p for p in map(local_path, urls) if p is not None]
    missing = [p for p in local if not os.path.isfile(p)]
    if not urls or (local and len(missing) == len(local)):
        raise FileNotFoundError(
            f"{key}={pattern!r} matches no shard file; give existing .tar paths as a brace "
            "pattern such as /data/shard-{000000..000099}.tar, or a pipe: command"
        )
    if missing:
        log.warning(
            "%s: %d of %d shards do not exist (first %r); each read of one counts as unopenable_shard",
            key,
            len(missing),
            len(local),
            missing[0],
        )
    return urls


def shard_urls(spec, key: str) -> list[str]:
    """Urls of a shard spec: a brace pattern, `a::b`, or a list of those; pipe: commands kept."""
    if isinstance(spec, str):
        patterns = [spec]
    elif isinstance(spec, Iterable) and not isinstance(spec, (bytes, Mapping)):
        patterns = list(spec)  # list, tuple or omegaconf ListConfig
    else:
        patterns = []
    if not patterns or not all(isinstance(p, str) and p.strip() for p in patterns):
        raise ValueError(
            f"{key}={spec!r}: expected a brace pattern such as /data/shard-{{000000..000099}}.tar, "
            "patterns joined by '::', or a list of them"
        )
    return [url for pattern in patterns for url in expand_shards(pattern, key)]


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard, in the shard's own order."""

    url: str
    start: int
    stop: int | None  # None: to the end of the shard


@dataclass(frozen=True)
class EpochPlan:
    """One rank's epoch: batches on the rank, and per worker its segments and batch sizes."""

    batches: int  # batches this rank receives in the epoch (= len of its loader)
    segments: list[list[Segment]]  # [worker] -> segments read in order
    batch_sizes: list[int]  # [batch k] -> samples planned for batch k of this rank
    samples: int  # samples planned for this rank (before skips)
    dropped: int  # samples of this rank's share left out (training: the last partial batch)


def split_member_name(name: str) -> tuple[str, str] | None:
    """`dir/KEY.EXT` -> (dir/KEY, ext lowercased), as webdataset splits at the first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not (stem and dot and ext):
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def count_samples(path: str) -> int:
    """Samples in a local tar shard, from its member headers alone (member data is skipped).

    A sample is a run of consecutive members sharing a key, as clipscale.data.reading groups
    them; directories and members without a KEY.EXT name belong to none. A shard that breaks off
    counts the samples whose headers were read, a missing one 0: the reader counts those faults
    (truncated_shard, unopenable_shard) when it meets them.
    """
    samples, last_key = 0, None
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = split_member_name(member.name)
                if member.isfile() and parts is not None and parts[0] != last_key:
                    samples, last_key = samples + 1, parts[0]
    except (OSError, EOFError, tarfile.TarError, zlib.error):
        pass  # see the docstring: counted as far as it reads
    return samples


def check_countable(urls: list[str], key: str, *, resampled: bool, samples_per_epoch) -> None:
    """Raise a one-line ValueError when an epoch's sample count cannot be known for `urls`.

    Local shards are counted (sizes.json, else their tar headers); a pipe: or remote shard can
    be neither: a one pass needs every shard's count, a resampled epoch `samples_per_epoch`.
    """
    if resampled and samples_per_epoch is not None:
        return
    remote = next((url for url in urls if local_path(url) is None), None)
    if remote is None:
        return
    need = "a one pass (data.resampled=false) needs every shard's sample count"
    if resampled:
        need = "a resampled epoch needs its length"
    raise ValueError(
        f"{key}: {remote!r} is not a local file, so its samples cannot be counted (from "
        f"{SIZES_FILE} or its tar headers), and {need}: set data.resampled=true "
        "data.samples_per_epoch=N (N samples per epoch over all ranks), or copy the shards to "
        "local disk"
    )


def _sizes_table(folder: str) -> dict:
    """{shard file name: sample count} of the sizes.json in `folder` ({} without one)."""
    path = os.path.join(folder, SIZES_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as file:
        return json.load(file)


def _listed_sizes(urls: list[str]) -> list[int | None] | None:
    """Each shard's count in the sizes.json beside it (None if unlisted); None for a remote url."""
    tables: dict[str, dict] = {}
    sizes: list[int | None] = []
    for url in urls:
        path = local_path(url)
        if path is None:
            return None
        folder, name = os.path.split(path)
        if folder not in tables:
            tables[folder] = _sizes_table(folder)
        sizes.append(int(tables[folder][name]) if name in tables[folder] else None)
    return sizes


def shard_sizes(urls: list[str], count_unlisted: bool = False) -> list[int] | None:
    """Per-shard sample counts from the sizes.json files beside `urls`; None if any is unknown.

    With `count_unlisted`, a local shard that no sizes.json lists is counted from its tar
    headers (`count_samples`: no image is read), so only pipe: and remote shards stay unknown.
    """
    sizes = _listed_sizes(urls)
    unlisted = [] if sizes is None else [i for i, size in enumerate(sizes) if size is None]
    if sizes is None or (unlisted and not count_unlisted):
        return None
    if unlisted:
        # Said before counting: a large set takes a while (~1 s per 10,000-sample shard).
        log.info(
            "data: %d of %d shards are not listed in a %s beside them: counting their samples "
            "from the tar headers (a %s listing them skips this, as does a resampled epoch "
            "of data.samples_per_epoch)",
            len(unlisted),
            len(urls),
            SIZES_FILE,
            SIZES_FILE,
        )
    for i in unlisted:
        sizes[i] = count_samples(local_path(urls[i]))
    return sizes


def worker_batch_ids(batches: int, workers: int, worker: int) -> range:
    """The batch numbers of a rank's epoch that worker `worker` makes (round robin)."""
    return range(worker, batches, workers)


def epoch_order(count: int, seed: int | str, epoch: int, shuffle: bool) -> list[int]:
    """The shard order of an epoch: one permutation for all ranks and workers, or list order."""
    order = list(range(count))
    if shuffle:
        random.Random(f"order:{seed}:{epoch}").shuffle(order)
    return order


def _segments(
    urls: list[str], sizes: list[int], order: list[int], start: int, stop: int
) -> list[Segment]:
    """Samples [start, stop) of the shards laid end to end in `order`, as per-shard segments."""
    segments, offset = [], 0
    for index in order:
        begin, end = offset, offset + sizes[index]
        offset = end
        if end <= start or sizes[index] == 0:
            continue
        if begin >= stop:
            break
        segments.append(Segment(urls[index], max(start, begin) - begin, min(stop, end) - begin))
    return segments


def one_pass_plan(
    urls: list[str],
    sizes: list[int],
    order: list[int],
    *,
    rank: int,
    world_size: int,
    workers: int,
    batch_size: int,
    drop_last: bool,
) -> EpochPlan:
    """Split the epoch's samples over ranks, then workers, so each sample is read exactly once.

    Every rank gets the same number of batches: floor(N/P) samples per rank (one more on the
    first N mod P ranks); with `drop_last` each rank makes floor(floor(N/P) / B) full batches and
    leaves the rest of its share out; otherwise it makes ceil(share / B) batches, the last partial.
    """
    total = sum(sizes)
    first, last = rank * total // world_size, (rank + 1) * total // world_size
    share = last - first
    if drop_last:
        batches = (total // world_size) // batch_size  # the smallest share sets every rank's count
        batch_sizes = [batch_size] * batches
    else:
        batches = math.ceil(share / batch_size)
        batch_sizes = [min(batch_size, share - k * batch_size) for k in range(batches)]
    segments, begin = [], first
    for worker in range(workers):
        count = sum(batch_sizes[k] for k in worker_batch_ids(batches, workers, worker))
        segments.append(_segments(urls, sizes, order, begin, begin + count))
        begin += count
    used = sum(batch_sizes)
    return EpochPlan(batches, segments, batch_sizes, used, share - used)


def strided_plan(urls: list[str], order: list[int], rank: int, world_size: int, workers: int):
    """Without per-shard sizes (evaluation only): whole shards dealt to the rank × worker readers."""
    readers = world_size * workers
    segments = [
        [Segment(urls[i], 0, None) for i in order[rank * workers + w :: readers]]
        for w in range(workers)
    ]
    return EpochPlan(0, segments, [], 0, 0)


def resampled_urls(urls: list[str], cum_weights: list[float] | None, tag: str) -> Iterator[Segment]:
    """An endless stream of whole shards drawn with replacement, seeded by `tag`."""
    rng = random.Random(f"shards:{tag}")
    while True:
        yield Segment(rng.choices(urls, cum_weights=cum_weights)[0], 0, None)


def cumulative(weights: list[float] | None) -> list[float] | None:
    """Cumulative weights make each draw a bisection, not a pass over millions of shards."""
    return list(itertools.accumulate(weights)) if weights else None
