"""One-pass epochs: every sample exactly once over ranks and workers, the true length, equal
step counts on every rank (also with unequal shards), and fewer shards than workers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from clipscale.data.webdataset import EpochLoader, WebDataModule
from tests.distributed_utils import run_distributed
from tests.test_data_webdataset import TINY, read_all, stream, write_clean_shards

ALL_KEYS = sorted(f"s{s}k{i}" for s in range(5) for i in range(20))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_one_pass_reads_every_sample_once_and_len_counts_the_batches(tmp_path, workers):
    urls = write_clean_shards(tmp_path, shards=5, per_shard=20)  # the 5 × 20 samples
    options = {"training": True, "shuffle_buffer": 7, "num_workers": workers, "seed": 2}
    dataset = stream(urls, batch_size=10, **options)
    loader = EpochLoader(dataset, None, num_workers=workers)
    for _ in range(2):  # two epochs: reshuffled, still complete
        batches = list(loader)
        assert len(batches) == len(loader) == 10
        assert sorted(k for b in batches for k in b["keys"]) == ALL_KEYS
    # 100 samples in batches of 8: 12 full batches; the 4 left over are the dropped remainder.
    dataset = stream(urls, batch_size=8, **options)
    batches = list(EpochLoader(dataset, None, num_workers=workers))
    keys = [k for b in batches for k in b["keys"]]
    assert len(batches) == len(dataset) == 12
    assert len(keys) == len(set(keys)) == 96
    assert dataset.plan(0).dropped == 4


@pytest.mark.parametrize("training", [True, False])
def test_two_ranks_split_one_pass_exactly_with_equal_lengths(tmp_path, training):
    urls = write_clean_shards(tmp_path, shards=5, per_shard=20)
    seen, lengths, received = [], [], []
    for rank in range(2):
        dataset = stream(
            urls, training=training, batch_size=6, rank=rank, world_size=2, num_workers=2
        )
        [keys], _ = read_all(dataset, num_workers=2)
        seen += keys
        lengths.append(len(dataset))
        received.append(-(-len(keys) // 6))
    assert len(seen) == len(set(seen))
    if training:  # 50 per rank in batches of 6: 8 batches each, 2 samples per rank left out
        assert lengths == received == [8, 8] and len(seen) == 96
    else:  # evaluation keeps the last partial batch: every sample once
        assert sorted(seen) == ALL_KEYS and lengths == received == [9, 9]


def test_one_validation_shard_with_the_default_4_workers(tmp_path, caplog):
    write_clean_shards(tmp_path / "val", shards=1, per_shard=8)
    data = WebDataModule(val_shards=str(tmp_path / "val" / "0000.tar"), model_name=TINY)
    assert data.num_workers == 4  # the README's example leaves the default
    with caplog.at_level(logging.INFO, logger="clipscale.data.webdataset"):
        data.setup("validate")
        loader = data.val_dataloader()
    assert loader.num_workers == 1
    assert sorted(k for b in loader for k in b["keys"]) == sorted(f"s0k{i}" for i in range(8))
    said = [r.message for r in caplog.records if "instead of data.num_workers=4" in r.message]
    assert len(said) == 1, caplog.text


def test_resampled_training_from_one_shard_with_several_workers(tmp_path):
    write_clean_shards(tmp_path, shards=1, per_shard=5)
    data = WebDataModule(
        train_shards=str(tmp_path / "0000.tar"),
        samples_per_epoch=12,
        batch_size=3,
        num_workers=2,
        model_name=TINY,
    )
    data.setup("fit")
    loader = data.train_dataloader()
    assert loader.num_workers == 2
    assert [len(b["keys"]) for b in loader] == [3] * len(loader) and len(loader) == 4


def _train_epochs(rank: int, world_size: int, pattern: str, result_folder: str) -> None:
    data = WebDataModule(
        train_shards=pattern, resampled=False, batch_size=8, num_workers=2, model_name=TINY
    )
    data.setup("fit")  # no trainer: the rank comes from the gloo process group
    loader = data.train_dataloader()
    steps, keys = [], []
    for _ in range(2):
        count = 0
        keys.append([])
        for batch in loader:
            batch = data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0)
            # The collective a training step makes: a rank that ran dry would leave this waiting.
            torch.distributed.all_reduce(torch.ones(len(batch["keys"])).sum())
            keys[-1] += batch["keys"]
            count += 1
        steps.append(count)
    result = {"steps": steps, "len": len(loader), "epoch_samples": data.position.epoch_samples}
    Path(result_folder, f"rank{rank}.json").write_text(json.dumps({**result, "keys": keys}))


@pytest.mark.timeout(240)
def test_unequal_shards_give_every_rank_the_same_steps(tmp_path):
    sizes = {"a.tar": 100, "b.tar": 40, "c.tar": 7}
    for prefix, (name, count) in zip("abc", sizes.items(), strict=True):
        write_clean_shards(tmp_path / prefix, shards=1, per_shard=count, prefix=prefix)
        (tmp_path / prefix / "0000.tar").rename(tmp_path / name)
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    run_distributed(_train_epochs, 2, str(tmp_path / "{a,b,c}.tar"), str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # 147 samples: 73 per rank at least, 9 batches of 8; 147 - 2 × 72 = 3 left out per epoch.
    for result in ranks:
        assert result["steps"] == [9, 9] and result["len"] == 9
        assert result["epoch_samples"] == {"0": 72, "1": 72}
    for epoch in range(2):
        keys = [k for result in ranks for k in result["keys"][epoch]]
        assert len(keys) == len(set(keys)) == 144  # each sample at most once, 3 left out


def test_too_few_samples_for_one_batch_per_rank_fail_at_setup(tmp_path):
    write_clean_shards(tmp_path, shards=1, per_shard=5)
    data = WebDataModule(
        train_shards=str(tmp_path / "0000.tar"), resampled=False, batch_size=8, model_name=TINY
    )
    with pytest.raises(ValueError, match=r"5 samples over 1 rank\(s\) give no full batch"):
        data.setup("fit")
