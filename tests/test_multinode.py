"""Past one machine: scripts/slurm/multi_node.sbatch on a real 2-node SLURM, 2 CPU tasks per node.

The session's cluster (`slurm`, tests/slurm_cluster.py) is scripts/slurm/local_cluster.sh: node1
and node2 are two slurmd's, each in its own UTS namespace (hostname = node name) on its own
loopback port, so the 4 ranks of a job really are spread over two SLURM nodes and meet over TCP
(gloo) at node1's address. Jobs are submitted as a user would, with CPU overrides as arguments.

The reference for every training job is one process training the same model on the concatenated
global batch (the 4 ranks' batches, in rank order, of the same seeded sampler) with the same
optimizer: the design's invariant (DESIGN.md) across a node boundary. `optim=sgd`, because its
update is proportional to the gradient (Adam's first steps are nearly lr × sign(gradient): a wrong
gradient scale would pass unseen). Every test here needs the real cluster, so `make test-nodes`
runs them all (CI does); the torchrun and node-loss tests are also marked `slow`: with them the
module takes about 10 minutes on 2 busy cores, without them about 6.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, default_collate

from clipscale.data.webdataset import WebDataModule
from clipscale.preemption import ResumableSampler
from clipscale.train import CONFIG_DIR, build_module
from tests.numerics import assert_relative_close
from tests.slurm_cluster import REPO_ROOT, job_env, model_state
from tests.test_data_webdataset import write_clean_shards

pytestmark = pytest.mark.slurm

MULTI_NODE = REPO_ROOT / "scripts" / "slurm" / "multi_node.sbatch"
NODES, TASKS_PER_NODE = 2, 2
RANKS = NODES * TASKS_PER_NODE
# Each node has 2 CPUs: one task per CPU, no GPUs (sbatch options override the script's #SBATCH).
JOB = [f"--nodes={NODES}", f"--ntasks-per-node={TASKS_PER_NODE}", "--gpus-per-node=0",
       "--cpus-per-task=1", "--time=10"]  # fmt: skip
PER_RANK_BATCH, MAX_STEPS, EVERY = 4, 12, 4  # global batch 16; periodic checkpoints at 4, 8, 12
GLOBAL_BATCH = PER_RANK_BATCH * RANKS
CHUNK = 3  # grad_cache.chunk_size: not a divisor of the per-rank batch
# Seconds a collective may wait before the survivors of a lost node give up (gloo).
COLLECTIVE_TIMEOUT_S = 60
# A lost node's job is requeued within SlurmdTimeout (20 s in local_cluster.sh) plus slurmctld's
# next ping of the node, and never later than the collective timeout would end the survivors.
NODE_LOSS_BOUND_S = 20 + COLLECTIVE_TIMEOUT_S
CONFIG = [
    "trainer.accelerator=cpu",
    f"trainer.max_steps={MAX_STEPS}",
    f"data.batch_size={PER_RANK_BATCH}",
    "data.num_workers=0",
    "optim=sgd",
    f"callbacks.model_checkpoint.every_n_train_steps={EVERY}",
    f"trainer.strategy.timeout.seconds={COLLECTIVE_TIMEOUT_S}",
]
CPU_RUN = [*CONFIG, "trainer.enable_progress_bar=false", "eval.demo_zeroshot=false",
           "eval.every_n_steps=null"]  # fmt: skip


def composed(overrides: list[str]):
    """The training config the jobs compose from the same overrides (one process, no logger)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=["trainer=ddp", "logger=none", *overrides])


def global_batches(cfg) -> list[dict[str, torch.Tensor]]:
    """The batches of all ranks at each step, concatenated in rank order: [RANKS × B, ...] each."""
    dataset = instantiate(cfg.data).dataset("train")
    per_rank = [
        list(ResumableSampler(dataset, PER_RANK_BATCH, RANKS, rank, cfg.seed))
        for rank in range(RANKS)
    ]
    steps = range(MAX_STEPS)
    return [
        default_collate(
            [
                dataset[index]
                for indices in per_rank
                for index in indices[step * PER_RANK_BATCH : (step + 1) * PER_RANK_BATCH]
            ]
        )
        for step in steps
    ]


@pytest.fixture(scope="module")
def reference() -> tuple[dict, dict]:
    """(initial, final) parameters of one process trained on the concatenated global batches."""
    cfg = composed(CONFIG)
    L.seed_everything(cfg.seed, verbose=False)  # as clipscale.train seeds before building
    module = build_module(cfg)
    initial = {name: value.detach().clone() for name, value in module.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=MAX_STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(global_batches(cfg), batch_size=None))
    return initial, {name: value.detach().clone() for name, value in module.state_dict().items()}


def assert_matches_reference(checkpoint: Path, reference) -> None:
    """The checkpoint's update from the shared start equals the reference's (fp32, 1e-5)."""
    initial, expected = reference
    step, params = model_state(checkpoint)
    assert step == MAX_STEPS and params.keys() == expected.keys()
    for name, value in expected.items():
        # Compare updates (after − before): parameters move little relative to their size.
        assert_relative_close(params[name] - initial[name], value - initial[name], 1e-5, name=name)


@pytest.fixture(scope="module")
def uninterrupted(slurm, job_dir):
    """The 2-node job trained to MAX_STEPS without interruption, CSV logs."""
    return slurm.train(MULTI_NODE, JOB, [*CPU_RUN, "logger=csv"], job_dir)


@pytest.fixture(scope="module")
def uninterrupted_chunked(slurm, job_dir):
    """The same with gradient caching: the reference the interrupted runs must equal bit for bit.

    With grad_cache.chunk_size the gradients are all-reduced by clipscale (all_reduce_gradients:
    fixed buckets in parameter order). DDP's reducer re-forms its buckets after the first step of
    every process start, and with more than 2 ranks gloo's ring adds an element's 4 contributions
    in an order set by its place in a bucket: a DDP run resumed from step 1 differed from the
    uninterrupted one by 1 float32 ulp (1.2e-7) in 59 of 62 tensors, while the 2-rank single-node
    test (a + b = b + a exactly) stays bitwise.
    """
    overrides = [*CPU_RUN, "logger=csv", f"grad_cache.chunk_size={CHUNK}"]
    return slurm.train(MULTI_NODE, JOB, overrides, job_dir)


def logged_global_batches(run_dir: Path) -> list[float]:
    """train/global_batch_size of every logged step (CSV logger)."""
    with open(next(run_dir.glob("csv/metrics.csv"))) as handle:
        values = [row["train/global_batch_size"] for row in csv.DictReader(handle)]
    return [float(value) for value in values if value]


def test_four_ranks_on_two_nodes_equal_one_process_on_the_global_batch(uninterrupted, reference):
    job = uninterrupted
    assert job.returncode == 0, job.output[-3000:]
    # Two ranks on each node: the tasks' hostnames are the SLURM node names.
    assert f"on node[1-2]; {RANKS} tasks; rendezvous node1:" in job.output
    for rank in range(RANKS):
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/{RANKS}" in job.output
    said = f"global batch {GLOBAL_BATCH} = {PER_RANK_BATCH} per rank × {RANKS} ranks"
    assert said in job.output
    assert logged_global_batches(job.run_dir) == [float(GLOBAL_BATCH)] * MAX_STEPS
    assert_matches_reference(job.run_dir / "checkpoints" / "last.ckpt", reference)


def test_gradient_caching_across_nodes_equals_one_process(uninterrupted_chunked, reference):
    """Chunks of 3 (not a divisor of the per-rank 4) on 4 ranks: still the one-process update."""
    job = uninterrupted_chunked
    assert job.returncode == 0, job.output[-3000:]
    assert f"grad-cache chunk {CHUNK}" in job.output
    assert_matches_reference(job.run_dir / "checkpoints" / "last.ckpt", reference)


def test_preempted_two_node_job_resumes_on_both_nodes_to_the_uninterrupted_result(
    slurm, job_dir, uninterrupted_chunked
):
    """USR1 → checkpoint after the step → requeue → 4 ranks on 2 nodes again → bitwise equal."""
    overrides = [*CPU_RUN, "logger=wandb", f"grad_cache.chunk_size={CHUNK}"]
    job = slurm.start_training(MULTI_NODE, JOB, overrides, job_dir, RANKS)
    subprocess.run(["scancel", "--signal=USR1", str(job.job_id)], check=True)
    slurm.release_requeued(job.job_id, restarts=1)  # not after SLURM's 120 s requeue hold
    job = slurm.finish(job, job_dir)
    assert job.returncode == 0, f"{slurm.job(job.job_id)}\n{job.output[-3000:]}"

    assert (
        f"requeued SLURM job {job.job_id}" in job.output
        and "(restart 1) on node[1-2]" in job.output
    )
    # Both attempts ran all 4 ranks (the output file is appended across restarts).
    assert job.output.count(f"MEMBER: {RANKS}/{RANKS}") == 2
    interrupted_step, _ = model_state(job.run_dir / "hpc_ckpt_1.ckpt")
    assert 0 < interrupted_step < MAX_STEPS, "the signal must land mid-run"
    _, params = model_state(job.run_dir / "checkpoints" / "last.ckpt")
    _, expected = model_state(uninterrupted_chunked.run_dir / "checkpoints" / "last.ckpt")
    assert params.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(params[name], value), name
    # One run directory and one wandb run id for both attempts.
    run_id = (job.run_dir / "wandb_run_id.txt").read_text().strip()
    attempts = sorted(path.name for path in (job.run_dir / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2 and all(name.endswith(f"-{run_id}") for name in attempts), attempts


@pytest.mark.slow  # SLURM's 120 s requeue hold and 20-30 s to mark the node down: about 5 minutes
def test_losing_a_node_requeues_the_job_and_resumes_from_the_last_periodic_checkpoint(
    slurm, job_dir, uninterrupted_chunked
):
    """SIGKILL every process of node2 mid-run (slurmd, step daemon, its 2 ranks): the job ends
    without hanging, SLURM requeues it (node failure), and once node2 is back the job resumes from
    the newest periodic checkpoint to the uninterrupted parameters, bit for bit."""
    overrides = [*CPU_RUN, "logger=csv", f"grad_cache.chunk_size={CHUNK}"]
    job = slurm.start_training(MULTI_NODE, JOB, overrides, job_dir, RANKS)
    checkpoints = job.run_dir / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints / f"step{EVERY:06d}.ckpt").exists():  # atomic: complete once named
        assert time.monotonic() < deadline, f"no periodic checkpoint:\n{slurm.job(job.job_id)}"
        time.sleep(0.05)
    slurm.kill_node("node2")
    killed = time.monotonic()
    # The ranks on node1 fail at their next collective (connection reset on one machine; a node
    # that vanished without a reset: the collective timeout); SLURM requeues the job once it has
    # marked node2 down (SlurmdTimeout 20 s in local_cluster.sh, then its next ping).
    while slurm.job(job.job_id)["Restarts"] != "1":
        assert time.monotonic() - killed < NODE_LOSS_BOUND_S, (
            f"still running: {slurm.job(job.job_id)}"
        )
        time.sleep(0.5)
    saved = {path.name: path.read_bytes() for path in checkpoints.glob("step*.ckpt")}
    assert f"step{MAX_STEPS:06d}.ckpt" not in saved, "the node was lost after the last step"

    slurm.start_node("node2")
    # No early release here: SLURM holds the requeued job for 120 s (BeginTime). After a node
    # failure the controller's delayed terminate request for the lost attempt reached node2 45-56 s
    # after it returned and killed the ranks of an attempt released 2-12 s after it (exit 143).
    job = slurm.finish(job, job_dir, timeout_s=420)
    assert job.returncode == 0, f"{slurm.job(job.job_id)}\n{job.output[-3000:]}"
    assert "(restart 1) on node[1-2]" in job.output
    assert "Node failure on node2" in job.output  # srun's own account of the first attempt
    # The second attempt continued from a checkpoint of the first (a rerun from scratch would
    # reach the same parameters too), the newest one in the run directory.
    resumed_from = job.output.split("Restoring states from the checkpoint path at ")[1].split()[0]
    assert Path(resumed_from).parent == checkpoints, resumed_from
    # Every checkpoint written before the loss is still there, byte for byte, and loads.
    for name, content in saved.items():
        assert (checkpoints / name).read_bytes() == content, name
        model_state(checkpoints / name)
    _, params = model_state(checkpoints / "last.ckpt")
    _, expected = model_state(uninterrupted_chunked.run_dir / "checkpoints" / "last.ckpt")
    for name, value in expected.items():
        assert torch.equal(params[name], value), name


def read_one_pass_epochs(shards: str, result_folder: str) -> None:
    """Run by each srun task: join the job's gloo group and read two one-pass epochs, a collective
    per batch as a training step makes; write this rank's host, steps and sample keys."""
    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    data = WebDataModule(train_shards=shards, resampled=False, batch_size=PER_RANK_BATCH,
                         num_workers=0, model_name="clipscale-tiny")  # fmt: skip
    data.setup("fit")  # the rank and world size come from the process group
    loader = data.train_dataloader()
    epochs = []
    for _ in range(2):
        keys, steps = [], 0
        for batch in loader:
            # What Lightning does with a batch (the trim to the shortest rank is a collective),
            # then a step's collective: a rank that ran dry would leave the others waiting here.
            batch = data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0)
            torch.distributed.all_reduce(torch.ones(1))
            keys += batch["keys"]
            steps += 1
        epochs.append({"steps": steps, "keys": keys})
    result = {"host": socket.gethostname(), "epochs": epochs}
    Path(result_folder, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()  # a live gloo group aborts the interpreter at exit


def test_one_pass_epochs_read_every_sample_once_over_two_nodes(slurm, tmp_path):
    """data.resampled=false on 4 ranks over 2 nodes: 3 shards of 16 (fewer shards than ranks, so
    shards split within), every sample once per epoch, every rank the same number of steps."""
    write_clean_shards(tmp_path / "shards", shards=3, per_shard=16)
    all_keys = sorted(f"s{shard}k{index}" for shard in range(3) for index in range(16))
    script = tmp_path / "read.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH {' '.join(JOB)} --output=read.out\n"
        'LAUNCH=$(python -m clipscale.cluster) && eval "$LAUNCH" && export MASTER_ADDR MASTER_PORT\n'
        "srun python -c 'from tests.test_multinode import read_one_pass_epochs; "
        f'read_one_pass_epochs("{tmp_path}/shards/{{0000..0002}}.tar", "{tmp_path}")\'\n'
    )
    job = slurm.submit([str(script)], tmp_path, job_env(tmp_path))
    assert job.wait(timeout=240) == 0, (tmp_path / "read.out").read_text()[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(RANKS)]
    assert sorted(rank["host"] for rank in ranks) == ["node1", "node1", "node2", "node2"]
    for epoch in range(2):
        # 48 samples / (4 ranks × 4) = 3 steps on every rank, nothing left over.
        assert [rank["epochs"][epoch]["steps"] for rank in ranks] == [3] * RANKS
        assert sorted(key for rank in ranks for key in rank["epochs"][epoch]["keys"]) == all_keys


@pytest.mark.slow  # a fourth 4-rank training job (about 40 s more on 2 cores); make test-nodes
def test_torchrun_on_two_nodes_equals_one_process(slurm, tmp_path, reference):
    """torchrun --nnodes=2 --nproc_per_node=2 with a c10d rendezvous at node1, started on each
    node (one srun task per node, SLURM's variables removed: torchrun alone launches the ranks)."""
    run_dir = tmp_path / "run"
    torchrun = (
        f"torchrun --nnodes={NODES} --nproc_per_node={TASKS_PER_NODE} --rdzv_backend=c10d "
        "--rdzv_endpoint=node1:$((29000 + SLURM_JOB_ID % 1000)) --rdzv_id=$SLURM_JOB_ID "
        f"-m clipscale.train trainer=ddp {' '.join(CPU_RUN)} logger=csv paths.output_dir={run_dir}"
    )
    script = tmp_path / "torchrun.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --nodes={NODES} --ntasks-per-node=1 --cpus-per-task={TASKS_PER_NODE} "
        "--gpus-per-node=0 --output=torchrun.out\n"
        # Expanded here, in the batch script, where SLURM_JOB_ID is still set.
        f'srun bash -c "unset \\${{!SLURM_@}}; exec {torchrun}"\n'
    )
    job = slurm.submit([str(script)], tmp_path, job_env(tmp_path))
    output = tmp_path / "torchrun.out"
    assert job.wait(timeout=300) == 0, output.read_text()[-3000:]
    said = f"global batch {GLOBAL_BATCH} = {PER_RANK_BATCH} per rank × {RANKS} ranks"
    assert said in output.read_text()
    assert logged_global_batches(run_dir) == [float(GLOBAL_BATCH)] * MAX_STEPS
    assert_matches_reference(run_dir / "checkpoints" / "last.ckpt", reference)


def test_a_run_dir_that_only_one_node_sees_is_refused_in_one_line(slurm, tmp_path):
    """CLIPSCALE_RUNS on a node-local folder (each local node mounts its own tmpfs there): the job
    stops before training with one error line naming the node and the fix."""
    node_local = slurm.state_dir / "node-local"
    env = {**job_env(tmp_path), "CLIPSCALE_RUNS": str(node_local / "runs")}
    job = slurm.submit([*JOB, "--output=%j.out", str(MULTI_NODE), *CPU_RUN], tmp_path, env)
    job_id = int(job.stdout.readline())
    assert job.wait(timeout=120) == 1
    output = (tmp_path / f"{job_id}.out").read_text()
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "not visible on node2" in errors[0], output[-2000:]
    assert "CLIPSCALE_RUNS" in errors[0] and "GLOBAL_RANK" not in output
