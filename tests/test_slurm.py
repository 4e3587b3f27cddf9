"""The SLURM job scripts on a real one-node SLURM (started here, CPU, 2 tasks, gloo).

The cluster fixture (tests/slurm_cluster.py) installs SLURM with scripts/ci_install_slurm.sh when
it is missing, starts munged/slurmctld/slurmd and stops them afterwards. Because that touches the
machine, these tests run only in CI (`CI` set) or with CLIPSCALE_SLURM_TESTS=1, and skip otherwise. Jobs run the project's own
scripts/slurm/single_node.sbatch with CPU overrides; the uninterrupted run is the reference the
preempted run must reproduce exactly.
"""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.slurm_cluster import REPO_ROOT, SlurmCluster, install, unavailable_reason

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
HANDLERS_READY = "SLURM auto-requeueing enabled. Setting signal handlers."


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node cluster for this module's jobs; stopped and cleaned up after."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    install()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm-state"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory) -> Path:
    """Submission directory: job outputs and runs/ land here."""
    return tmp_path_factory.mktemp("jobs")


def job_env(job_dir: Path) -> dict[str, str]:
    """The submitting environment jobs inherit: this interpreter, this checkout, offline wandb."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO_ROOT),
        "CLIPSCALE_RUNS": str(job_dir / "runs"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }


def run_training_job(slurm: SlurmCluster, job_dir: Path, overrides: list[str]):
    """Submit single_node.sbatch, wait; return (job id, exit code, output text, run dir)."""
    job = slurm.submit(
        [*CPU_JOB, "--output=%j.out", str(SBATCH_SCRIPT), *TRAIN_OVERRIDES, *overrides],
        job_dir,
        job_env(job_dir),
    )
    job_id = int(job.stdout.readline())
    returncode = job.wait(timeout=300)
    output = (job_dir / f"{job_id}.out").read_text()
    return job_id, returncode, output, job_dir / "runs" / f"slurm-{job_id}"


def model_state(checkpoint: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(global step, model parameters) of a Lightning checkpoint."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return payload["global_step"], payload["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted_run(slurm, job_dir):
    """The reference: the sbatch script trained to MAX_STEPS without interruption, CSV logs."""
    return run_training_job(slurm, job_dir, ["logger=csv"])


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
    _, returncode, output, run_dir = uninterrupted_run
    assert returncode == 0, output[-3000:]
    for rank in (0, 1):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" in output
    assert f"global batch {2 * PER_RANK_BATCH} = {PER_RANK_BATCH} per rank × 2 ranks" in output
    with open(next(run_dir.glob("csv/version_*/metrics.csv"))) as handle:
        logged = [row["train/global_batch_size"] for row in csv.DictReader(handle)]
    logged = [float(value) for value in logged if value]
    assert logged == [2.0 * PER_RANK_BATCH] * MAX_STEPS
    step, _ = model_state(run_dir / "checkpoints" / "last.ckpt")
    assert step == MAX_STEPS


def wait_for_output(path: Path, text: str, count: int, timeout_s: float) -> None:
    """Poll the job output until `text` appears `count` times."""
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text().count(text) >= count):
        assert time.monotonic() < deadline, f"{text!r} not seen {count}× in {path} in {timeout_s} s"
        time.sleep(0.2)


def test_preempted_job_requeues_and_resumes_to_the_uninterrupted_result(
    slurm, job_dir, uninterrupted_run
):
    """USR1 mid-run → checkpoint + requeue → the resumed job ends bitwise equal to the reference."""
    job = slurm.submit(
        [*CPU_JOB, "--output=%j.out", str(SBATCH_SCRIPT), *TRAIN_OVERRIDES, "logger=wandb"],
        job_dir,
        job_env(job_dir),
        wait=False,  # sbatch --wait can exit 1 at the requeue (SlurmCluster.wait_for_end)
    )
    job_id = int(job.stdout.readline())
    job.wait(timeout=30)
    output_path, run_dir = job_dir / f"{job_id}.out", job_dir / "runs" / f"slurm-{job_id}"
    # Both ranks have their handler once Lightning reports its signal set-up (ours comes first).
    wait_for_output(output_path, HANDLERS_READY, count=2, timeout_s=150)
    time.sleep(1.0)
    subprocess.run(["scancel", "--signal=USR1", str(job_id)], check=True)
    # SLURM holds a requeued job for 120 s (BeginTime); release it early.
    deadline = time.monotonic() + 60
    while not (slurm.job(job_id)["Restarts"] == "1" and slurm.job(job_id)["JobState"] == "PENDING"):
        assert time.monotonic() < deadline, f"job was not requeued: {slurm.job(job_id)}"
        time.sleep(0.2)
    # Release it in a later second than the requeue: a relaunch 0.2 s after it was refused
    # ("Killing non-startable batch JobId=3: Job credential revoked" in slurmctld.log; the job
    # ended with exit 1 and never ran again), which SLURM's 120 s hold would have avoided.
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    returncode = slurm.wait_for_end(job_id, timeout_s=300)
    output = output_path.read_text()
    assert returncode == 0, f"{slurm.job(job_id)}\n{output[-3000:]}"

    assert "restart 1" in output and f"requeued SLURM job {job_id}" in output
    interrupted_step, _ = model_state(run_dir / "hpc_ckpt_1.ckpt")
    assert 0 < interrupted_step < MAX_STEPS, "the signal must land mid-run"
    step, params = model_state(run_dir / "checkpoints" / "last.ckpt")
    reference_step, reference = model_state(uninterrupted_run[3] / "checkpoints" / "last.ckpt")
    assert step == reference_step == MAX_STEPS
    assert params.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(params[name], value), name

    # One wandb run id for both attempts: two offline run folders ending in the stored id.
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    attempts = sorted(path.name for path in (run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(name.endswith(f"-{run_id}") for name in attempts), attempts
