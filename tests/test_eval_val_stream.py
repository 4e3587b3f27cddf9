"""Validation streams: every held-out sample seen once over ranks; unreadable ones skipped and
counted (val/skipped_samples), never fatal."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from clipscale.data.shards import write_shards
from clipscale.data.webdataset import WebDataModule
from clipscale.eval.callback import ValidationCallback, _datamodule_share
from clipscale.models import build_model
from tests.distributed_utils import run_distributed
from tests.test_data_device_decode import smooth_image
from tests.test_data_webdataset import TINY, jpeg_bytes, write_tar

SAMPLES = 24


def _share_of_rank(rank: int, world_size: int, shards: str, dirty: list, out_dir: str) -> None:
    data = WebDataModule(
        val_shards=shards, batch_size=5, num_workers=0, model_name="clipscale-tiny"
    )
    data.setup("validate")
    indices = [i for i, _ in _datamodule_share(data.val_dataloader(), num_workers=0)]
    torch.save(torch.cat(indices), f"{out_dir}/rank{rank}.pt")
    # the same two ranks validate on shards with unreadable samples (_val_sets)
    metrics = _validation_metrics(dirty, "worker", 0)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(metrics))


def test_two_ranks_see_each_sample_once_and_count_each_skip_once(tmp_path: Path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    pairs = []
    for index in range(SAMPLES):
        path = tmp_path / "images" / f"{index:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        pairs.append((str(path), f"picture {index}"))
    write_shards(pairs, tmp_path / "val", 6, resize=None, workers=1)
    shards = str(tmp_path / "val" / "shard-{000000..000003}.tar")
    dirty, clean = _val_sets(tmp_path / "faulty")
    run_distributed(_share_of_rank, 2, shards, dirty, str(tmp_path))
    seen = torch.cat([torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)])
    assert len(seen) == SAMPLES and len(set(seen.tolist())) == SAMPLES
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank logs the same numbers
    assert ranks[0].pop("val/skipped_samples") == 4  # the cut shard: once, not once per rank
    reference = _validation_metrics(clean, "worker", 0)
    reference.pop("val/skipped_samples")
    assert ranks[0] == pytest.approx(reference, rel=1e-5)


def _val_sets(folder: Path) -> tuple[list[str], list[str]]:
    """(dirty shards, clean shards): the same 7 readable samples, the dirty set with 4 faults.

    Dirty: a truncated JPEG body (header intact: only a decode finds it), text named .jpg, an
    image without a caption, interleaved with the good samples (so dataset positions differ
    between the sets), and a second shard cut inside its third sample.
    """
    folder.mkdir()
    good = [
        [(f"g{i}.jpg", jpeg_bytes(i, size=16)), (f"g{i}.txt", f"picture {i}".encode())]
        for i in range(8)
    ]
    faults = [
        [("cut.jpg", smooth_image(7, 200, 200)[:-400]), ("cut.txt", b"a cut image")],
        [("text.jpg", b"just some text pretending to be a jpeg"), ("text.txt", b"a lie")],
        [("nocap.jpg", jpeg_bytes(9, size=16))],
    ]
    dirty_first = [*good[0], *good[1], *faults[0], *good[2], *faults[1], *good[3]]
    dirty_first += [*faults[2], *good[4]]
    write_tar(folder / "dirty0.tar", dirty_first)
    write_tar(folder / "dirty1.tar", [*good[5], *good[6], *good[7]])
    with tarfile.open(folder / "dirty1.tar") as tar:
        cut_at = tar.getmember("g7.jpg").offset_data + 100  # inside g7's image: g7 is lost
    with open(folder / "dirty1.tar", "r+b") as file:
        file.truncate(cut_at)
    write_tar(folder / "clean0.tar", [m for sample in good[:5] for m in sample])
    write_tar(folder / "clean1.tar", [*good[5], *good[6]])
    return [str(folder / f"dirty{i}.tar") for i in range(2)], [
        str(folder / f"clean{i}.tar") for i in range(2)
    ]


def _validation_metrics(shards: list[str], mode: str, num_workers: int) -> dict[str, float]:
    """The validation callback's metrics of the tiny model (seed 0) on `shards`."""
    callback = ValidationCallback(every_n_steps=1, val_shards=shards, num_workers=num_workers)
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    datamodule = SimpleNamespace(decode_mode=lambda: mode, batch_size=4)
    return callback._compute(model, TINY, datamodule)


@pytest.mark.parametrize(("mode", "num_workers"), [("worker", 2), ("device", 0)])
def test_unreadable_validation_samples_are_skipped_and_counted(tmp_path, mode, num_workers):
    dirty, clean = _val_sets(tmp_path / "val")
    metrics = _validation_metrics(dirty, mode, num_workers)
    reference = _validation_metrics(clean, mode, num_workers)
    # corrupt_image 2 (one found only by decoding), missing_caption 1, truncated_shard 1
    assert metrics.pop("val/skipped_samples") == 4
    assert reference.pop("val/skipped_samples") == 0
    assert metrics == pytest.approx(reference, rel=1e-6)  # exactly the readable samples scored
