"""Evaluation datasets in clip_benchmark's webdataset layout, read from a local folder.

Layout (the folders clip_benchmark's `wds/NAME` datasets read, so one copy serves both tools):

    DATASET/test/nshards.txt, DATASET/test/{0..n-1}.tar   samples: jpg|png|webp + cls (or txt)
    DATASET/classnames.txt                                 one class name a line
    DATASET/zeroshot_classification_templates.txt          one template a line, `{c}` = class
    DATASET/dataset_type.txt                               `retrieval` for captioned sets

Samples keep their position in the dataset (`index`), so results computed on several ranks or
workers can be put back in dataset order and reduce to exactly the single-process numbers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from clipscale.data.shards import shard_urls

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


def _read_lines(path: Path) -> list[str]:
    # clip_benchmark strips each line; doing the same keeps the prompts byte-identical
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def read_dataset_info(root: str | Path, split: str = "test") -> EvalDatasetInfo:
    """Read a clip_benchmark-layout folder's metadata, raising a clear error for what is missing."""
    root = Path(root)
    nshards_file = root / split / "nshards.txt"
    if not nshards_file.is_file():
        raise FileNotFoundError(
            f"{str(root)!r} is not a clip_benchmark webdataset folder: {nshards_file} is missing. "
            f"Expected {root}/{split}/nshards.txt and {root}/{split}/0.tar, 1.tar, ..."
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


def _decode_image(sample: dict) -> Image.Image:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return Image.open(io.BytesIO(sample[ext])).convert("RGB")
    raise ValueError(
        f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has no image "
        f"(looked for {IMAGE_EXTENSIONS}; found {sorted(k for k in sample if not k.startswith('_'))})"
    )


class EvalSamples(torch.utils.data.IterableDataset):
    """Samples `(index, image_tensor, target)` of this rank's and this worker's share, in order.

    `target` is the integer class (`cls`) or, with `captions=True`, the list of caption lines of
    `txt`. Every reader walks all shards and keeps sample i when i % readers == reader: evaluation
    sets are small next to training data, and this split stays exact whatever the shard count.
    """

    def __init__(
        self,
        shards: list[str],
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
        raw = wds.DataPipeline(wds.SimpleShardList(self.shards), wds.tarfile_to_samples())
        for index, sample in enumerate(raw):
            if self.max_samples is not None and index >= self.max_samples:
                return
            if index % readers != reader:
                continue
            yield index, self.transform(_decode_image(sample)), self._target(sample)

    def _target(self, sample: dict):
        if self.captions:
            if "txt" not in sample:
                raise ValueError(f"sample {sample['__key__']!r} in {sample['__url__']} has no txt")
            return sample["txt"].decode("utf-8").splitlines()
        if "cls" not in sample:
            raise ValueError(
                f"sample {sample['__key__']!r} in {sample['__url__']} has no cls label; "
                "classification datasets need KEY.cls with the integer class"
            )
        return int(sample["cls"].decode("utf-8").strip())


def _collate(batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor, list]:
    indices, images, targets = zip(*batch, strict=True)
    return torch.tensor(indices), torch.stack(images), list(targets)


def eval_loader(
    shards: list[str],
    transform,
    captions: bool,
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int | None = None,
) -> torch.utils.data.DataLoader:
    """DataLoader of `(indices [B], images [B,3,H,W], targets)` over this rank's share."""
    samples = EvalSamples(shards, transform, captions, rank, world_size, max_samples)
    return torch.utils.data.DataLoader(
        samples, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )


def expand_shard_pattern(spec, key: str = "eval.val_shards") -> list[str]:
    """Urls of a shard spec (brace pattern, `a::b`, or a list of those), as training reads them."""
    return shard_urls(spec, key)
