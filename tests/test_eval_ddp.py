"""The validation callback on 2 real gloo processes reports exactly the single-process numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from clipscale.data.probe import write_probe
from clipscale.data.synthetic import SyntheticDataModule
from clipscale.eval.callback import ValidationCallback
from clipscale.models import build_model
from tests.distributed_utils import run_distributed
from tests.eval_fixtures import write_classification_dataset, write_retrieval_dataset

MODEL = "clipscale-tiny"


def _validation_metrics(rank: int, world_size: int, roots: dict, out_dir: Path) -> None:
    if world_size > 1:
        torch.set_num_threads(1)  # two processes share this machine's cores
    torch.manual_seed(0)
    model = build_model(MODEL)  # the same weights on every rank
    shards = f"{roots['val']}/test/{{0..{roots['val_shards'] - 1}}}.tar"
    on_datasets = ValidationCallback(
        every_n_steps=1,
        zeroshot=[roots["cls"]],
        retrieval=[roots["ret"]],
        compositional=[roots["probe"]],
        val_shards=shards,
        batch_size=8,
        loss_block_size=16,
    )
    on_datamodule = ValidationCallback(every_n_steps=1, batch_size=8, loss_block_size=16)
    datamodule = SyntheticDataModule(MODEL, batch_size=8, num_workers=0, val_samples=23)
    metrics = on_datasets.compute(model, MODEL)
    metrics.update(
        {f"{k} (datamodule)": v for k, v in on_datamodule.compute(model, MODEL, datamodule).items()}
    )
    torch.save(metrics, out_dir / f"rank{rank}_of{world_size}.pt")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp_eval")
    # odd sizes and several shards: the two ranks get uneven shares
    write_classification_dataset(root / "shapes", 31, per_shard=12)
    write_retrieval_dataset(root / "captions", 21, captions_per_image=3, per_shard=8)
    write_retrieval_dataset(root / "val", 19, captions_per_image=1, seed=7, per_shard=7)
    write_probe(root / "probe", per_type=7)  # 21 samples: uneven shares of every type
    return {
        "cls": str(root / "shapes"),
        "ret": str(root / "captions"),
        "val": str(root / "val"),
        "val_shards": 3,
        "probe": str(root / "probe"),
    }


def test_validation_callback_two_processes_equal_one(datasets, tmp_path):
    _validation_metrics(0, 1, datasets, tmp_path)
    run_distributed(_validation_metrics, 2, datasets, tmp_path)
    single = torch.load(tmp_path / "rank0_of1.pt")
    ranks = [torch.load(tmp_path / f"rank{r}_of2.pt") for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank holds the reduced numbers
    expected_keys = {
        "val/zeroshot/shapes/top1",
        "val/compositional/probe/relation_swap",
        "val/compositional/probe/overall",
        "val/retrieval/captions/image_to_text_R@5",
        "val/contrastive_loss",
        "val/modality_gap",
        "val/zeroshot_top1 (datamodule)",
        "val/text_to_image_median_rank (datamodule)",
    }
    assert expected_keys <= set(single)
    assert set(single) == set(ranks[0])
    for key, value in single.items():
        # features come from different batch groupings: equal up to float32 rounding
        assert ranks[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
