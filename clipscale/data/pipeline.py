"""Raw samples -> batches: caption checks, image decode and augmentation, batching, tokenising.

With `data.decode=device` the image stage ships the encoded bytes and crop box instead of
pixels (`encoded`); decode.py turns them into pixels on the training device.

Randomness in a worker never comes from a process-wide RNG: the augmentation of a sample is
drawn from an RNG seeded by (seed, epoch, rank, worker, the sample's position in the worker's
raw stream). Re-reading a worker's stream to the same position therefore gives the same
batches, which is what an exact resume does.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import get_worker_info
from torchvision.transforms import RandomResizedCrop

from clipscale.data import decode
from clipscale.data.decode import seeded_call
from clipscale.data.reading import SkipCounter

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
FOILS_EXT = "foils.json"


def sample_rng(tag: str, index: int) -> random.Random:
    """The RNG of sample `index` of the worker stream named by `tag` (seed:epoch:rank:worker)."""
    return random.Random(f"sample:{tag}:{index}")


def skip(counter: SkipCounter, kind: str, sample: dict, reason: object = "") -> None:
    """Count `sample` (a reading.py sample dict) as skipped for `kind`, naming its shard and key."""
    counter.add(kind, sample["__url__"], reason, sample["__key__"])


def caption_of(sample: dict, counter: SkipCounter) -> str | None:
    """The sample's stripped UTF-8 caption, or None after counting why there is none."""
    if CAPTION_EXT not in sample:
        skip(counter, "missing_caption", sample)
        return None
    try:
        caption = sample[CAPTION_EXT].decode("utf-8").strip()
    except UnicodeDecodeError as error:
        skip(counter, "corrupt_caption", sample, error)
        return None
    if not caption:
        skip(counter, "missing_caption", sample, "empty caption")
        return None
    return caption


def image_ext_of(sample: dict, counter: SkipCounter) -> str | None:
    """The extension of the sample's image member, or None after counting `missing_image`."""
    ext = next((ext for ext in IMAGE_EXTS if ext in sample), None)
    if ext is None:
        skip(counter, "missing_image", sample)
    return ext


def rgb_image_of(sample: dict, ext: str, counter: SkipCounter) -> Image.Image | None:
    """The sample's image decoded to 8-bit RGB (decode.open_rgb), or None after counting it."""
    try:
        return decode.open_rgb(sample[ext])
    except UnidentifiedImageError:
        skip(counter, "corrupt_image", sample, f"{ext} member is no image PIL can read")
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        skip(counter, "corrupt_image", sample, error)
    return None


def foils_of(sample: dict, counter: SkipCounter) -> list[str] | None:
    """The sample's foil captions from `foils.json` ([] without one), None if it is malformed.

    Format: a JSON list of non-empty strings (what `python -m clipscale.data.shards
    --foils-column` writes). A malformed member skips the sample (counted `corrupt_foils`) rather
    than training it without its hard negatives unnoticed.
    """
    if FOILS_EXT not in sample:
        return []
    try:
        foils = json.loads(sample[FOILS_EXT].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        skip(counter, "corrupt_foils", sample, error)
        return None
    if not isinstance(foils, list) or not all(isinstance(f, str) and f.strip() for f in foils):
        skip(counter, "corrupt_foils", sample, "expected a JSON list of non-empty strings")
        return None
    return [f.strip() for f in foils]


def _checked(
    samples: Iterable[tuple[int, dict]], counter: SkipCounter, with_foils: bool
) -> Iterator[tuple[int, dict, str, str, dict]]:
    """(raw index, sample, image ext, caption, extras) of samples whose members are usable."""
    for index, sample in samples:
        image_ext = image_ext_of(sample, counter)
        caption = None if image_ext is None else caption_of(sample, counter)
        if caption is None:
            continue
        extras = {}
        if with_foils:
            extras["foils"] = foils_of(sample, counter)
            if extras["foils"] is None:
                continue
        yield index, sample, image_ext, caption, extras


def decoded(
    samples: Iterable[tuple[int, dict]],
    counter: SkipCounter,
    transform: Callable,
    tag: str,
    with_foils: bool = False,
) -> Iterator[tuple[int, str, torch.Tensor, str, dict]]:
    """(raw index, key, image tensor [3,H,W], caption, extras) per usable sample; rest counted.

    `data.decode=worker`: PIL decodes and open_clip's transform augments, here in the worker.
    """
    for index, sample, image_ext, caption, extras in _checked(samples, counter, with_foils):
        rgb = rgb_image_of(sample, image_ext, counter)
        if rgb is None:
            continue
        seed = sample_rng(tag, index).getrandbits(63)
        yield index, sample["__key__"], seeded_call(transform, rgb, seed), caption, extras


def encoded(
    samples: Iterable[tuple[int, dict]],
    counter: SkipCounter,
    crop: RandomResizedCrop | None,
    tag: str,
    with_foils: bool = False,
) -> Iterator[tuple[int, str, bytes, str, dict]]:
    """(raw index, key, encoded image bytes, caption, extras) per usable sample; rest counted.

    `data.decode=device`: only the image header is read (for the size the crop box is drawn
    for); `extras["crop"]` is the box RandomResizedCrop draws for the same seed in `decoded`.
    Bytes without an image header are counted here; a body that fails to decode is counted when
    the device decodes the batch (decode.py).
    """
    for index, sample, image_ext, caption, extras in _checked(samples, counter, with_foils):
        data = sample[image_ext]
        try:
            width, height = decode.image_size(data)
        except ValueError as error:
            skip(counter, "corrupt_image", sample, error)
            continue
        if crop is not None:
            seed = sample_rng(tag, index).getrandbits(63)
            extras["crop"] = decode.draw_crop(crop, width, height, seed)
        yield index, sample["__key__"], data, caption, extras


def _batch_buffer(batch_size: int, image: torch.Tensor) -> torch.Tensor:
    """An empty [batch_size, *image.shape] tensor, in shared memory inside a loader worker."""
    buffer = torch.empty((batch_size, *image.shape), dtype=image.dtype)
    # Allocated shared from the start, it crosses to the main process without another copy.
    return buffer.share_memory_() if get_worker_info() is not None else buffer


def _joined(files: list[bytes]) -> torch.Tensor:
    """The files' bytes end to end, uint8 [n], copied once into (worker) shared memory."""
    buffer = torch.empty(sum(len(f) for f in files), dtype=torch.uint8)
    if get_worker_info() is not None:
        buffer.share_memory_()  # crosses to the main process without another copy
    flat, offset = buffer.numpy(), 0
    for data in files:
        flat[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
        offset += len(data)
    return buffer


def batched(
    items: Iterable[tuple[int, str, torch.Tensor | bytes, str, dict]],
    counter: SkipCounter,
    *,
    batch_size: int,
    tokenizer: Callable,
    batches: int | None,
    drop_last: bool,
    position: tuple[int, int, int] | None,
    encoded: bool = False,
    max_foils: int | None = None,
) -> Iterator[dict]:
    """Collate items into `batches` batch dicts (None: until the items end).

    A batch carries the skip counts since the previous one and, for training, `position` =
    [epoch, worker, cursor]: the worker's raw samples consumed through this batch, from which a
    resume fast-forwards. With a fixed count and too few items (samples skipped as corrupt), the
    last batches come short, even empty, so that every rank still makes the same number of steps.
    `encoded` items (from `encoded`) give, instead of `images`, `encoded` (the files' bytes end
    to end, uint8 [n]), `encoded_lengths` [B] and, for training, `crops` [B, 4] (top, left,
    height, width). `max_foils` = F adds `foil_texts` [B, F, L] and `foil_mask` [B, F].
    """
    epoch, worker, cursor = position or (0, 0, 0)
    iterator = iter(items)
    blank = None  # an empty image batch of the right shape, once one image has been seen
    for _ in range(batches) if batches is not None else itertools.count():
        images, keys, captions, crops, foils = None, [], [], [], []
        for index, key, image, caption, extras in itertools.islice(iterator, batch_size):
            if encoded:
                images = [] if images is None else images
                images.append(image)
                if "crop" in extras:
                    crops.append(extras["crop"])
            else:
                # Copying each image in as it comes lets the allocator reuse one image's memory
                # for the next; holding a list of them and stacking costs fresh pages per batch.
                images = _batch_buffer(batch_size, image) if images is None else images
                blank = images[:0] if blank is None else blank
                images[len(keys)] = image
            foils.append(extras.get("foils", [])[: max_foils or 0])
            keys.append(key)
            captions.append(caption)
            cursor = index + 1
        short = len(keys) < batch_size
        if batches is None and (not keys or (drop_last and short)):
            return
        batch = {"texts": tokenizer(captions), "keys": keys, "skipped": counter.take()}
        batch["skip_notes"] = counter.take_notes()  # logged once per shard by loader.py
        if encoded:
            # One flat buffer, not B tensors: each tensor leaving a worker costs a shared-memory
            # segment and a file descriptor.
            batch["encoded"] = _joined(images or [])
            batch["encoded_lengths"] = torch.tensor([len(i) for i in images or []])
            if position is not None:
                batch["crops"] = torch.tensor(crops, dtype=torch.long).view(-1, 4)
        else:
            if images is None:
                images = blank if blank is not None else torch.empty(0, dtype=torch.uint8)
            batch["images"] = images[: len(keys)]  # [B, 3, H, W]
        if max_foils:
            batch.update(foil_tensors(foils, max_foils, tokenizer))
        if position is not None:
            batch["position"] = torch.tensor([epoch, worker, cursor])
        yield batch


def foil_tensors(foils: list[list[str]], max_foils: int, tokenizer: Callable) -> dict:
    """`foil_texts` [B, F, L] tokens (empty captions where a sample has fewer) and `foil_mask`
    [B, F], laid out as the synthetic data module makes them."""
    flat = [caption for row in foils for caption in row + [""] * (max_foils - len(row))]
    tokens = tokenizer(flat)  # [B * F, L]
    counts = torch.tensor([len(row) for row in foils], dtype=torch.long)
    return {
        "foil_texts": tokens.view(len(foils), max_foils, tokens.shape[-1]),
        "foil_mask": torch.arange(max_foils) < counts.view(-1, 1),
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
        held["skip_notes"] += counter.take_notes()
        yield held
