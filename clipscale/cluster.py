"""The launch layout of a SLURM job, read from the variables SLURM sets in every allocation.

`python -m clipscale.cluster [OVERRIDES...]` is what scripts/slurm/*.sbatch run before `srun`: it
prints shell assignments (MASTER_ADDR, MASTER_PORT, RUN_DIR and an OVERRIDES array of the
script's own Hydra overrides) for the script to `eval`, or one `error: ` line and exit status 1 for a layout clipscale
cannot use. No torch import: it runs once per job, on the batch host, before anything else.

A job that SLURM starts again (requeued after a preemption, or after a node failure) finds its run
directory from before; it resumes from the newest checkpoint there: the one written at the
preemption signal, or the last periodic one when a node died without warning.

SLURM writes node lists compressed (`SLURM_JOB_NODELIST=gpu[01-03,07]`) and task counts as runs
(`SLURM_TASKS_PER_NODE=8(x4)`, or `2,1` when `--ntasks` does not split evenly over the nodes).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

# Rendezvous ports 20000-39999: above the usual services, below Linux's ephemeral range (32768+
# overlaps only its lower part, and a port derived from the job id rarely collides there).
FIRST_PORT, PORT_SPAN = 20000, 20000
SUBMIT = "sbatch --nodes=N --ntasks-per-node=GPUS scripts/slurm/multi_node.sbatch [overrides]"


class ClusterError(ValueError):
    """A job layout or launch setting clipscale cannot run with; the message names the fix."""


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: `a[1-2,5],b` -> ['a[1-2,5]', 'b']."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return [part for part in parts if part]


def expand_hostlist(hostlist: str) -> list[str]:
    """The host names of a SLURM host list, in order: `node[1-2],gpu[08-09]` -> node1 node2 gpu08 gpu09."""
    hosts = []
    for item in _split_top_level(hostlist.strip()):
        match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", item)
        if match is None:
            if "[" in item or "]" in item:
                raise ClusterError(f"cannot read the host list {hostlist!r} (at {item!r})")
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            if not first.isdigit() or not (last or first).isdigit():
                raise ClusterError(f"cannot read the host list {hostlist!r} (at {part!r})")
            # Zero padding is part of the name: gpu[08-10] is gpu08 gpu09 gpu10.
            width = len(first)
            hosts += [
                f"{prefix}{n:0{width}d}{suffix}" for n in range(int(first), int(last or first) + 1)
            ]
    return hosts


def tasks_per_node(spec: str) -> list[int]:
    """Task count of every node from SLURM_TASKS_PER_NODE: `2(x3),1` -> [2, 2, 2, 1]."""
    counts = []
    for item in spec.strip().split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item)
        if match is None:
            raise ClusterError(f"cannot read SLURM_TASKS_PER_NODE={spec!r} (at {item!r})")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def uniform_tasks_per_node(spec: str) -> int:
    """The one task count every node runs, or ClusterError when nodes run different counts."""
    counts = tasks_per_node(spec)
    if len(set(counts)) != 1:
        raise ClusterError(
            f"SLURM_TASKS_PER_NODE={spec}: the nodes run different task counts "
            f"({', '.join(map(str, counts))}), and DDP needs the same number on every node; "
            "submit with --ntasks-per-node=N (one task per GPU) instead of --ntasks"
        )
    return counts[0]


def per_rank_batch(global_batch: str, ranks: int, nodes: int, overrides: list[str]) -> int:
    """data.batch_size for a requested global batch, refused when the ranks do not divide it."""
    if not global_batch.isdigit() or int(global_batch) < 1:
        raise ClusterError(f"CLIPSCALE_GLOBAL_BATCH={global_batch!r} must be a positive integer")
    if given(overrides, "data.batch_size") is not None:
        raise ClusterError(
            "CLIPSCALE_GLOBAL_BATCH and data.batch_size are both set; give one of them "
            "(the per-rank batch is CLIPSCALE_GLOBAL_BATCH / ranks)"
        )
    if int(global_batch) % ranks:
        raise ClusterError(
            f"CLIPSCALE_GLOBAL_BATCH={global_batch} does not split over {nodes} nodes × "
            f"{ranks // nodes} tasks = {ranks} ranks; use a node count whose rank count divides "
            f"it, or set data.batch_size (per rank) instead"
        )
    return int(global_batch) // ranks


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written checkpoint of a run directory (requeue or periodic), if any."""
    # Files appear under their final name only once complete (clipscale.checkpoint_io), so the
    # newest name is the furthest point the run saved.
    candidates = [*run_dir.glob("hpc_ckpt_*.ckpt"), *run_dir.glob("checkpoints/*.ckpt")]
    return max(candidates, key=lambda path: path.stat().st_mtime_ns, default=None)


def given(overrides: list[str], key: str) -> str | None:
    """The value `overrides` give `key` (as `key=`, `+key=` or `++key=`), or None."""
    for argument in overrides:
        name, sep, value = argument.partition("=")
        if sep and name.lstrip("+") == key:
            return value
    return None


def launch_settings(env: Mapping[str, str], overrides: list[str]) -> dict[str, str | list[str]]:
    """MASTER_ADDR, MASTER_PORT, RUN_DIR and the job's OVERRIDES for the SLURM job in `env`.

    OVERRIDES are the script's own (DDP, the layout, the run dir, the per-rank batch of
    CLIPSCALE_GLOBAL_BATCH, the checkpoint a restarted job resumes from), each left out when the
    user's `overrides` set that key: the user's value wins, and no key is given twice.
    """
    if "SLURM_JOB_ID" not in env or "SLURM_JOB_NODELIST" not in env:
        raise ClusterError(
            "this script runs inside a SLURM job (SLURM_JOB_ID is not set): submit it with "
            f"`{SUBMIT}`; without SLURM, launch with torchrun (README, 'Many nodes')"
        )
    hosts = expand_hostlist(env["SLURM_JOB_NODELIST"])
    per_node = uniform_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", "1"))
    job_id = env["SLURM_JOB_ID"]
    run_dir = (
        given(overrides, "paths.output_dir")
        or f"{env.get('CLIPSCALE_RUNS', 'runs')}/slurm-{job_id}"
    )
    own = {
        "trainer": "ddp",
        "trainer.devices": str(per_node),
        "trainer.num_nodes": str(len(hosts)),
        "paths.output_dir": run_dir,
    }
    if env.get("CLIPSCALE_GLOBAL_BATCH"):
        ranks = per_node * len(hosts)
        batch = per_rank_batch(env["CLIPSCALE_GLOBAL_BATCH"], ranks, len(hosts), overrides)
        own["data.batch_size"] = str(batch)
    resume = newest_checkpoint(Path(run_dir))
    if resume is not None:
        own["ckpt_path"] = str(resume)
    return {
        "MASTER_ADDR": hosts[0],  # rank 0 runs on the allocation's first node
        "MASTER_PORT": str(FIRST_PORT + int(job_id) % PORT_SPAN),
        "RUN_DIR": run_dir,
        "OVERRIDES": [
            f"{key}={value}" for key, value in own.items() if given(overrides, key) is None
        ],
    }


def shell_assignment(name: str, value: str | list[str]) -> str:
    """`NAME=value` for bash, quoted; a list becomes an array: `NAME=(a b)`."""
    if isinstance(value, list):
        return f"{name}=({' '.join(map(shlex.quote, value))})"
    return f"{name}={shlex.quote(value)}"


def main(arguments: list[str]) -> int:
    """Print the launch settings as shell assignments, or one error line (exit status 1)."""
    try:
        settings = launch_settings(os.environ, arguments)
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(shell_assignment(name, value) for name, value in settings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
