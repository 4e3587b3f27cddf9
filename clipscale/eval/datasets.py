"""Evaluation datasets in clip_benchmark's webdataset layout, read from a local folder.

Layout (the folders clip_benchmark's `wds/NAME` datasets read, so one copy serves both tools):

    DATASET/test/nshards.txt, DATASET/test/{0..n-1}.tar   samples: jpg|png|webp + cls (or txt)
    DATASET/classnames.txt                                 one class name a line
    DATASET/zeroshot_classification_templates.txt          one template a line, `{c}` = class
    DATASET/dataset_type.txt                               `retrieval` for captioned sets

An ImageFolder-style folder (DATASET/<class name>/*.jpg|png|webp, no nshards.txt) is read as a
zero-shot dataset too: classes are the sub-folders in sorted order, a class name is its folder
name with underscores as spaces, and the templates are DEFAULT_TEMPLATES (or the folder's own
classnames.txt / zeroshot_classification_templates.txt when present).

Samples keep their position in the dataset (`index`), so results computed on several ranks or
workers can be put back in dataset order and reduce to exactly the single-process numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from clipscale.data.decode import DeviceTransform, image_size
from clipscale.data.pipeline import caption_of, image_ext_of, rgb_image_of, skip
from clipscale.data.reading import SKIP_KINDS, SkipCounter, SkipLog, shard_samples
from clipscale.data.shards import DEFAULT_TEMPLATES
from clipscale.data.sources import shard_urls
from clipscale.distributed import all_reduce_sum

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")


@dataclass(frozen=True)
class EvalDatasetInfo:
    """What a dataset folder declares: its kind, shards, class names and templates."""

    name: str
    root: Path
    dataset_type: str  # "classification" or "retrieval"
    shards: list[str]
    classnames: list[str] | None
    templates: list[str] | None
    files: list[tuple[str, int]] | None = None  # ImageFolder input: (image path, class index)

    @property
    def sources(self) -> list:
        """What eval_loader reads: shard urls, or (path, class) pairs of an ImageFolder."""
        return self.files if self.files is not None else self.shards


def _read_lines(path: Path) -> list[str]:
    # clip_benchmark strips each line; doing the same keeps the prompts byte-identical
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def image_folder_info(root: Path) -> EvalDatasetInfo | None:
    """A zero-shot dataset of an ImageFolder-style folder, None if `root` is not one."""
    classes = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    files = [
        (str(path), label)
        for label, folder in enumerate(classes)
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and path.is_file()
    ]
    if not files:
        return None
    classnames = [folder.name.replace("_", " ") for folder in classes]
    if (root / "classnames.txt").is_file():
        classnames = _read_lines(root / "classnames.txt")
        if len(classnames) != len(classes):
            raise ValueError(
                f"{root}/classnames.txt lists {len(classnames)} names for {len(classes)} class folders"
            )
    templates = list(DEFAULT_TEMPLATES)
    if (root / "zeroshot_classification_templates.txt").is_file():
        templates = _read_lines(root / "zeroshot_classification_templates.txt")
    return EvalDatasetInfo(root.name, root, "classification", [], classnames, templates, files)


def read_dataset_info(root: str | Path, split: str = "test") -> EvalDatasetInfo:
    """Read a clip_benchmark-layout folder's metadata, raising a clear error for what is missing."""
    root = Path(root)
    nshards_file = root / split / "nshards.txt"
    if not nshards_file.is_file() and (info := image_folder_info(root)) is not None:
        return info
    if not nshards_file.is_file():
        raise FileNotFoundError(
            f"{str(root)!r} is not a clip_benchmark webdataset folder: {nshards_file} is missing. "
            f"Expected {root}/{split}/nshards.txt and {root}/{split}/0.tar, 1.tar, ..., or "
            "ImageFolder-style class folders of images (python -m clipscale.data.shards "
            "--layout zeroshot converts those)"
        )
    nshards = int(nshards_file.read_text().strip())
    shards = [str(root / split / f"{i}.tar") for i in range(nshards)]
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{nshards_file} says {nshards} shards but {missing} do not exist")
    type_file = root / "dataset_type.txt"
    dataset_type = (
        type_file.read_text().strip().lower() if type_file.is_file() else "classification"
    )
    if dataset_type not in ("classification", "retrieval"):
        raise ValueError(
            f"{type_file} says {dataset_type!r}; clipscale evaluates 'classification' (the default "
            "when the file is absent) and 'retrieval' datasets"
        )
    classnames = templates = None
    if dataset_type == "classification":
        for needed in ("classnames.txt", "zeroshot_classification_templates.txt"):
            if not (root / needed).is_file():
                raise FileNotFoundError(
                    f"zero-shot dataset {str(root)!r} has no {needed}; write one entry a line "
                    "(templates use {c} for the class name)"
                )
        classnames = _read_lines(root / "classnames.txt")
        templates = _read_lines(root / "zeroshot_classification_templates.txt")
        bad = [t for t in templates if "{c}" not in t]
        if bad:
            raise ValueError(f"templates {bad} in {root} lack the '{{c}}' class-name placeholder")
    return EvalDatasetInfo(root.name, root, dataset_type, shards, classnames, templates)


def _folder_sample(path: str, label: int) -> dict:
    """An ImageFolder file as a reading.py sample dict (its path stands for shard and key)."""
    ext = Path(path).suffix.lower().lstrip(".")
    return {"__key__": path, "__url__": path, ext: Path(path).read_bytes(), "__cls__": label}


class EvalSamples(torch.utils.data.IterableDataset):
    """Samples `(index, image, target, skips)` of this rank's and this worker's share, in order.

    `target` is the integer class (`cls`) or, with `captions=True`, the list of caption lines of
    `txt`. Every reader walks all shards and keeps sample i when i % readers == reader: evaluation
    sets are small next to training data, and this split stays exact whatever the shard count.
    Shards are read as training reads them (clipscale.data.reading): a sample without an image
    or caption, or whose image does not decode, is skipped and counted by kind, never fatal;
    `skips` = (counts by kind, notes) since the previous item. With a DeviceTransform `image` is
    the encoded bytes (decoded by EvalLoader). A last item `(None, None, None, skips)` carries
    the skips met after the last sample.
    """

    def __init__(
        self,
        shards: list,
        transform,
        captions: bool,
        rank: int = 0,
        world_size: int = 1,
        max_samples: int | None = None,
    ):
        super().__init__()
        self.shards, self.transform, self.captions = shards, transform, captions
        self.rank, self.world_size, self.max_samples = rank, world_size, max_samples

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        readers = self.world_size * num_workers
        reader = self.rank * num_workers + worker_id
        counter = SkipCounter()
        # Every reader meets a broken shard; only reader 0 counts it, so it is counted once.
        shard_counter = counter if reader == 0 else SkipCounter()
        if self.shards and isinstance(self.shards[0], tuple):  # ImageFolder (path, class) pairs
            raw = (_folder_sample(path, label) for path, label in self.shards)
        else:
            raw = (sample for url in self.shards for sample in shard_samples(url, shard_counter))
        for index, sample in enumerate(raw):
            if self.max_samples is not None and index >= self.max_samples:
                break
            if index % readers != reader:
                continue
            item = self._item(sample, counter)
            if item is not None:
                yield index, *item, (counter.take(), counter.take_notes())
        yield None, None, None, (counter.take(), counter.take_notes())

    def _item(self, sample: dict, counter: SkipCounter) -> tuple | None:
        """(image, target) of a usable sample; None after counting why it is not."""
        ext = image_ext_of(sample, counter)
        target = None if ext is None else self._target(sample, counter)
        if target is None:
            return None
        if isinstance(self.transform, DeviceTransform):  # decode=device: bytes, decoded later
            try:
                image_size(sample[ext])  # a header check in the worker, as training makes
            except ValueError as error:
                skip(counter, "corrupt_image", sample, error)
                return None
            return torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8), target
        image = rgb_image_of(sample, ext, counter)
        return None if image is None else (self.transform(image), target)

    def _target(self, sample: dict, counter: SkipCounter):
        """The class or caption lines; None after counting a missing or corrupt caption."""
        if "__cls__" in sample:
            return sample["__cls__"]
        if self.captions:
            caption = caption_of(sample, counter)
            return None if caption is None else caption.splitlines()
        if "cls" not in sample:
            raise ValueError(
                f"sample {sample['__key__']!r} in {sample['__url__']} has no cls label; "
                "classification datasets need KEY.cls with the integer class"
            )
        return int(sample["cls"].decode("utf-8").strip())


def _collate(items: list[tuple], stack: bool) -> tuple:
    """(indices [B], images [B,3,H,W] or a list of byte tensors, targets, skip counts, notes)."""
    counts, notes = dict.fromkeys(SKIP_KINDS, 0), []
    for *_, (item_counts, item_notes) in items:
        for kind, count in item_counts.items():
            counts[kind] += int(count)
        notes += item_notes
    samples = [item[:3] for item in items if item[0] is not None]
    indices, images, targets = zip(*samples, strict=True) if samples else ((), (), ())
    images = torch.stack(images) if stack and images else list(images)
    return torch.tensor(indices, dtype=torch.long), images, list(targets), counts, notes


class EvalLoader(torch.utils.data.DataLoader):
    """Batches `(indices [B], images [B,3,H,W], targets)` of this rank's share of a dataset.

    Skipped samples are counted by kind in `skipped` and logged once per shard and kind; with a
    DeviceTransform the batch is decoded on the device here, and images no decoder accepts are
    left out and counted as `corrupt_image`.
    """

    def __init__(self, samples: EvalSamples, batch_size: int, num_workers: int = 0):
        on_device = isinstance(samples.transform, DeviceTransform)
        collate = functools.partial(_collate, stack=not on_device)
        super().__init__(
            samples, batch_size=batch_size, num_workers=num_workers, collate_fn=collate
        )
        self.skipped = dict.fromkeys(SKIP_KINDS, 0)
        self.skip_log = SkipLog()

    def __iter__(self):
        for indices, images, targets, counts, notes in super().__iter__():
            if isinstance(self.dataset.transform, DeviceTransform) and images:
                indices, images, targets = self._decoded(indices, images, targets, counts, notes)
            for kind, count in counts.items():
                self.skipped[kind] += count
            self.skip_log.report(notes)
            if len(indices):
                yield indices, images, targets

    def _decoded(self, indices, encoded, targets, counts, notes) -> tuple:
        """The batch decoded on the device, less the images no decoder accepts (counted)."""
        images, valid = self.dataset.transform.decode(encoded)
        for index in indices[~valid].tolist():
            counts["corrupt_image"] += 1
            notes.append(("corrupt_image", "a data.decode=device batch", f"sample {index}"))
        kept = [target for target, ok in zip(targets, valid.tolist(), strict=True) if ok]
        return indices[valid], images, kept

    def skipped_samples(self) -> int:
        """Samples skipped on every rank together (a collective: every rank must call it)."""
        return int(all_reduce_sum(torch.tensor(sum(self.skipped.values()))))


def eval_loader(
    shards: list,
    transform,
    captions: bool,
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
) -> EvalLoader:
    """EvalLoader of `(indices [B], images [B,3,H,W], targets)` over this rank's share."""
    samples = EvalSamples(shards, transform, captions, rank, world_size, max_samples)
    return EvalLoader(samples, batch_size, num_workers)


def expand_shard_pattern(spec, key: str = "eval.val_shards") -> list[str]:
    """Urls of a shard spec (brace pattern, `a::b`, or a list of those), as training reads them."""
    return shard_urls(spec, key)
