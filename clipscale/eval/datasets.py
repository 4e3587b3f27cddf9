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

import io
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from clipscale.data.decode import DeviceTransform
from clipscale.data.shards import shard_urls

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")
DEFAULT_TEMPLATES = (
    "a photo of a {c}.",
    "a photo of the {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a close-up photo of a {c}.",
    "a drawing of a {c}.",
)


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


def _decode_image(sample: dict) -> Image.Image:
    if "__file__" in sample:
        with Image.open(sample["__file__"]) as image:
            return image.convert("RGB")
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return Image.open(io.BytesIO(sample[ext])).convert("RGB")
    raise ValueError(
        f"sample {sample.get('__key__')!r} in {sample.get('__url__')!r} has no image "
        f"(looked for {IMAGE_EXTENSIONS}; found {sorted(k for k in sample if not k.startswith('_'))})"
    )


def _image_bytes(sample: dict) -> torch.Tensor:
    """The sample's encoded image as uint8 [n] (decode=device decodes it on the device)."""
    if "__file__" in sample:
        data = Path(sample["__file__"]).read_bytes()
    else:
        ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if ext is None:
            _decode_image(sample)  # raises the error naming the sample
        data = sample[ext]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


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
        if self.shards and isinstance(self.shards[0], tuple):  # ImageFolder (path, class) pairs
            raw = ({"__file__": path, "__cls__": label} for path, label in self.shards)
        else:
            raw = wds.DataPipeline(wds.SimpleShardList(self.shards), wds.tarfile_to_samples())
        for index, sample in enumerate(raw):
            if self.max_samples is not None and index >= self.max_samples:
                return
            if index % readers != reader:
                continue
            if isinstance(self.transform, DeviceTransform):  # decode=device: bytes, decoded later
                yield index, _image_bytes(sample), self._target(sample)
            else:
                yield index, self.transform(_decode_image(sample)), self._target(sample)

    def _target(self, sample: dict):
        if "__cls__" in sample:
            return sample["__cls__"]
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
    if isinstance(transform, DeviceTransform):
        return _DeviceDecodedLoader(
            samples, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_bytes
        )
    return torch.utils.data.DataLoader(
        samples, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )


def _collate_bytes(batch: list[tuple]) -> tuple[torch.Tensor, list, list]:
    indices, images, targets = zip(*batch, strict=True)
    return torch.tensor(indices), list(images), list(targets)


class _DeviceDecodedLoader(torch.utils.data.DataLoader):
    """eval_loader with decode=device: batches of bytes from the workers, decoded on the device."""

    def __iter__(self):
        transform = self.dataset.transform
        for indices, encoded, targets in super().__iter__():
            where = f"evaluation samples {int(indices[0])}..{int(indices[-1])}"
            yield indices, transform.decode(encoded, where), targets


def expand_shard_pattern(spec, key: str = "eval.val_shards") -> list[str]:
    """Urls of a shard spec (brace pattern, `a::b`, or a list of those), as training reads them."""
    return shard_urls(spec, key)
