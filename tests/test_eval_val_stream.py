"""The validation callback sees every held-out sample of a rank-split webdataset stream once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipscale.data.shards import write_shards
from clipscale.data.webdataset import WebDataModule
from clipscale.eval.callback import _datamodule_share
from tests.distributed_utils import run_distributed

SAMPLES = 24


def _share_of_rank(rank: int, world_size: int, shards: str, out_dir: str) -> None:
    data = WebDataModule(
        val_shards=shards, batch_size=5, num_workers=0, model_name="clipscale-tiny"
    )
    data.setup("validate")
    indices = [i for i, _ in _datamodule_share(data.val_dataloader(), num_workers=0)]
    torch.save(torch.cat(indices), f"{out_dir}/rank{rank}.pt")


def test_each_validation_sample_is_seen_once_over_two_ranks(tmp_path: Path):
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    pairs = []
    for index in range(SAMPLES):
        path = tmp_path / "images" / f"{index:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        pairs.append((str(path), f"picture {index}"))
    write_shards(pairs, tmp_path / "val", 6, resize=None, workers=1)
    shards = str(tmp_path / "val" / "shard-{000000..000003}.tar")
    run_distributed(_share_of_rank, 2, shards, str(tmp_path))
    seen = torch.cat([torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)])
    assert len(seen) == SAMPLES and len(set(seen.tolist())) == SAMPLES
