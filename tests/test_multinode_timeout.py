"""trainer.strategy.timeout bounds how long a rank waits in a collective for a rank that is gone.

When a node dies without closing its connections (power loss, a network partition), the ranks
left behind wait in their next all-gather. The DDP strategy's timeout (configs/trainer/ddp.yaml)
turns that wait into an error after `trainer.strategy.timeout.seconds`; the run then ends and
SLURM's requeue can act. Checked with real gloo processes: rank 1 never enters the collective.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import instantiate

from tests.distributed_utils import run_distributed

TIMEOUT_S = 2


def test_the_ddp_config_gives_lightning_its_timeout(compose_config):
    cfg = compose_config(["trainer=ddp", f"trainer.strategy.timeout.seconds={TIMEOUT_S}"])
    strategy = instantiate(cfg.trainer.strategy)
    assert strategy._timeout == timedelta(seconds=TIMEOUT_S)  # what it passes init_process_group


def _wait_for_a_missing_rank(rank: int, world_size: int, timeout: timedelta, folder: str) -> None:
    # A group with the configured timeout, as Lightning's init_process_group(timeout=...) makes.
    group = dist.new_group(timeout=timeout)
    if rank == 1:
        time.sleep(3 * timeout.total_seconds())  # gone: never joins the all-reduce
        return
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
        outcome = "returned"
    except RuntimeError as error:
        outcome = f"raised after {time.monotonic() - start:.1f} s: {error}"
    Path(folder, "rank0.txt").write_text(outcome)


def test_a_collective_missing_a_rank_fails_after_the_timeout(compose_config, tmp_path):
    cfg = compose_config(["trainer=ddp", f"trainer.strategy.timeout.seconds={TIMEOUT_S}"])
    timeout = instantiate(cfg.trainer.strategy.timeout)
    run_distributed(_wait_for_a_missing_rank, 2, timeout, str(tmp_path))
    outcome = (tmp_path / "rank0.txt").read_text()
    assert outcome.startswith("raised after"), outcome
    waited = float(outcome.split()[2])
    assert TIMEOUT_S - 0.5 <= waited <= 3 * TIMEOUT_S, outcome
