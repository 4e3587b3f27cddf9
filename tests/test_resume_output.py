"""What a run and its resumes print and write is quiet and true: none of the messages that do not
apply to clipscale runs, one CSV history (each step once), a `wandb sync` that covers every
offline segment, the final validation and loss of a run resumed from its max_steps checkpoint (as
after a kill during the final validation), and the loader's skips by kind in summary.json."""

from __future__ import annotations

import csv
import glob
import json
import re
import shutil
from pathlib import Path

import pytest

from clipscale.preemption import RunCSVLogger
from clipscale.train import logger_lines
from tests.conftest import run_cli
from tests.test_data_webdataset import good_members, jpeg_bytes, write_clean_shards, write_tar

NOISE = (
    "You have overridden `transfer_batch_to_device`",
    "anonymous setting",
    "ModelCheckpoint with manual optimization",
    "exists and is not empty",
    "dataloader is not resumable",
    "worker processes in total",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """4 steps: one epoch of 4 one-pass shards read by 4 workers (one image corrupt); checkpoints
    and validation every 2 steps, CSV and offline wandb. Then a continue from step 2 (as after a
    hard kill) and one from step 4 (as after a kill during the final validation)."""
    folder = tmp_path_factory.mktemp("resume_output")
    write_clean_shards(folder / "shards", shards=4, per_shard=2)  # 4 steps: the whole epoch
    members = good_members("s0k", 2)
    members[0] = ("s0k0.jpg", jpeg_bytes(0)[:50])  # truncated: skipped as corrupt_image
    write_tar(folder / "shards" / "0000.tar", members)
    run = folder / "run"
    first = run_cli(
        "trainer.max_steps=4",
        "data=webdataset",
        f"data.train_shards='{folder}/shards/{{0000..0003}}.tar'",
        f"data.val_shards='{folder}/shards/0001.tar'",
        "data.resampled=false",
        "data.batch_size=2",
        "data.num_workers=4",
        "logger=[csv,wandb]",
        "eval.every_n_steps=2",
        "eval.demo_zeroshot=false",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        f"paths.output_dir={run}",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    uninterrupted = {"csv": (run / "csv" / "metrics.csv").read_text(), "summary": summary(run)}
    shutil.copy(run / "checkpoints" / "step000004.ckpt", folder / "step000004.ckpt")
    continued = run_cli(f"ckpt_path={run / 'checkpoints' / 'step000002.ckpt'}")
    assert continued.returncode == 0, continued.stderr[-3000:]
    shutil.copy(folder / "step000004.ckpt", run / "checkpoints" / "finished.ckpt")
    finished = run_cli(f"ckpt_path={run / 'checkpoints' / 'finished.ckpt'}")
    assert finished.returncode == 0, finished.stderr[-3000:]
    return {"run": run, "uninterrupted": uninterrupted, "outputs": [first, continued, finished]}


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def rows(text: str) -> list[dict]:
    return [{k: v for k, v in row.items() if v} for row in csv.DictReader(text.splitlines())]


def test_runs_and_resumes_print_none_of_the_known_noise(runs):
    for result in runs["outputs"]:
        output = result.stdout + result.stderr
        assert [message for message in NOISE if message in output] == []


def test_csv_history_is_one_file_with_each_step_once_as_uninterrupted(runs):
    run = runs["run"]
    assert [p.relative_to(run) for p in run.glob("csv/**/metrics.csv")] == [Path("csv/metrics.csv")]
    history = rows((run / "csv" / "metrics.csv").read_text())
    pairs = [(row["step"], key) for row in history for key in row if key not in ("step", "epoch")]
    assert len(pairs) == len(set(pairs))  # no metric written twice for a step
    reference = rows(runs["uninterrupted"]["csv"])  # the first run, before any resume
    losses = lambda table: {r["step"]: r["train/loss"] for r in table if "train/loss" in r}  # noqa: E731
    assert losses(history) == losses(reference) and len(losses(reference)) == 4
    validated = lambda table: sorted(r["step"] for r in table if "val/contrastive_loss" in r)  # noqa: E731
    assert validated(history) == validated(reference) == ["2", "4"]


def test_wandb_sync_hint_covers_every_offline_segment(runs):
    segments = sorted(glob.glob(str(runs["run"] / "wandb" / "offline-run-*")))
    assert len(segments) == 3
    (pattern,) = re.findall(r"wandb sync (\S+)", runs["outputs"][-1].stdout)
    assert sorted(glob.glob(pattern)) == segments


def test_resume_from_the_max_steps_checkpoint_validates_and_reports_its_loss(runs):
    finished = runs["outputs"][-1]
    assert "validation at step 4" in finished.stdout + finished.stderr
    reference = runs["uninterrupted"]["summary"]
    assert summary(runs["run"])["loss"] == reference["loss"]
    assert summary(runs["run"])["temperature"] == reference["temperature"]


def test_summary_counts_the_skipped_samples_by_kind(runs):
    skipped = runs["uninterrupted"]["summary"]["skipped_samples_by_kind"]
    assert {kind: n for kind, n in skipped.items() if n} == {"corrupt_image": 1}


def test_summary_logs_line_is_absolute_like_the_others(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (line,) = logger_lines(RunCSVLogger("runs/relative"))  # as ${paths.output_dir} gives it
    assert line.split()[1] == str(tmp_path / "runs" / "relative" / "csv")
