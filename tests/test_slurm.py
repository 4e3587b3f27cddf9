"""The SLURM job scripts on a real SLURM (started here), one-node jobs (CPU, 2 tasks, gloo).

The session's cluster fixture (`slurm`, tests/slurm_cluster.py) installs SLURM with
scripts/ci_install_slurm.sh when it is missing, starts munged/slurmctld and one slurmd per node and
stops them afterwards. Because that touches the machine, these tests run only in CI (`CI` set) or
with CLIPSCALE_SLURM_TESTS=1, and skip otherwise. Jobs run the project's own
scripts/slurm/single_node.sbatch with CPU overrides; the uninterrupted run is the reference the
preempted run must reproduce exactly.
"""

import csv
import subprocess
import time

import pytest
import torch

from tests.slurm_cluster import (
    REPO_ROOT,
    job_env,
    model_state,
)

pytestmark = pytest.mark.slurm

SBATCH_SCRIPT = REPO_ROOT / "scripts" / "slurm" / "single_node.sbatch"
# The node has 2 CPUs: one task per CPU, no GPUs (sbatch options override the script's #SBATCH).
CPU_JOB = ["--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
MAX_STEPS = 20
PER_RANK_BATCH = 8
TRAIN_OVERRIDES = [
    "trainer.accelerator=cpu",
    f"trainer.max_steps={MAX_STEPS}",
    f"data.batch_size={PER_RANK_BATCH}",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
    "eval.demo_zeroshot=false",
]


@pytest.fixture(scope="module")
def uninterrupted_run(slurm, job_dir):
    """The reference: the sbatch script trained to MAX_STEPS without interruption, CSV logs."""
    return slurm.train(SBATCH_SCRIPT, CPU_JOB, [*TRAIN_OVERRIDES, "logger=csv"], job_dir)


def test_two_task_job_all_reduces_over_gloo(slurm, tmp_path):
    """Both srun tasks join one gloo group from the allocation's MASTER_ADDR and sum their ranks."""
    script = tmp_path / "allreduce.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=1 --ntasks=2 --cpus-per-task=1 --output=allreduce.out\n"
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))\n"
        "srun python -c '\n"
        "import os, torch, torch.distributed as dist\n"
        'rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])\n'
        'dist.init_process_group("gloo", rank=rank, world_size=world)\n'
        "value = torch.tensor([rank + 1.0])\n"
        "dist.all_reduce(value)\n"
        'print(f"rank {rank}/{world} sum {value.item():g}", flush=True)\n'
        "dist.destroy_process_group()  # a live gloo group aborts the interpreter at exit\n"
        "'\n"
    )
    job = slurm.submit([str(script)], tmp_path, job_env(tmp_path))
    assert job.wait(timeout=120) == 0, job.stderr.read()
    lines = (tmp_path / "allreduce.out").read_text().splitlines()
    assert sorted(line for line in lines if line.startswith("rank")) == [
        "rank 0/2 sum 3",
        "rank 1/2 sum 3",
    ]


def test_sbatch_job_trains_both_ranks_on_one_global_batch(uninterrupted_run):
    """The real sbatch script: 2 ranks, global batch = 8 per rank × 2, last.ckpt at max_steps."""
    output, run_dir = uninterrupted_run.output, uninterrupted_run.run_dir
    assert uninterrupted_run.returncode == 0, output[-3000:]
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in output
    assert f"global batch {2 * PER_RANK_BATCH} = {PER_RANK_BATCH} per rank × 2 ranks" in output
    with open(next(run_dir.glob("csv/metrics.csv"))) as handle:
        logged = [row["train/global_batch_size"] for row in csv.DictReader(handle)]
    logged = [float(value) for value in logged if value]
    assert logged == [2.0 * PER_RANK_BATCH] * MAX_STEPS
    step, _ = model_state(run_dir / "checkpoints" / "last.ckpt")
    assert step == MAX_STEPS


def test_preempted_job_requeues_and_resumes_to_the_uninterrupted_result(
    slurm, job_dir, uninterrupted_run
):
    """USR1 mid-run → checkpoint + requeue → the resumed job ends bitwise equal to the reference."""
    overrides = [*TRAIN_OVERRIDES, "logger=wandb"]
    job = slurm.start_training(SBATCH_SCRIPT, CPU_JOB, overrides, job_dir, ranks=2)
    job_id, run_dir = job.job_id, job.run_dir
    time.sleep(1.0)
    subprocess.run(["scancel", "--signal=USR1", str(job_id)], check=True)
    slurm.release_requeued(job_id, restarts=1)  # not after SLURM's 120 s requeue hold
    job = slurm.finish(job, job_dir)
    output = job.output
    assert job.returncode == 0, f"{slurm.job(job_id)}\n{output[-3000:]}"

    assert "restart 1" in output and f"requeued SLURM job {job_id}" in output
    interrupted_step, _ = model_state(run_dir / "hpc_ckpt_1.ckpt")
    assert 0 < interrupted_step < MAX_STEPS, "the signal must land mid-run"
    step, params = model_state(run_dir / "checkpoints" / "last.ckpt")
    reference_step, reference = model_state(uninterrupted_run.run_dir / "checkpoints" / "last.ckpt")
    assert step == reference_step == MAX_STEPS
    assert params.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(params[name], value), name

    # One wandb run id for both attempts: two offline run folders ending in the stored id.
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    attempts = sorted(path.name for path in (run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(name.endswith(f"-{run_id}") for name in attempts), attempts
