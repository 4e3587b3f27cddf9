"""Exact resume of the webdataset training stream: a position taken after k batches continues
with the very batches (bitwise) an uninterrupted stream gives after k, for any worker count."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from clipscale.data.webdataset import WebDataModule
from tests.test_data_webdataset import TINY, good_members, jpeg_bytes, write_clean_shards, write_tar


def shard_folder(folder):
    """4 shards of 9 samples (sizes.json), one with a corrupt image, so raw and good counts differ."""
    write_clean_shards(folder, shards=4, per_shard=9)
    members = good_members("s1k", 9)
    members[6] = ("s1k3.jpg", jpeg_bytes(3)[:50])  # truncated: skipped at decode time
    write_tar(folder / "0001.tar", members)
    return str(folder / "{0000..0003}.tar")


def settings(pattern: str, resampled: bool, workers: int, resume: str = "exact") -> dict:
    """A small training stream: batches of 3, a shuffle buffer, the real tiny-model crops."""
    return {
        "train_shards": pattern,
        "resampled": resampled,
        "samples_per_epoch": 36 if resampled else None,
        "shuffle_buffer": 5,
        "batch_size": 3,
        "num_workers": workers,
        "model_name": TINY,
        "seed": 7,
        "resume": resume,
    }


def datamodule(pattern: str, resampled: bool, workers: int, resume: str = "exact"):
    data = WebDataModule(**settings(pattern, resampled, workers, resume))
    data.setup("fit")
    return data


def take(data: WebDataModule, loader_iter, count: int | None) -> list[dict]:
    """Up to `count` batches as the trainer takes them (through the data module's hooks)."""
    batches = []
    for batch in loader_iter:
        batch = data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0)
        batches.append({"images": batch["images"].clone(), "keys": list(batch["keys"])})
        if count is not None and len(batches) == count:
            break
    return batches


def epochs(data: WebDataModule, first_batches: int | None = None) -> list[list[dict]]:
    """Two passes (epochs 0 and 1); the first stops after `first_batches` when given."""
    loader = data.train_dataloader()
    first = take(data, iter(loader), first_batches)
    if first_batches is not None:
        return [first]
    return [first, take(data, iter(loader), None)]


def assert_same(got: list[dict], expected: list[dict]) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in expected]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["images"], b["images"])  # bitwise: same crops, same pixels


@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_with_the_uninterrupted_batches(tmp_path, resampled, workers):
    pattern = shard_folder(tmp_path)
    full = epochs(datamodule(pattern, resampled, workers))
    assert len(full[0]) == len(datamodule(pattern, resampled, workers).train_dataloader())
    assert [b["keys"] for b in full[0]] != [b["keys"] for b in full[1]]  # a new epoch's order
    stopped_at = 5  # odd: the resumed pass must start on worker 1 of 2
    interrupted = datamodule(pattern, resampled, workers)
    assert_same(epochs(interrupted, stopped_at)[0], full[0][:stopped_at])
    state = interrupted.state_dict()
    resumed = WebDataModule(**settings(pattern, resampled, workers))
    resumed.load_state_dict(state)  # Lightning restores the data module before setup
    resumed.setup("fit")
    after = epochs(resumed)
    assert_same(after[0], full[0][stopped_at:])
    assert_same(after[1], full[1])  # and the next epoch is the uninterrupted one's


def test_approximate_resume_redraws_the_rest_of_the_epoch_with_the_same_length(tmp_path):
    pattern = shard_folder(tmp_path)
    full = epochs(datamodule(pattern, resampled=True, workers=0))
    interrupted = datamodule(pattern, resampled=True, workers=0, resume="approximate")
    epochs(interrupted, 5)
    resumed = WebDataModule(**settings(pattern, True, 0, resume="approximate"))
    resumed.load_state_dict(interrupted.state_dict())
    resumed.setup("fit")
    after = epochs(resumed)
    assert len(after[0]) == len(full[0]) - 5  # the epoch keeps its length...
    assert [b["keys"] for b in after[0]] != [b["keys"] for b in full[0][5:]]  # ...not its samples
    assert_same(after[1], full[1])  # the next epoch is unaffected


def test_a_different_loader_layout_falls_back_to_approximate(tmp_path, caplog):
    pattern = shard_folder(tmp_path)
    interrupted = datamodule(pattern, resampled=False, workers=2)
    epochs(interrupted, 4)
    resumed = WebDataModule(**settings(pattern, False, 0))
    resumed.load_state_dict(interrupted.state_dict())
    resumed.setup("fit")
    after = epochs(resumed)
    assert "cannot resume exactly" in caplog.text
    assert len(after[0]) == len(resumed.train_dataloader()) - 4


class KeyRecorder(L.LightningModule):
    """Records the keys and pixel sums of the batches its steps receive; trains nothing useful."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[list[str], float]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((batch["keys"], float(batch["images"].double().sum())))
        return self.weight.sum() * 0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(pattern: str, folder, ckpt_path=None) -> list:
    """18 steps (past the 12-batch epoch) with a checkpoint every 7 steps; the batches seen."""
    module = KeyRecorder()
    trainer = L.Trainer(
        max_steps=18,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(folder),
        callbacks=[ModelCheckpoint(dirpath=str(folder), every_n_train_steps=7, save_top_k=-1)],
    )
    trainer.fit(
        module, datamodule=WebDataModule(**settings(pattern, False, 2)), ckpt_path=ckpt_path
    )
    return module.seen


def test_lightning_checkpoint_at_step_s_resumes_at_batch_s_plus_1(tmp_path):
    pattern = shard_folder(tmp_path / "shards")
    full = fit(pattern, tmp_path / "full")
    resumed = fit(pattern, tmp_path / "resumed", str(tmp_path / "full" / "epoch=0-step=7.ckpt"))
    assert resumed == full[7:]  # the trainer prefetches ahead; the checkpoint does not count that
