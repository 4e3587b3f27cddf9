"""Reading shards: exact splitting, seeded resampling, weighted sources, and counted bad data."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipscale.data.webdataset import SKIP_KINDS, EpochLoader, ShardStream, WebDataModule
from clipscale.models import build_tokenizer
from tests.distributed_utils import run_distributed

REPO = Path(__file__).resolve().parent.parent
TINY = "clipscale-tiny"  # 32 px images, context 32: cheap transforms and tokenizer


def jpeg_bytes(seed: int, size: int = 8) -> bytes:
    """A small random JPEG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of (name, data) members, written with tarfile (independent of clipscale's writer)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def good_members(prefix: str, count: int) -> list[tuple[str, bytes]]:
    """`count` well-formed samples KEY.jpg + KEY.txt with keys prefix0, prefix1, ..."""
    members = []
    for index in range(count):
        members += [
            (f"{prefix}{index}.jpg", jpeg_bytes(hash((prefix, index)) % 1000)),
            (f"{prefix}{index}.txt", f"{prefix} {index}".encode()),
        ]
    return members


def write_clean_shards(folder: Path, shards: int, per_shard: int, prefix: str = "s") -> list[str]:
    """`shards` well-formed shards of `per_shard` samples plus sizes.json; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{s:04d}.tar") for s in range(shards)]
    for s, path in enumerate(paths):
        write_tar(Path(path), good_members(f"{prefix}{s}k", per_shard))
    (folder / "sizes.json").write_text(json.dumps({Path(p).name: per_shard for p in paths}))
    return paths


def to_uint8(image: Image.Image) -> torch.Tensor:
    """The identity transform, as a tensor: the reader's output must be the decoded pixels."""
    return torch.from_numpy(np.asarray(image).copy())


def stream(urls, **options) -> ShardStream:
    """A ShardStream returning raw pixels and raw captions (identity 'tokenizer')."""
    defaults = {"transform": to_uint8, "tokenizer": list, "batch_size": 1, "training": False}
    return ShardStream(urls, **{**defaults, **options})


def read_all(
    dataset: ShardStream, num_workers: int, passes: int = 1
) -> tuple[list[list[str]], Counter]:
    """Keys seen in each pass over an EpochLoader, and the summed skip counts."""
    loader = EpochLoader(dataset, None, num_workers=num_workers, persistent_workers=num_workers > 0)
    keys_per_pass, skipped = [], Counter()
    for _ in range(passes):
        keys = []
        for batch in loader:
            keys += batch["keys"]
            assert set(batch["skipped"]) == set(SKIP_KINDS)
            skipped.update({kind: int(count) for kind, count in batch["skipped"].items()})
        keys_per_pass.append(keys)
    return keys_per_pass, +skipped


def test_evaluation_split_sees_every_sample_once_over_2_ranks_x_2_workers(tmp_path):
    urls = write_clean_shards(tmp_path, shards=6, per_shard=3)
    seen = []
    for rank in range(2):
        [keys], _ = read_all(
            stream(urls, rank=rank, world_size=2, num_workers=2, batch_size=2), num_workers=2
        )
        assert keys, f"rank {rank} got no sample"
        seen += keys
    assert sorted(seen) == sorted(f"s{s}k{i}" for s in range(6) for i in range(3))


def _read_val_split(rank: int, world_size: int, pattern: str, result_folder: str) -> None:
    data = WebDataModule(val_shards=pattern, batch_size=2, num_workers=2, model_name=TINY)
    data.setup("validate")  # no trainer: the rank comes from the gloo process group
    keys = [key for batch in data.val_dataloader() for key in batch["keys"]]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, keys)
    if rank == 0:
        Path(result_folder, "keys.json").write_text(json.dumps(gathered))


@pytest.mark.slow  # two spawned processes import torch, Lightning and open_clip: ~30 s or more here
def test_datamodule_splits_validation_by_the_process_group_rank(tmp_path):
    write_clean_shards(tmp_path / "val", shards=4, per_shard=3)
    run_distributed(_read_val_split, 2, str(tmp_path / "val" / "{0000..0003}.tar"), str(tmp_path))
    per_rank = json.loads((tmp_path / "keys.json").read_text())
    assert all(per_rank)
    assert sorted(sum(per_rank, [])) == sorted(f"s{s}k{i}" for s in range(4) for i in range(3))


def test_resampling_is_deterministic_per_seed_and_epoch(tmp_path):
    urls = write_clean_shards(tmp_path, shards=5, per_shard=4)
    options = {
        "training": True,
        "resampled": True,
        "samples_per_epoch": 24,
        "shuffle_buffer": 6,
        "batch_size": 3,
    }
    # Persistent workers hold their copy of the dataset: the epoch must still reach them.
    persistent, _ = read_all(
        stream(urls, seed=1, num_workers=2, **options), num_workers=2, passes=2
    )
    fresh, _ = read_all(stream(urls, seed=1, num_workers=0, **options), num_workers=0, passes=2)
    other_seed, _ = read_all(stream(urls, seed=2, num_workers=0, **options), num_workers=0)
    assert len(persistent[0]) == 24
    assert persistent[0] != persistent[1]  # epochs differ
    assert fresh[0] != fresh[1] and fresh[0] != other_seed[0]
    # Worker 0 of two reads what a lone worker reads (same seed, epoch, rank and worker id); the
    # loader takes 3-sample batches from the workers in turn.
    for epoch in range(2):
        worker_0 = [
            key for start in range(0, 24, 6) for key in persistent[epoch][start : start + 3]
        ]
        assert worker_0 == fresh[epoch][:12]
    again, _ = read_all(stream(urls, seed=1, num_workers=0, **options), num_workers=0, passes=2)
    assert again == fresh


def test_weighted_sources_supply_their_share_of_samples(tmp_path):
    write_clean_shards(tmp_path / "many", shards=4, per_shard=5)
    few = write_clean_shards(tmp_path / "few", shards=1, per_shard=5, prefix="f")
    data = WebDataModule(
        train_shards=[str(tmp_path / "many" / "{0000..0003}.tar"), few[0]],
        train_weights=[1, 3],
        samples_per_epoch=2000,
        batch_size=50,
        num_workers=0,
        model_name=TINY,
    )
    data.setup("fit")
    sources = Counter(key[0] for batch in data.train_dataloader() for key in batch["keys"])
    assert sum(sources.values()) == 2000
    # Unweighted, the one shard of "few" would supply 1/5; weighted 1:3 it supplies 3/4.
    assert abs(sources["f"] / 2000 - 0.75) < 0.06


def faulty_shards(folder: Path) -> tuple[list[str], list[str], dict[str, int]]:
    """A shard set with one of each fault; returns (urls, keys that must be read, skip counts)."""
    folder.mkdir(parents=True, exist_ok=True)
    mixed = good_members("mixed", 3) + [
        ("trunc.jpg", jpeg_bytes(7)[:60]),  # truncated JPEG
        ("trunc.txt", b"a cut image"),
        ("caponly.txt", b"no image here"),  # caption-only sample
        ("imgonly.jpg", jpeg_bytes(8)),  # image-only sample
        ("notimage.jpg", b"just some text pretending to be a jpeg"),
        ("notimage.txt", b"a lie"),
        ("latin.jpg", jpeg_bytes(9)),
        ("latin.txt", "caf\xe9".encode("latin-1")),  # caption that is not UTF-8
        ("README", b"a member without KEY.EXT form"),
    ]
    write_tar(folder / "mixed.tar", mixed)
    write_tar(folder / "whole.tar", good_members("whole", 4))
    # Cut inside the data of sample 2's image: samples 0 and 1 survive, sample 2 is lost.
    write_tar(folder / "full.tar", good_members("cut", 4))
    with tarfile.open(folder / "full.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    data = (folder / "full.tar").read_bytes()
    (folder / "cut.tar").write_bytes(data[: members["cut2.jpg"].offset_data + 100])
    # Cut exactly between members: tarfile ends quietly here; samples 0 and 1 survive (2 is lost).
    (folder / "cut_at_header.tar").write_bytes(data[: members["cut3.jpg"].offset])
    os.remove(folder / "full.tar")
    write_tar(folder / "empty.tar", [])
    (folder / "zero_bytes.tar").write_bytes(b"")
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    urls += [str(folder / "missing.tar"), "pipe:exit 3", f"pipe:cat {folder / 'whole.tar'}"]
    # whole.tar is read twice (as a file and through pipe:cat); both cut copies keep cut0, cut1.
    readable = [f"mixed{i}" for i in range(3)] + [f"whole{i}" for i in range(4)] * 2
    readable += ["cut0", "cut1"] * 2
    expected = {
        "corrupt_image": 2,
        "missing_image": 1,
        "missing_caption": 1,
        "corrupt_caption": 1,
        "unreadable_member": 1,
        "truncated_shard": 2,
        "empty_shard": 2,
        "unopenable_shard": 2,
    }
    return urls, readable, expected


def test_faulty_shards_are_skipped_and_counted_by_kind(tmp_path):
    urls, readable, expected = faulty_shards(tmp_path)
    # No sizes.json for these shards: an evaluation pass deals whole shards to the workers.
    dataset = stream(urls, num_workers=2, seed=3)
    [keys], skipped = read_all(dataset, num_workers=2)
    assert sorted(keys) == sorted(readable)
    assert dict(skipped) == expected


def test_missing_shards_and_bad_options_fail_at_start_naming_the_key(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"data.train_shards='.*nothing-\{0..3\}.tar' matches no shard"
    ):
        WebDataModule(train_shards=str(tmp_path / "nothing-{0..3}.tar"), model_name=TINY).setup(
            "fit"
        )
    with pytest.raises(ValueError, match=r"data.train_weights=\[1\] needs one weight per source"):
        WebDataModule(train_shards=["a.tar", "b.tar"], train_weights=[1], model_name=TINY)
    with pytest.raises(ValueError, match=r"data.batch_size=0: expected an integer >= 1"):
        WebDataModule(train_shards="a.tar", batch_size=0, model_name=TINY)
    with pytest.raises(ValueError, match=r"set data.resampled=true data.samples_per_epoch=N"):
        WebDataModule(train_shards="pipe:cat a.tar", resampled=False, model_name=TINY).setup("fit")


def test_epoch_length_comes_from_sizes_json(tmp_path):
    write_clean_shards(tmp_path, shards=3, per_shard=7)  # 21 samples
    data = WebDataModule(
        train_shards=str(tmp_path / "{0000..0002}.tar"),
        batch_size=4,
        num_workers=2,
        model_name=TINY,
    )
    data.setup("fit")
    # ceil(21 / 4) = 6 batches per rank, split as 3 per worker.
    assert len(data.train_dataloader()) == 6
    batch = next(iter(data.train_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["texts"].shape == (4, 32)


def test_cli_trains_on_shards_from_the_writer_and_logs_the_skips(tmp_path):
    if not (REPO / "clipscale" / "train.py").exists():
        pytest.skip("clipscale/train.py has not landed yet")
    images = tmp_path / "images"
    images.mkdir()
    for index in range(24):  # 3 shards of 8
        Image.open(io.BytesIO(jpeg_bytes(index, size=40))).save(images / f"{index:02d}.jpg")
        (images / f"{index:02d}.txt").write_text(f"picture number {index}")
    shards = tmp_path / "shards"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "clipscale.data.shards",
            "--images",
            str(images),
            "--output",
            str(shards),
            "--samples-per-shard",
            "8",
            "--workers",
            "1",
        ],
        cwd=REPO,
        check=True,
    )
    faulty_shards(tmp_path / "faulty")
    write_tar(
        shards / "faults.tar",
        [
            ("caponly.txt", b"x"),
            ("imgonly.jpg", jpeg_bytes(1)),
            ("bad.jpg", b"nope"),
            ("bad.txt", b"y"),
        ],
    )
    (shards / "cut.tar").write_bytes((tmp_path / "faulty" / "cut.tar").read_bytes())
    # A one-pass epoch plans by sizes.json: 3 x 8 + 3 + 5 (cut.tar as written) = 32 = 4 batches,
    # so the 4 steps read every shard to its end.
    sizes = json.loads((shards / "sizes.json").read_text())
    (shards / "sizes.json").write_text(json.dumps({**sizes, "faults.tar": 3, "cut.tar": 5}))
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "clipscale.train", "data=webdataset", "logger=csv",
        f"data.train_shards='{shards}/*.tar'", "data.resampled=false",
        "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=4", f"paths.output_dir={run}",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, timeout=300)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    with open(next(run.glob("csv/**/metrics.csv"))) as file:
        logged = [
            float(row["train/skipped_samples"])
            for row in csv.DictReader(file)
            if row.get("train/skipped_samples")
        ]
    # faults.tar: caption-only, image-only, corrupt image; cut.tar: one truncated shard.
    assert max(logged) == 4


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_foils_json_becomes_foil_texts_and_mask(tmp_path, decode):
    foils = {
        "many": json.dumps(["a blue one", "a green one", "a third one"]).encode(),  # 3 > F = 2
        "one": json.dumps(["a lone foil"]).encode(),
        "broken": b"[not json",  # malformed: skipped, counted
        "dict": json.dumps({"foils": ["x"]}).encode(),  # not a list: skipped, counted
    }
    members = []
    for key in ["many", "one", "none", "broken", "dict"]:
        members += [(f"{key}.jpg", jpeg_bytes(len(key), size=40)), (f"{key}.txt", key.encode())]
        if key in foils:
            members.append((f"{key}.foils.json", foils[key]))
    write_tar(tmp_path / "0000.tar", members)
    (tmp_path / "sizes.json").write_text('{"0000.tar": 5}')
    options = {
        "train_shards": str(tmp_path / "0000.tar"),
        "resampled": False,
        "shuffle_buffer": 0,
        "batch_size": 5,
        "num_workers": 0,
        "model_name": TINY,
        "decode": decode,
    }
    data = WebDataModule(**options, hard_negatives=["attribute_swap"], max_hard_negatives=2)
    data.setup("fit")
    [batch] = list(data.train_dataloader())
    data.on_before_batch_transfer(batch, 0)
    assert batch["keys"] == ["many", "one", "none"]
    tokenizer = build_tokenizer(TINY)
    expected = tokenizer(["a blue one", "a green one", "a lone foil", "", "", ""])
    assert batch["foil_texts"].shape == (3, 2, expected.shape[-1])
    assert torch.equal(batch["foil_texts"], expected.view(3, 2, -1))
    assert batch["foil_mask"].tolist() == [[True, True], [True, False], [False, False]]
    assert data.skipped_summary()["corrupt_foils"] == 2
    # Without data.hard_negatives the member is ignored: no foil fields, nothing skipped.
    plain = WebDataModule(**options)
    plain.setup("fit")
    [batch] = list(plain.train_dataloader())
    assert "foil_texts" not in batch and len(batch["keys"]) == 5
    with pytest.raises(ValueError, match="data.hard_negatives: unknown foil type 'colour'"):
        WebDataModule(**options, hard_negatives=["colour"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_bad_shard_is_named_once_per_kind_however_often_it_is_read(
    tmp_path, caplog, num_workers
):
    urls, _, _ = faulty_shards(tmp_path)
    mixed, cut = str(tmp_path / "mixed.tar"), str(tmp_path / "cut.tar")
    assert {mixed, cut} <= set(urls)
    dataset = stream(
        [mixed, cut], training=True, resampled=True, samples_per_epoch=60, batch_size=3,
        num_workers=num_workers, seed=4,
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="clipscale.data.reading"):
        _, skipped = read_all(dataset, num_workers=num_workers)
    named = Counter(  # the lines naming a kind and a shard
        (kind, shard)
        for record in caplog.records
        for kind in SKIP_KINDS
        for shard in (mixed, cut)
        if f"{kind} " in record.getMessage() and f"{shard} " in record.getMessage()
    )
    assert named == {
        ("corrupt_image", mixed): 1,
        ("missing_image", mixed): 1,
        ("missing_caption", mixed): 1,
        ("corrupt_caption", mixed): 1,
        ("unreadable_member", mixed): 1,
        ("truncated_shard", cut): 1,
    }
    # ... though each shard was drawn many times (20 batches of 3 need ~9 passes over them)
    assert skipped["truncated_shard"] >= 3 and skipped["corrupt_image"] >= 6, skipped
