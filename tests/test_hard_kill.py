"""Hard-kill resume: SIGKILL every process of a 2-rank webdataset run after a periodic checkpoint,
restart with ckpt_path=<that checkpoint>, and end bit-identical (fp32) to an uninterrupted run.

Nothing warns the run (no signal handler can act on SIGKILL), so this is what a node OOM kill or
`kill -9` leaves: the periodic checkpoints (written atomically) with each rank's stream position
and RNG states. All four combinations are `slow` (four 2-rank runs each, about a minute on 2 cores;
CI runs them, `make test-slow`): one-pass epochs without loader workers (crossing an epoch boundary
after the resume), and resampled shards and the per-worker stream positions.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, run_cli
from tests.test_data_webdataset import write_clean_shards

MAX_STEPS, EVERY = 14, 5  # 4 shards x 10 samples / (2 ranks x 2) = 10 steps per one-pass epoch


def overrides(shards: Path, output_dir: Path, resampled: bool, workers: int) -> list[str]:
    return [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"trainer.max_steps={MAX_STEPS}",
        "data=webdataset",
        f"data.train_shards='{shards}/{{0000..0003}}.tar'",
        f"data.resampled={str(resampled).lower()}",
        f"data.samples_per_epoch={40 if resampled else 'null'}",
        "data.shuffle_buffer=5",
        "data.batch_size=2",
        f"data.num_workers={workers}",
        "logger=none",
        "eval.every_n_steps=null",
        "eval.demo_zeroshot=false",
        "trainer.enable_progress_bar=false",
        f"callbacks.model_checkpoint.every_n_train_steps={EVERY}",
        f"paths.output_dir={output_dir}",
    ]


def parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert payload["global_step"] == MAX_STEPS
    return payload["state_dict"]


def kill_after_a_checkpoint(arguments: list[str], checkpoints: Path, seed: int) -> Path:
    """Start the run in its own process group; once a periodic checkpoint exists, wait a random
    moment and SIGKILL the group (both ranks and their loader workers). Returns that checkpoint."""
    run = subprocess.Popen(
        [sys.executable, "-m", "clipscale.train", *arguments],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "WANDB_SILENT": "true"},
        start_new_session=True,  # the group holds every process the run starts
    )
    first = checkpoints / f"step{EVERY:06d}.ckpt"
    try:
        deadline = time.monotonic() + 300
        while not first.exists():  # atomic: a file under this name is complete
            assert run.poll() is None, run.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no periodic checkpoint"
            time.sleep(0.05)
        time.sleep(random.Random(seed).uniform(0.0, 1.0))  # a few steps later, not on a boundary
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == -signal.SIGKILL
    saved = sorted(checkpoints.glob("step*.ckpt"))
    assert f"step{MAX_STEPS:06d}.ckpt" not in [p.name for p in saved], "killed too late"
    return saved[-1]


def hard_kill_resume_matches_uninterrupted(tmp_path: Path, resampled: bool, workers: int):
    shards = tmp_path / "shards"
    write_clean_shards(shards, shards=4, per_shard=10)
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"

    reference = run_cli(*overrides(shards, reference_dir, resampled, workers), timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    arguments = overrides(shards, killed_dir, resampled, workers)
    checkpoint = kill_after_a_checkpoint(arguments, killed_dir / "checkpoints", seed=workers)
    assert not (killed_dir / "summary.json").exists()
    resumed = run_cli(*arguments, f"ckpt_path={checkpoint}", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = parameters(reference_dir / "checkpoints" / "last.ckpt")
    got = parameters(killed_dir / "checkpoints" / "last.ckpt")
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name  # bitwise, fp32
    # The control: the resumed run did start from the checkpoint, not from scratch.
    start = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert 0 < start["global_step"] < MAX_STEPS

    # A checkpoint after an epoch's last batch (step 10 of 10 per one-pass epoch) resumes into the
    # next epoch: Lightning's own epoch counter comes back one too far there (see
    # StreamPosition.data_epoch), which once skipped a whole epoch of samples.
    forked_dir = tmp_path / "forked"
    at_epoch_end = reference_dir / "checkpoints" / f"step{2 * EVERY:06d}.ckpt"
    forked = run_cli(
        *overrides(shards, forked_dir, resampled, workers), f"ckpt_path={at_epoch_end}", timeout=300
    )
    assert forked.returncode == 0, forked.stderr[-3000:]
    got = parameters(forked_dir / "checkpoints" / "last.ckpt")
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.slow  # four 2-rank runs, about a minute on 2 cores; CI runs it: make test-slow
def test_hard_kill_one_pass_no_workers_resumes_bit_identical(tmp_path):
    hard_kill_resume_matches_uninterrupted(tmp_path, resampled=False, workers=0)


@pytest.mark.slow
@pytest.mark.parametrize(("resampled", "workers"), [(False, 2), (True, 0), (True, 2)], ids=str)
def test_hard_kill_resumes_bit_identical(tmp_path, resampled, workers):
    hard_kill_resume_matches_uninterrupted(tmp_path, resampled, workers)
