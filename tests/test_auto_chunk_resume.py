"""grad_cache.chunk_size=auto after a resume: the chunk the run chose is kept in its checkpoint and
reused, so the resumed run is bit-identical to the uninterrupted one."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from clipscale.module import CLIPModule
from tests.test_module_step import RandomPairs

BATCH = 8  # one batch per epoch: a resume after step 1 starts the next epoch, as the run does


class MeasuresLessAfterResume(CLIPModule):
    """Stands in for CUDA, where the measured peak includes the AdamW moments a resume has loaded:
    once the optimizer holds state, a measurement picks half the batch."""

    def _auto_chunk_size(self, images: torch.Tensor, texts: torch.Tensor) -> int:
        if self.trainer.optimizers[0].state:
            return images.shape[0] // 2
        return super()._auto_chunk_size(images, texts)


def train(steps: int, ckpt_path=None, save_to=None) -> MeasuresLessAfterResume:
    torch.manual_seed(0)
    module = MeasuresLessAfterResume(
        model={"name": "clipscale-tiny"},
        loss={"_target_": "clipscale.losses.ClipLoss"},
        optim={
            "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
            "warmup_steps": 1,
            "grad_clip_norm": None,
        },
        grad_cache={"chunk_size": "auto"},
    )
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    loader = DataLoader(RandomPairs(length=BATCH), batch_size=BATCH)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return module


def test_resume_reuses_the_auto_chunk_and_stays_bit_identical(tmp_path, caplog):
    uninterrupted = train(steps=2)
    first = train(steps=1, save_to=tmp_path / "step1.ckpt")
    assert first.chunk_size == BATCH  # on CPU the whole batch fits
    with caplog.at_level(logging.INFO):
        resumed = train(steps=2, ckpt_path=tmp_path / "step1.ckpt")
    assert resumed.chunk_size == BATCH  # not the smaller chunk a new measurement gives
    assert f"grad_cache.chunk_size=auto reuses the chunk of {BATCH}" in caplog.text
    for (name, expected), actual in zip(
        uninterrupted.named_parameters(), resumed.parameters(), strict=True
    ):
        assert torch.equal(actual, expected), name
