"""Atomic checkpoints: a real SIGKILL during a real save leaves the previous last.ckpt loadable.

A child process saves a 64 MB checkpoint over and over to the same last.ckpt; the parent waits until
a save is in flight (its bytes are being written), kills the child with SIGKILL, and loads what is
left. Lightning's plain TorchCheckpointIO is run the same way to show the test can fail: with its
temporary file on another filesystem (TMPDIR on tmpfs), its final move copies over last.ckpt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipscale.checkpoint_io import AtomicCheckpointIO, temp_path
from tests.conftest import REPO_ROOT

ELEMENTS = 8 * 2**20  # float32: 32 MB per checkpoint, a save takes long enough to be caught
SAVER = """
import itertools, sys, torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from clipscale.checkpoint_io import AtomicCheckpointIO
io = {"atomic": AtomicCheckpointIO, "plain": TorchCheckpointIO}[sys.argv[1]]()
for version in itertools.count():
    weights = torch.full((int(sys.argv[3]),), float(version))
    io.save_checkpoint({"version": version, "weights": weights}, sys.argv[2])
    print(version, flush=True)
"""


def start_saver(kind: str, path: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SAVER, kind, str(path), str(ELEMENTS)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def kill_during_a_save(kind: str, path: Path, env: dict | None = None) -> int:
    """Kill a saver while it writes a checkpoint after the first; return the full file size."""
    saver = start_saver(kind, path, env)
    try:
        assert saver.stdout.readline().strip() == "0"  # one complete checkpoint on disk
        full_size = path.stat().st_size
        partial = temp_path(path)
        deadline = time.monotonic() + 60
        while True:  # a save is in flight: its temp file (or, plain IO: last.ckpt) is part-written
            assert time.monotonic() < deadline, "never saw a save in progress"
            if partial.exists() and 0 < partial.stat().st_size < full_size:
                break
            if kind == "plain" and path.exists() and 0 < path.stat().st_size < full_size:
                break
        saver.send_signal(signal.SIGKILL)
        saver.wait(timeout=30)
    finally:
        if saver.poll() is None:
            saver.kill()
            saver.wait()
    assert saver.returncode == -signal.SIGKILL
    return full_size


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "last.ckpt"
    full_size = kill_during_a_save("atomic", path)
    assert 0 < temp_path(path).stat().st_size < full_size  # the kill did land mid-write
    checkpoint = torch.load(path, weights_only=True)
    assert torch.equal(checkpoint["weights"], torch.full((ELEMENTS,), float(checkpoint["version"])))
    # The next save (a restarted job) replaces both the old file and the leftover temp file.
    AtomicCheckpointIO().save_checkpoint({"version": -1}, path)
    assert torch.load(path, weights_only=True) == {"version": -1}
    assert not temp_path(path).exists()


def test_plain_lightning_io_can_leave_a_truncated_checkpoint(tmp_path):
    """The control: the same kill against TorchCheckpointIO whose temp file is on another
    filesystem (as with a node-local /tmp) leaves last.ckpt truncated, so the test above can fail."""
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp_path")
    path = tmp_path / "last.ckpt"
    kill_during_a_save("plain", path, env={"TMPDIR": "/dev/shm"})
    with pytest.raises(Exception):  # noqa: B017 - torch raises several types for a cut file
        torch.load(path, weights_only=True)
