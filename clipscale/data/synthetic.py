"""Procedurally drawn captioned images: the embedded demo's data, no files or downloads needed.

Each sample is a shape (circle, square, triangle, cross) of a named colour, drawn at a random
position and size on a plain background, with a caption that names colour and shape among other
details. A sample is a pure function of (seed, split, index), so every run, rank and worker sees
the same data. The class of a sample is "<colour> <shape>" (24 classes) for the zero-shot check.

With `objects=2` the training split holds two-object scenes instead (clipscale.data.scenes: two
shapes side by side, captions such as "a red circle left of a blue square" or "a red circle and
no green triangle"; label -1); the held-out split stays one-object, so the zero-shot check is
unchanged. With `hard_negatives` (two-object data only) each training sample also carries up to
`max_hard_negatives` false captions made from its true one ("foil_texts" [F, L] tokens and
"foil_mask" [F] bool, F = max_hard_negatives padded with empty captions marked False).

With `mirror_pairs` (two-object data only) every training scene comes with its mirror image in the
same batch: the two things change sides and the caption changes with them ("a red circle left of
a blue square" becomes "a red circle right of a blue square"). Each caption is then a hard negative
for the other image of its pair, and the pair differs only in which object is on which side. This
is what starts left/right binding in the tiny model (benchmarks/RESULTS.md, round 4).
"""

from __future__ import annotations

import random
import zlib

import lightning as L
import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import DataLoader, Dataset, default_collate

from clipscale.data import scenes
from clipscale.data.scenes import BACKGROUNDS, CANVAS, COLOURS, FOIL_TYPES, SHAPES, draw_shape
from clipscale.models import build_tokenizer, build_transforms, image_preprocess
from clipscale.preemption import resumable_sampler

POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
CLASSNAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
TEMPLATES = ("a photo of a {c}.", "a drawing of a {c}.", "a {c}.")
CAPTIONS = (
    "a {size} {colour} {shape} in the {position}",
    "a {colour} {shape} on a {background} background",
    "a drawing of a {colour} {shape}",
    "there is a {size} {colour} {shape} near the {position}",
    "{colour} {shape}, {size}, {background} background",
    "a photo of a {colour} {shape}.",
)
SPLITS = {"train": 0, "val": 1}


def _centre(position: str, radius: int, rng: random.Random) -> tuple[int, int]:
    low, high = radius + 1, CANVAS - radius - 1
    middle = CANVAS // 2
    if position == "centre":
        return middle + rng.randint(-4, 4), middle + rng.randint(-4, 4)
    x = rng.randint(low, middle) if "left" in position else rng.randint(middle, high)
    y = rng.randint(low, middle) if "top" in position else rng.randint(middle, high)
    return x, y


def draw_sample(seed: int, split: str, index: int) -> tuple[Image.Image, str, int]:
    """(image, caption, class index) for one sample, deterministic in its arguments."""
    rng = random.Random(f"{seed}/{split}/{index}")
    shape = rng.choice(SHAPES)
    colour = rng.choice(tuple(COLOURS))
    background = rng.choice(tuple(BACKGROUNDS))
    position = rng.choice(POSITIONS)
    size = rng.choice(("small", "large"))
    radius = rng.randint(7, 11) if size == "small" else rng.randint(15, 20)
    x, y = _centre(position, radius, rng)

    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    draw_shape(draw, shape, x, y, radius, fill)

    caption = rng.choice(CAPTIONS).format(
        size=size, colour=colour, shape=shape, position=position, background=background
    )
    return image, caption, CLASSNAMES.index(f"{colour} {shape}")


def draw_two_object_sample(
    seed: int, split: str, index: int, foil_types=(), max_foils: int = 0, mirrored: bool = False
) -> tuple[Image.Image, str, list[str]]:
    """(image, caption, foil captions) of a two-object scene, deterministic in its arguments.

    `mirrored`: the same scene seen in a mirror, with the mirrored relation caption (a relation
    caption is drawn for it when the scene's own caption is a negation, which a mirror leaves true).
    """
    rng = random.Random(f"{seed}/{split}/{index}/two")
    scene = scenes.draw_scene(rng)
    image = scenes.render_scene(scene, rng)
    caption = scenes.true_caption(scene, rng)
    if mirrored:
        image, scene = ImageOps.mirror(image), scene.mirrored()
        relation = caption.kind == "relation"
        caption = caption.mirrored() if relation else scenes.true_relation(scene, rng)
    foils = [scenes.make_foil(kind, scene, caption, rng) for kind in foil_types]
    texts = [foil.text() for foil in foils if foil is not None]
    return image, caption.text(), texts[:max_foils]


def check_hard_negatives(hard_negatives, max_hard_negatives: int, objects: int) -> tuple:
    """The validated `data.hard_negatives` as a tuple of foil types (empty for null)."""
    if hard_negatives is None:
        return ()
    if isinstance(hard_negatives, str) or not all(isinstance(k, str) for k in hard_negatives):
        raise ValueError(
            f"data.hard_negatives={hard_negatives!r}: expected null or a list drawn from "
            f"{list(FOIL_TYPES)}"
        )
    unknown = [k for k in hard_negatives if k not in FOIL_TYPES]
    if unknown:
        raise ValueError(
            f"data.hard_negatives: unknown foil type {unknown[0]!r}; expected some of "
            f"{list(FOIL_TYPES)}"
        )
    if not isinstance(max_hard_negatives, int) or max_hard_negatives < 1:
        raise ValueError(
            f"data.max_hard_negatives must be a positive integer, got {max_hard_negatives!r}"
        )
    if objects != 2 and hard_negatives:
        raise ValueError(
            "data.hard_negatives needs two-object captions: set data.objects=2 (one-object "
            "captions have no colour to swap or relation to reverse)"
        )
    return tuple(hard_negatives)


class SyntheticCaptions(Dataset):
    """`length` samples of one split as dicts {"images", "texts", "labels"} (+ foils).

    With `mirror_pairs` an item is a scene and its mirror image: every tensor gains a leading
    dimension of 2, and `flatten_pairs` collates items into a batch of 2 × items samples.
    """

    def __init__(
        self,
        length: int,
        split: str,
        seed: int,
        transform,
        tokenizer,
        objects: int = 1,
        foil_types: tuple = (),
        max_foils: int = 0,
        mirror_pairs: bool = False,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if mirror_pairs and objects != 2:
            raise ValueError("mirror pairs need two-object scenes (objects=2)")
        self.length, self.split, self.seed = length, split, seed
        self.transform, self.tokenizer = transform, tokenizer
        self.objects, self.foil_types, self.max_foils = objects, foil_types, max_foils
        self.mirror_pairs = mirror_pairs

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.sample(index)
        if not self.mirror_pairs:
            return sample
        # The mirror's pixels are the original's crop, mirrored: the pair differs in its sides alone.
        _, caption, foils = draw_two_object_sample(
            self.seed, self.split, index, self.foil_types, self.max_foils, mirrored=True
        )
        mirror = self.encode(sample["images"].flip(-1), caption, -1, foils)
        return {key: torch.stack([sample[key], mirror[key]]) for key in sample}

    def sample(self, index: int) -> dict[str, torch.Tensor]:
        """Sample `index` as a dict of tensors."""
        foils = None
        if self.objects == 2:
            image, caption, foils = draw_two_object_sample(
                self.seed, self.split, index, self.foil_types, self.max_foils
            )
            label = -1  # two objects: no single class
        else:
            image, caption, label = draw_sample(self.seed, self.split, index)
        # The random crop is part of the sample too: the same in every run, rank, worker and resume.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{self.seed}/{self.split}/{index}".encode()))
            pixels = self.transform(image)
        return self.encode(pixels, caption, label, foils)

    def encode(self, pixels: torch.Tensor, caption: str, label: int, foils) -> dict:
        """The sample dict of transformed pixels, caption, label and (with foil types) foils."""
        sample = {
            "images": pixels,  # [3, H, W]
            "texts": self.tokenizer([caption])[0],  # [context_length]
            "labels": torch.tensor(label),
        }
        if self.foil_types:
            padding = [""] * (self.max_foils - len(foils))
            sample["foil_texts"] = self.tokenizer(foils + padding)  # [F, context_length]
            sample["foil_mask"] = torch.arange(self.max_foils) < len(foils)  # [F]
        return sample


def flatten_pairs(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Collate mirror pairs into one batch: scene 0, its mirror, scene 1, its mirror, ..."""
    return {key: value.flatten(0, 1) for key, value in default_collate(items).items()}


class SyntheticDataModule(L.LightningDataModule):
    """The embedded demo's data: synthetic captioned shapes with a held-out split."""

    classnames = CLASSNAMES
    templates = TEMPLATES

    def __init__(
        self,
        model_name: str,
        batch_size: int = 128,
        num_workers: int = 0,
        train_samples: int = 100_000,
        val_samples: int = 1_024,
        seed: int = 0,
        objects: int = 1,
        hard_negatives: list[str] | None = None,
        max_hard_negatives: int = 3,
        mirror_pairs: bool = False,
        model_config: dict | None = None,
    ):
        super().__init__()
        # the images' mean/std/interpolation/resize mode follow the model's weights
        self.preprocess = image_preprocess(model_config)
        for key, value in (
            ("data.batch_size", batch_size),
            ("data.train_samples", train_samples),
            ("data.val_samples", val_samples),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be an integer >= 0, got {num_workers!r}")
        self.model_name, self.batch_size, self.num_workers = model_name, batch_size, num_workers
        self.train_samples, self.val_samples, self.seed = train_samples, val_samples, seed
        if objects not in (1, 2):
            raise ValueError(f"data.objects must be 1 or 2, got {objects!r}")
        self.objects = objects
        self.foil_types = check_hard_negatives(hard_negatives, max_hard_negatives, objects)
        self.max_hard_negatives = max_hard_negatives
        if not isinstance(mirror_pairs, bool):
            raise ValueError(f"data.mirror_pairs must be true or false, got {mirror_pairs!r}")
        if mirror_pairs and objects != 2:
            raise ValueError("data.mirror_pairs needs two-object scenes: set data.objects=2")
        if mirror_pairs and batch_size % 2:
            raise ValueError(
                f"data.mirror_pairs puts a scene and its mirror in the same batch, so "
                f"data.batch_size must be even, got {batch_size}"
            )
        self.mirror_pairs = mirror_pairs

    def dataset(self, split: str) -> SyntheticCaptions:
        """The train (augmenting transform) or val (deterministic transform, one object) split."""
        train = split == "train"
        length = self.train_samples if train else self.val_samples
        transform = build_transforms(self.model_name, is_train=train, preprocess=self.preprocess)
        tokenizer = build_tokenizer(self.model_name)
        if not train:
            return SyntheticCaptions(length, split, self.seed, transform, tokenizer)
        if self.mirror_pairs:  # an item is a scene and its mirror: half as many items
            length //= 2
        return SyntheticCaptions(
            length, split, self.seed, transform, tokenizer,
            self.objects, self.foil_types, self.max_hard_negatives, self.mirror_pairs,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        """Seeded shuffle split across ranks, drop_last; a resumed run continues at its batch."""
        dataset = self.dataset("train")
        items = self.batch_size // 2 if self.mirror_pairs else self.batch_size
        return DataLoader(
            dataset,
            batch_size=items,
            sampler=resumable_sampler(dataset, items, self.seed, self.trainer),
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=flatten_pairs if self.mirror_pairs else None,
        )

    def val_dataloader(self) -> DataLoader:
        """The held-out split in order."""
        return DataLoader(
            self.dataset("val"), batch_size=self.batch_size, num_workers=self.num_workers
        )
