"""The shard writer: what goes in comes back out, bad inputs are left out, sizes.json is right."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import webdataset as wds
from PIL import Image

from clipscale.data.shards import main, write_shards
from clipscale.data.sources import count_samples, shard_sizes

FORMATS = {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP"}


def make_images(
    folder: Path, count: int, size: tuple[int, int] = (24, 20)
) -> list[tuple[Path, str]]:
    """`count` random images cycling through jpg/png/webp, with captions; returns (path, caption)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for index in range(count):
        suffix = list(FORMATS)[index % 3]
        path = folder / f"img{index:03d}{suffix}"
        pixels = rng.integers(0, 256, (size[1] + index, size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, format=FORMATS[suffix])
        pairs.append((path, f"a caption for image {index} ✓"))
    return pairs


def pixels(path_or_image) -> np.ndarray:
    """RGB pixels as decoded by PIL (the reference for what a reader must return)."""
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(image.convert("RGB"))


def read_back(output: Path) -> dict[str, tuple[np.ndarray, str]]:
    """{key: (pixels, caption)} read with webdataset's own reader, independent of clipscale's."""
    urls = sorted(str(p) for p in output.glob("*.tar"))
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
    return {
        sample["__key__"]: (
            pixels(sample[next(k for k in ("jpg", "png", "webp") if k in sample)]),
            sample["txt"],
        )
        for sample in dataset
    }


def shard_counts(output: Path) -> dict[str, int]:
    """{shard file name: number of distinct keys in it}, counted from the tar listing."""
    counts = {}
    for path in sorted(output.glob("*.tar")):
        with tarfile.open(path) as tar:
            counts[path.name] = len({name.split(".")[0] for name in tar.getnames()})
    return counts


def test_folder_round_trip_gives_the_same_pairs_and_sizes(tmp_path):
    pairs = make_images(tmp_path / "in", 11)
    for path, caption in pairs:
        path.with_suffix(".txt").write_text(f"  {caption}\n")  # surrounding whitespace is dropped
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "in" / "broken.txt").write_text("never written")
    make_images(tmp_path / "nocaption", 1)[0][0].rename(tmp_path / "in" / "lonely.png")

    main(
        [
            "--images",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--samples-per-shard",
            "4",
            "--workers",
            "2",
        ]
    )

    written = read_back(tmp_path / "out")
    expected = sorted((pixels(path).tobytes(), caption) for path, caption in pairs)
    assert sorted((image.tobytes(), caption) for image, caption in written.values()) == expected
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert (
        sizes
        == shard_counts(tmp_path / "out")
        == {
            "shard-000000.tar": 4,
            "shard-000001.tar": 4,
            "shard-000002.tar": 3,
        }
    )
    paths = [str(tmp_path / "out" / name) for name in sizes]
    assert shard_sizes(paths) == [count_samples(path) for path in paths] == [4, 4, 3]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_table_round_trip_gives_the_same_pairs(tmp_path, suffix):
    pairs = make_images(tmp_path / "images", 7)
    rows = [{"file": str(path.relative_to(tmp_path)), "text": caption} for path, caption in pairs]
    rows.append({"file": "images/does-not-exist.jpg", "text": "missing file"})
    rows.append({"file": str(pairs[0][0].relative_to(tmp_path)), "text": ""})  # no caption
    table = tmp_path / f"pairs{suffix}"
    frame = pd.DataFrame(rows)
    if suffix == ".parquet":
        frame.to_parquet(table)
    else:
        frame.to_csv(table, sep="\t" if suffix == ".tsv" else ",", index=False)

    main(
        [
            "--table",
            str(table),
            "--path-column",
            "file",
            "--caption-column",
            "text",
            "--output",
            str(tmp_path / "out"),
            "--workers",
            "1",
        ]
    )

    written = read_back(tmp_path / "out")
    # Keys are row numbers: rows 0..6 are kept, the two bad rows are left out.
    assert sorted(written) == [f"{row:09d}" for row in range(7)]
    for row, (path, caption) in enumerate(pairs):
        image, text = written[f"{row:09d}"]
        assert text == caption
        np.testing.assert_array_equal(image, pixels(path))
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"shard-000000.tar": 7}


def test_resize_shrinks_the_shorter_side_and_never_enlarges(tmp_path):
    big = tmp_path / "in" / "big.jpg"
    big.parent.mkdir()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(big)
    Image.new("RGB", (40, 60), (200, 10, 30)).save(tmp_path / "in" / "small.png")
    for name in ("big", "small"):
        (tmp_path / "in" / f"{name}.txt").write_text(name)

    write_shards(
        [(str(tmp_path / "in" / f), c) for f, c in [("big.jpg", "big"), ("small.png", "small")]],
        tmp_path / "out",
        samples_per_shard=10,
        resize=64,
        workers=1,
    )

    sizes = {caption: image.shape[:2] for image, caption in read_back(tmp_path / "out").values()}
    assert sizes == {"big": (64, 96), "small": (60, 40)}  # (height, width)


def test_shards_do_not_depend_on_the_number_of_workers(tmp_path):
    pairs = [(str(path), caption) for path, caption in make_images(tmp_path / "in", 9)]
    write_shards(pairs, tmp_path / "one", samples_per_shard=4, resize=16, workers=1)
    write_shards(pairs, tmp_path / "two", samples_per_shard=4, resize=16, workers=2)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "sizes.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_bad_table_columns_and_full_output_are_refused_with_the_fix(tmp_path):
    table = tmp_path / "pairs.csv"
    pd.DataFrame([{"url": "a.jpg", "caption": "a"}]).to_csv(table, index=False)
    with pytest.raises(
        ValueError, match=r"--path-column 'path' is not a column .*\['url', 'caption'\]"
    ):
        main(["--table", str(table), "--output", str(tmp_path / "out")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(FileExistsError, match="already holds .tar shards"):
        write_shards([], tmp_path / "full", samples_per_shard=1, resize=None, workers=1)


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_foils_column_reaches_the_training_batch(tmp_path, decode):
    """Writer --foils-column -> KEY.foils.json -> WebDataModule(hard_negatives) foil tensors."""
    from clipscale.data.webdataset import WebDataModule
    from clipscale.models import build_tokenizer

    pairs = make_images(tmp_path / "images", 4)
    foils = [["a wrong caption"], [], ["one foil", "two foils", "three foils"], ["last"]]
    rows = [
        {"file": str(path.relative_to(tmp_path)), "text": caption, "foils": json.dumps(f)}
        for (path, caption), f in zip(pairs, foils, strict=True)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "pairs.csv", index=False)
    main(
        ["--table", str(tmp_path / "pairs.csv"), "--path-column", "file"]
        + ["--caption-column", "text", "--foils-column", "foils"]
        + ["--output", str(tmp_path / "out"), "--workers", "1"]
    )
    data = WebDataModule(
        train_shards=str(tmp_path / "out" / "shard-000000.tar"),
        resampled=False,
        shuffle_buffer=0,
        batch_size=4,
        num_workers=0,
        model_name="clipscale-tiny",
        decode=decode,
        hard_negatives=["relation_swap"],
        max_hard_negatives=2,
    )
    data.setup("fit")
    [batch] = list(data.train_dataloader())
    assert batch["keys"] == [f"{row:09d}" for row in range(4)]
    kept = [f[:2] + [""] * (2 - len(f[:2])) for f in foils]
    expected = build_tokenizer("clipscale-tiny")([c for row in kept for c in row])
    assert torch.equal(batch["foil_texts"], expected.view(4, 2, -1))
    assert batch["foil_mask"].tolist() == [
        [True, False],
        [False, False],
        [True, True],
        [True, False],
    ]


def _tar(path: Path, members: list[tuple[str, bytes | None]], mode: str = "w") -> str:
    """A tar of (name, data) members; data None makes a directory entry."""
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _untidy_members(prefix: str, samples: int) -> list[tuple[str, bytes | None]]:
    """Samples of 1-3 members (nested keys too), a directory and a name without extension."""
    members = [(f"{prefix}dir", None), (f"{prefix}README", b"no extension: no sample")]
    for index in range(samples):
        key = f"{prefix}sub/{index}" if index % 2 else f"{prefix}{index}"
        members += [(f"{key}.jpg", b"j"), (f"{key}.txt", b"t"), (f"{key}.json", b"{}")][
            : 1 + index % 3
        ]
    return members


def test_samples_are_counted_from_tar_headers_as_readers_group_them(tmp_path):
    plain = _tar(tmp_path / "plain.tar", _untidy_members("a", 7))
    packed = _tar(tmp_path / "packed.tar.gz", _untidy_members("b", 5), mode="w:gz")
    for path in (plain, packed):
        # reference: webdataset's own grouping of members into samples (no clipscale code)
        samples = list(wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples()))
        assert count_samples(path) == len(samples) == (7 if path == plain else 5)
    with tarfile.open(plain) as tar:  # cut inside the last sample's first member
        cut_at = tar.getmember("asub/5.jpg").offset_data
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(Path(plain).read_bytes()[: cut_at + 1])
    assert count_samples(str(truncated)) == 6  # the reader yields 5 and counts truncated_shard
    assert count_samples(str(tmp_path / "missing.tar")) == 0


def test_one_pass_counts_shards_missing_from_sizes_json(tmp_path, caplog):
    from clipscale.data.webdataset import WebDataModule
    from tests.test_data_webdataset import TINY, good_members, write_tar

    # listed.tar is in sizes.json; the user wrote late.tar after it; other/ has no sizes.json
    (tmp_path / "other").mkdir()
    write_tar(tmp_path / "listed.tar", good_members("a", 5))
    write_tar(tmp_path / "late.tar", good_members("b", 4))
    write_tar(tmp_path / "other" / "alone.tar", good_members("c", 3))
    (tmp_path / "sizes.json").write_text('{"listed.tar": 5}')
    shards = [str(tmp_path / "listed.tar"), str(tmp_path / "late.tar")]
    shards.append(str(tmp_path / "other" / "alone.tar"))
    data = WebDataModule(
        train_shards=shards, resampled=False, batch_size=3, num_workers=0, model_name=TINY
    )
    with caplog.at_level("INFO", logger="clipscale.data.sources"):
        data.setup("fit")
    assert "2 of 3 shards are not listed in a sizes.json" in caplog.text
    keys = [key for batch in data.train_dataloader() for key in batch["keys"]]
    # 12 samples, one pass: 4 full batches, every sample exactly once
    expected = [f"{p}{i}" for p, n in (("a", 5), ("b", 4), ("c", 3)) for i in range(n)]
    assert sorted(keys) == sorted(expected)


def test_uncountable_pipe_shards_are_refused_in_one_line_before_the_run(tmp_path):
    from tests.conftest import run_cli

    run = tmp_path / "run"
    result = run_cli(
        "data=webdataset",
        "data.train_shards='pipe:cat /data/{0..3}.tar'",
        "data.resampled=false",
        f"paths.output_dir={run}",
    )
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1, lines
    assert lines[-1].startswith("error: data.train_shards: 'pipe:cat /data/0.tar'"), lines
    assert "data.resampled=true data.samples_per_epoch=N" in lines[-1]
    assert "Traceback" not in result.stderr and not run.exists()


def test_the_fix_the_pipe_refusal_names_trains_on_pipe_shards(tmp_path):
    from clipscale.data.webdataset import WebDataModule
    from tests.test_data_webdataset import TINY, good_members, write_tar

    for index in range(2):
        write_tar(tmp_path / f"{index}.tar", good_members(f"p{index}k", 4))
    pattern = f"pipe:cat {tmp_path}/{{0,1}}.tar"
    options = {"batch_size": 3, "num_workers": 0, "model_name": TINY}
    for resampled in (False, True):  # neither pass can count pipe: shards without N
        with pytest.raises(ValueError, match=r"set data.resampled=true data.samples_per_epoch=N"):
            WebDataModule(train_shards=pattern, resampled=resampled, **options).setup("fit")
    data = WebDataModule(train_shards=pattern, resampled=True, samples_per_epoch=12, **options)
    data.setup("fit")
    keys = [key for batch in data.train_dataloader() for key in batch["keys"]]
    assert len(keys) == 12 and {key[:2] for key in keys} <= {"p0", "p1"}
