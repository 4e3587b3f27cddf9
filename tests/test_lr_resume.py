"""Resuming with a longer schedule (trainer.max_steps raised): the learning rate has no jump at the
resume step, then decays from the rate reached there to the minimum over the new remaining steps."""

from __future__ import annotations

import csv
import logging
import math

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from tests.test_module_step import RandomPairs, make_module

BASE_LR, WARMUP, FIRST_TOTAL, RESUME_STEP, LONGER_TOTAL = 0.1, 2, 6, 3, 10


def logged_rates(folder, ckpt_path=None, max_steps=FIRST_TOTAL, callbacks=()) -> dict[int, float]:
    """train/lr by step from the CSV logger of a clipscale-tiny run (SGD, batch 4)."""
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=CSVLogger(folder, name="", version=""),
        log_every_n_steps=1,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(RandomPairs(length=4 * LONGER_TOTAL), batch_size=4)
    module = make_module(lr=BASE_LR, warmup=WARMUP)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=True)
    with open(folder / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/lr")]
    return {int(row["step"]): float(row["train/lr"]) for row in rows}


def test_learning_rate_is_continuous_when_a_resume_lengthens_the_schedule(tmp_path, caplog):
    save_at_resume_step = ModelCheckpoint(
        tmp_path / "checkpoints", every_n_train_steps=RESUME_STEP, save_top_k=-1
    )
    first = logged_rates(tmp_path / "first", callbacks=[save_at_resume_step])
    checkpoint = tmp_path / "checkpoints" / f"epoch=0-step={RESUME_STEP}.ckpt"
    with caplog.at_level(logging.INFO):
        resumed = logged_rates(tmp_path / "resumed", checkpoint, max_steps=LONGER_TOTAL)

    assert sorted(resumed) == list(range(RESUME_STEP, LONGER_TOTAL))
    # The rate at the resume step is the one the interrupted schedule would have used there ...
    assert resumed[RESUME_STEP] == pytest.approx(first[RESUME_STEP], rel=1e-6)
    # ... and from there it decays by a half cosine to 0 at the new last step.
    remaining = LONGER_TOTAL - RESUME_STEP
    for step in range(RESUME_STEP, LONGER_TOTAL):
        progress = (step - RESUME_STEP) / remaining
        expected = first[RESUME_STEP] * 0.5 * (1 + math.cos(math.pi * progress))
        assert resumed[step] == pytest.approx(expected, rel=1e-6), step
    assert f"schedule continued at step {RESUME_STEP}" in caplog.text
