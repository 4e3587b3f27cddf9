"""Run a function in P real gloo processes (no mocked torch.distributed)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.cli_process import warm_start


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, env: dict, fn, args) -> None:
    os.environ.clear()
    os.environ.update(env)  # the test's environment, as a spawned process inherits it
    torch.set_num_threads(1)  # 2 ranks × 2 threads on 2 cores would thrash
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    """Call fn(rank, world_size, *args) in `world_size` new processes joined by gloo: forks of the
    warm interpreter (tests/cli_process.py), or spawned where the test's environment holds a
    variable read at import time (e.g. TRITON_INTERPRET)."""
    env = dict(os.environ)
    mp.start_processes(
        _entry,
        args=(world_size, free_port(), env, fn, args),
        nprocs=world_size,
        join=True,
        start_method="forkserver" if warm_start(env) else "spawn",
    )
