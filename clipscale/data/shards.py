"""Write webdataset shards from captioned images; check a run's shard options (`check_shards`).

    python -m clipscale.data.shards --images DIR --output OUT
    python -m clipscale.data.shards --table pairs.parquet --path-column url --caption-column text \
        --output OUT --samples-per-shard 10000 --resize 256 --workers 8

    python -m clipscale.data.shards --layout zeroshot --images CLASS_FOLDERS --output EVAL/NAME
    python -m clipscale.data.shards --layout retrieval --table captions.csv --output EVAL/NAME

Training layout (`--layout train`, the default): each sample becomes, in
`OUT/shard-NNNNNN.tar`, with KEY the input's row number (9 digits):
    KEY.jpg|png|webp  the image: its original bytes, or re-encoded when resized or of another format
    KEY.txt           the caption, stripped (UTF-8)
    KEY.json          {"source": input path, "width": w, "height": h} of the original image
    KEY.foils.json    with --foils-column: the sample's foil captions (hard negatives), a JSON list
                      of strings, e.g. ["a blue circle left of a red square"]
`OUT/sizes.json` maps each shard file name to its sample count.

Evaluation layouts, the folders clip_benchmark's `wds/NAME` datasets and clipscale.evaluate read:
    --layout zeroshot   from an ImageFolder-style folder (one sub-folder of images per class,
                        classes in sorted order): OUT/test/{0..n-1}.tar with KEY.EXT, KEY.cls (the
                        integer class, ASCII) and KEY.json; OUT/test/nshards.txt; OUT/classnames.txt
                        (folder names, underscores as spaces); OUT/zeroshot_classification_templates.txt
                        (--templates FILE, or DEFAULT_TEMPLATES below)
    --layout retrieval  from a table of (image path, caption) rows, several rows per image allowed:
                        OUT/test/{0..n-1}.tar with KEY.EXT, KEY.txt (the image's captions, one a
                        line, in table order) and KEY.json; OUT/test/nshards.txt;
                        OUT/dataset_type.txt = "retrieval"
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import multiprocessing
import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from clipscale.data.sources import SIZES_FILE, check_countable, shard_urls
from clipscale.errors import ArgumentParser, known_errors, removed_on_error

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are
# Zero-shot prompts for a dataset without its own templates (also ImageFolder evaluation sets)
DEFAULT_TEMPLATES = (
    "a photo of a {c}.",
    "a photo of the {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "a close-up photo of a {c}.",
    "a drawing of a {c}.",
)


def check_shards(train_shards, val_shards, *, resampled: bool, samples_per_epoch) -> None:
    """Raise what WebDataModule.setup would for these options, before a run starts (preflight)."""
    if val_shards is not None:
        shard_urls(val_shards, "data.val_shards")
    if train_shards is not None:
        urls = shard_urls(train_shards, "data.train_shards")
        check_countable(
            urls, "data.train_shards", resampled=resampled, samples_per_epoch=samples_per_epoch
        )


def pairs_from_folder(folder: Path) -> Iterator[tuple[str, str | None]]:
    """(image path, caption or None) for every image under `folder`, in sorted path order."""
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            caption_path = path.with_suffix(".txt")
            caption = caption_path.read_text("utf-8") if caption_path.is_file() else None
            yield str(path), caption


def _foils_member(value, where: str) -> dict[str, bytes]:
    """{"foils.json": JSON list} of a table cell holding a JSON list of strings (or a list)."""
    foils = value
    if isinstance(value, str):
        try:
            foils = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not a JSON list of strings ({error.msg})") from error
    foils = (
        list(foils) if not isinstance(foils, (str, dict)) and hasattr(foils, "__iter__") else foils
    )
    if not isinstance(foils, list) or not all(isinstance(f, str) and f.strip() for f in foils):
        raise ValueError(f"{where}: expected a JSON list of non-empty strings, got {value!r}")
    return {"foils.json": json.dumps([f.strip() for f in foils]).encode()}


def read_table(table: Path, columns: list[tuple[str, str]]):
    """A CSV/TSV/parquet file as a DataFrame, checking each (option, column) is present."""
    import pandas as pd  # only the table input needs pandas

    suffix = table.suffix.lower()
    if suffix == ".parquet":
        frame = pd.read_parquet(table)
    elif suffix in (".csv", ".tsv"):
        frame = pd.read_csv(
            table, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False
        )
    else:
        raise ValueError(f"--table {table}: expected a .csv, .tsv or .parquet file")
    for option, column in columns:
        if column not in frame.columns:
            raise ValueError(
                f"{option} {column!r} is not a column of {table}; it has {list(frame.columns)}"
            )
    return frame


def pairs_from_table(
    table: Path,
    path_column: str,
    caption_column: str,
    image_root: Path | None,
    foils_column: str | None = None,
):
    """(image path, caption[, {"foils.json"}]) rows of a table; relative paths from `image_root`."""
    columns = [("--path-column", path_column), ("--caption-column", caption_column)]
    frame = read_table(
        table, columns + ([("--foils-column", foils_column)] if foils_column else [])
    )
    root = image_root or table.parent
    for row, (path, caption) in enumerate(
        zip(frame[path_column], frame[caption_column], strict=True)
    ):
        caption = None if caption is None else str(caption)
        if foils_column is None:
            yield str(root / str(path)), caption
        else:
            where = f"{table} row {row + 1}, --foils-column {foils_column!r}"
            yield (
                str(root / str(path)),
                caption,
                _foils_member(frame[foils_column].iloc[row], where),
            )


def class_folder_rows(folder: Path) -> tuple[list[tuple], list[str]]:
    """((image path, None, {"cls": class index}) rows, class names) of an ImageFolder folder."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    rows = [
        (str(path), None, {"cls": str(label).encode()})
        for label, class_folder in enumerate(classes)
        for path in sorted(class_folder.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    if not rows:
        raise ValueError(
            f"--images {folder}: --layout zeroshot needs one sub-folder of images per class "
            "(DIR/<class name>/*.jpg), found none"
        )
    return rows, [p.name.replace("_", " ") for p in classes]


def caption_rows(table: Path, path_column: str, caption_column: str, image_root: Path | None):
    """(image path, its captions one a line) per distinct image of a table, in first-seen order."""
    captions: dict[str, list[str]] = {}
    for path, caption in pairs_from_table(table, path_column, caption_column, image_root):
        line = " ".join((caption or "").split())  # one caption, one line
        captions.setdefault(path, [])
        if line:
            captions[path].append(line)
    return [(path, "\n".join(lines)) for path, lines in captions.items()]


def write_eval_layout(layout: str, rows, output: Path, args, classnames=None) -> dict[str, int]:
    """Write clip_benchmark's zero-shot or retrieval layout of `rows` to `output`; sizes."""
    sizes, skipped = write_shards(
        rows, output / "test", args.samples_per_shard, args.resize, args.workers, "{}.tar"
    )
    (output / "test" / "nshards.txt").write_text(f"{len(sizes)}\n")
    if layout == "zeroshot":
        (output / "classnames.txt").write_text("\n".join(classnames) + "\n")
        templates = (
            args.templates.read_text("utf-8").strip()
            if args.templates
            else "\n".join(DEFAULT_TEMPLATES)
        )
        if "{c}" not in templates:
            raise ValueError(f"--templates {args.templates}: templates need the {{c}} placeholder")
        (output / "zeroshot_classification_templates.txt").write_text(templates + "\n")
    else:
        (output / "dataset_type.txt").write_text("retrieval\n")
    return sizes, skipped


def encode_sample(job: tuple) -> tuple[int, dict | None, str]:
    """Load, check and (optionally) shrink one image: (index, members or None, reason skipped).

    `job` = (index, path, caption, resize[, extra members {ext: bytes} added to the sample]).
    """
    index, path, caption, resize, *rest = job
    extra = rest[0] if rest else {}
    if (caption is None or not caption.strip()) and "cls" not in extra:
        return index, None, f"{path}: no caption"
    try:
        with Image.open(path) as image:
            image.load()  # a full decode: truncated files fail here, not in training
            width, height = image.size
            ext = KEPT_FORMATS.get(image.format, "png")
            if (resize and min(width, height) > resize) or image.format not in KEPT_FORMATS:
                data = _reencoded(image, ext, resize)
            else:
                data = Path(path).read_bytes()
    except Exception as error:  # unreadable file or anything PIL cannot decode: leave it out
        return index, None, f"{path}: {error}"
    meta = {"source": path, "width": width, "height": height}
    members = {ext: data, "json": json.dumps(meta).encode()}
    if caption is not None:
        members["txt"] = caption.strip().encode()
    return index, {**members, **extra}, ""


def _reencoded(image: Image.Image, ext: str, resize: int | None) -> bytes:
    """The image in format `ext`, its shorter side scaled down to `resize` if given."""
    if resize and min(image.size) > resize:
        scale = resize / min(image.size)
        size = (max(resize, round(image.width * scale)), max(resize, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    # JPEG stores neither alpha nor palettes; WebP stores alpha but no palettes.
    if ext == "jpg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    elif ext == "webp" and image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA")
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext], quality=95)
    return buffer.getvalue()


class ShardWriter:
    """Writes members to numbered tar shards of `samples_per_shard` samples each."""

    def __init__(self, output: Path, samples_per_shard: int, name_format="shard-{:06d}.tar"):
        self.output, self.samples_per_shard = output, samples_per_shard
        self.name_format = name_format
        self.sizes: dict[str, int] = {}
        self.tar: tarfile.TarFile | None = None

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample, starting a new shard when the current one is full."""
        if self.tar is None or self.sizes[self.name] == self.samples_per_shard:
            self._close_shard()
            self.name = self.name_format.format(len(self.sizes))
            # Written under a temporary name so that an interrupted run leaves no valid-looking shard.
            self.tar = tarfile.open(  # noqa: SIM115 - closed by _close_shard when full
                self.output / f"{self.name}.partial", "w", format=tarfile.GNU_FORMAT
            )
            self.sizes[self.name] = 0
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode = len(data), 0o444
            self.tar.addfile(info, io.BytesIO(data))
        self.sizes[self.name] += 1

    def _close_shard(self) -> None:
        if self.tar is not None:
            self.tar.close()
            os.replace(self.output / f"{self.name}.partial", self.output / self.name)

    def close(self) -> dict[str, int]:
        """Finish the last shard and write sizes.json; returns {shard name: sample count}."""
        self._close_shard()
        (self.output / SIZES_FILE).write_text(json.dumps(self.sizes, indent=1) + "\n")
        return self.sizes


def write_shards(
    pairs,
    output: Path,
    samples_per_shard: int,
    resize: int | None,
    workers: int,
    name_format: str = "shard-{:06d}.tar",
):
    """Write (path, caption[, extra members]) rows to shards in `output`: (sizes, skipped reasons)."""
    output.mkdir(parents=True, exist_ok=True)
    if any(output.glob("*.tar")):
        raise FileExistsError(
            f"--output {output} already holds .tar shards; choose an empty folder"
        )
    jobs = ((index, *row[:2], resize, *row[2:]) for index, row in enumerate(pairs))
    writer, skipped, seen = ShardWriter(output, samples_per_shard, name_format), [], 0
    with contextlib.ExitStack() as stack:
        if workers > 1:
            # imap keeps input order, so keys, shards and sizes.json do not depend on --workers.
            pool = stack.enter_context(multiprocessing.Pool(workers))
            results = pool.imap(encode_sample, jobs, chunksize=16)
        else:
            results = map(encode_sample, jobs)
        for index, members, reason in tqdm(results, desc="shards", unit="img"):
            seen += 1
            if members is None:
                log.warning("left out %s", reason)
                skipped.append(reason)
            else:
                writer.add(f"{index:09d}", members)
    if not writer.sizes:
        raise ValueError(f"no usable image/caption pair among {seen} inputs; nothing written")
    return writer.close(), skipped


def main(argv: list[str] | None = None) -> None:
    """Command line: write shards from an image folder or a table of (path, caption)."""
    parser = ArgumentParser(
        prog="python -m clipscale.data.shards", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of images, each with a same-named .txt")
    source.add_argument(
        "--table", type=Path, help="CSV, TSV or parquet file of image paths and captions"
    )
    parser.add_argument(
        "--layout",
        choices=("train", "zeroshot", "retrieval"),
        default="train",
        help="train: training shards; zeroshot (from --images class folders) or retrieval (from "
        "--table): clip_benchmark's evaluation layout",
    )
    parser.add_argument(
        "--templates", type=Path, help="zeroshot: file of prompt templates, one a line, {c} = class"
    )
    parser.add_argument(
        "--foils-column", help="train: table column of foil captions (a JSON list of strings)"
    )
    parser.add_argument("--path-column", default="path", help="table column of image paths")
    parser.add_argument("--caption-column", default="caption", help="table column of captions")
    parser.add_argument(
        "--image-root", type=Path, help="base of relative table paths (default: the table's folder)"
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="folder for the shards and sizes.json"
    )
    parser.add_argument("--samples-per-shard", type=int, default=10000)
    parser.add_argument(
        "--resize", type=int, help="scale images down so the shorter side is this many pixels"
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="decoding processes"
    )
    args = parser.parse_args(argv)
    for option, value in [
        ("--samples-per-shard", args.samples_per_shard),
        ("--workers", args.workers),
        ("--resize", args.resize or 1),
    ]:
        if value < 1:
            parser.error(f"{option} {value}: expected a positive integer")
    if args.images is not None and not args.images.is_dir():
        parser.error(f"--images {args.images}: not a folder")
    if args.table is not None and not args.table.is_file():
        parser.error(f"--table {args.table}: no such file")
    if args.layout == "zeroshot" and args.images is None:
        parser.error("--layout zeroshot reads class folders: give --images DIR (DIR/<class>/*.jpg)")
    if args.layout == "retrieval" and args.table is None:
        parser.error("--layout retrieval reads captions from a table: give --table FILE")
    if args.foils_column and (args.layout != "train" or args.table is None):
        parser.error("--foils-column needs --layout train and --table")
    with removed_on_error(args.output):  # a failed write leaves no output folder behind
        if args.layout == "zeroshot":
            rows, classnames = class_folder_rows(args.images)
            sizes, skipped = write_eval_layout("zeroshot", rows, args.output, args, classnames)
        elif args.layout == "retrieval":
            rows = caption_rows(args.table, args.path_column, args.caption_column, args.image_root)
            sizes, skipped = write_eval_layout("retrieval", rows, args.output, args)
        else:
            if args.images is not None:
                pairs = pairs_from_folder(args.images)
            else:
                pairs = pairs_from_table(
                    args.table,
                    args.path_column,
                    args.caption_column,
                    args.image_root,
                    args.foils_column,
                )
            sizes, skipped = write_shards(
                pairs, args.output, args.samples_per_shard, args.resize, args.workers
            )
    samples, shards = sum(sizes.values()), len(sizes)
    print(
        f"wrote {samples} sample{'s' * (samples != 1)} in {shards} shard{'s' * (shards != 1)} "
        f"to {args.output}; left out {len(skipped)}"
    )
    if skipped:
        print(
            "left out:\n  " + "\n  ".join(skipped[:20]) + ("\n  ..." if len(skipped) > 20 else ""),
            file=sys.stderr,
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    known_errors(also=(ValueError, OSError))(main)()  # bad input files: one line, no traceback
