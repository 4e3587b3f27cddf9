"""A real SLURM cluster of one or more nodes for the tests, on this one machine.

`SlurmCluster.start()` runs `scripts/slurm/local_cluster.sh up N` (the script users run to try the
multi-node path): one slurmd per node, each in its own UTS namespace with its node name as hostname
and its own loopback port, /etc/slurm/slurm.conf written and one /etc/hosts line added. `stop()`
runs `local_cluster.sh down`: jobs cancelled, daemons stopped by their pid files, both files put
back. /etc/slurm/slurm.conf is a fixed path and slurmctld listens on a fixed port, so one cluster
runs per machine: an exclusive lock on `LOCK_PATH` makes a second test session wait instead of
taking over the first one's daemons. The `slurm` fixture below is one 2-node cluster for the whole
test session (tests/conftest.py registers it), shared by tests/test_slurm.py (one-node jobs) and
tests/test_multinode.py.
"""

import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "ci_install_slurm.sh"
CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "slurm" / "local_cluster.sh"
LOCK_PATH = Path("/tmp/clipscale-slurm-cluster.lock")
NODES = 2
# Base job states after which a job does not run again (scontrol's JobState names).
ENDED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "OUT_OF_MEMORY",
}
# Lightning's line once a rank's signal handling is set up (clipscale's requeue handler comes first).
HANDLERS_READY = "SLURM auto-requeueing enabled. Setting signal handlers."
BINARIES = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "slurmctld", "slurmd", "munged")


def unavailable_reason() -> str | None:
    """Why this machine cannot or should not run the cluster, or None if it can."""
    if not (os.environ.get("CI") or os.environ.get("CLIPSCALE_SLURM_TESTS") == "1"):
        return (
            "the SLURM tests install and start system daemons (munged, slurmctld, slurmd); they "
            "run in CI (CI set) or with CLIPSCALE_SLURM_TESTS=1"
        )
    if os.geteuid() != 0:
        return "SLURM tests start slurmctld/slurmd and write /etc/slurm: they need root"
    if shutil.which("unshare") is None:
        return "the local SLURM nodes run in UTS namespaces: unshare (util-linux) is missing"
    if all(shutil.which(name) for name in BINARIES):
        return None
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is unavailable to install it"
    return None


def install() -> None:
    """Install the SLURM and munge packages with the same script CI uses."""
    if not all(shutil.which(name) for name in BINARIES):
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True, capture_output=True, text=True)


def _munge_answers() -> bool:
    """Whether a munge daemon is running and credentials round-trip."""
    encode = subprocess.run(["munge", "-n"], capture_output=True)
    if encode.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=encode.stdout, capture_output=True).returncode == 0


def job_env(job_dir: Path) -> dict[str, str]:
    """The submitting environment jobs inherit: this interpreter, this checkout, offline wandb."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(REPO_ROOT),
        "CLIPSCALE_RUNS": str(job_dir / "runs"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        # 4 ranks share the box's 2 cores: one thread each, as Lightning's own launchers set it
        # (srun starts the ranks here, so none does). With 2 threads each, a rank of a finished
        # job once aborted at interpreter exit (cause not found; see the closing note of 12-05).
        "OMP_NUM_THREADS": "1",
    }


def model_state(checkpoint: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(global step, model parameters) of a Lightning checkpoint."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return payload["global_step"], payload["state_dict"]


def wait_for_output(path: Path, text: str, count: int, timeout_s: float) -> None:
    """Poll a job's output file until `text` appears `count` times."""
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text().count(text) >= count):
        assert time.monotonic() < deadline, f"{text!r} not seen {count}× in {path} in {timeout_s} s"
        time.sleep(0.2)


@dataclass
class TrainingJob:
    """A finished training job: its id, exit code, output text and run directory."""

    job_id: int
    returncode: int
    output: str
    run_dir: Path


@dataclass
class SlurmCluster:
    """A SLURM cluster of `nodes` nodes (node1, node2, ...) whose daemons keep their files in `state_dir`."""

    state_dir: Path
    nodes: int = NODES
    _lock_file: object = None

    def _script(self, *args: str) -> None:
        """Run local_cluster.sh with this cluster's state folder; its error line on failure."""
        result = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), *args],
            env={**os.environ, "CLIPSCALE_SLURM_STATE": str(self.state_dir)},
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"local_cluster.sh {' '.join(args)}: {result.stderr.strip()}")

    def start(self) -> None:
        """Take the machine lock and bring the nodes up (idle in sinfo)."""
        self._lock_file = open(LOCK_PATH, "w")  # noqa: SIM115 (held until stop())
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        self._script("up", str(self.nodes))

    def stop(self) -> None:
        """Cancel remaining jobs, stop the daemons, restore slurm.conf and /etc/hosts, unlock."""
        try:
            self._script("down")
        finally:
            if self._lock_file is not None:
                self._lock_file.close()  # closing releases the flock
                self._lock_file = None

    def kill_node(self, node: str) -> None:
        """SIGKILL every process of `node`: its slurmd, job step daemons and tasks."""
        self._script("kill-node", node)

    def start_node(self, node: str) -> None:
        """Start `node`'s slurmd again; SLURM returns it to service when it registers."""
        self._script("start-node", node)

    def node_state(self, node: str) -> str:
        """The node's state as sinfo prints it (idle, alloc, down*, ...)."""
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-n", node, "-o", "%t"], capture_output=True, text=True
        )
        return out.stdout.strip()

    def job_ids(self) -> list[int]:
        """Ids of the jobs the controller still lists as pending or running."""
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-t", "PD,R,CG,RQ,S"], capture_output=True, text=True
        )
        return [int(line) for line in out.stdout.split()]

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` fields of a job (kept for MinJobAge seconds after it ends)."""
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", str(job_id)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for_end(self, job_id: int, timeout_s: float) -> int:
        """Poll the controller until the job has ended; its exit code (1 if a signal ended it).

        For a job that is requeued, `sbatch --wait` is no witness: it may poll the job in the
        moment between the requeue and the new PENDING state, take that for the end and exit 1
        while the job goes on. Call this once the requeue has been seen, and it waits for the end.
        A relaunch the node refuses ends the job too: slurmctld.log then says why.
        """
        deadline = time.monotonic() + timeout_s
        while (fields := self.job(job_id))["JobState"] not in ENDED_STATES:
            assert time.monotonic() < deadline, f"job {job_id} still running after {timeout_s} s"
            time.sleep(0.5)
        code, by_signal = (int(part) for part in fields["ExitCode"].split(":"))
        return 1 if by_signal else code

    def release_requeued(self, job_id: int, restarts: int, timeout_s: float = 120) -> None:
        """Wait until the job is requeued (`restarts` so far, PENDING), then let it start now.

        SLURM holds a requeued job for 120 s (BeginTime). The release comes in a later second
        than the requeue: a relaunch 0.2 s after it was refused ("Killing non-startable batch
        JobId=3: Job credential revoked" in slurmctld.log; the job ended with exit 1).
        """
        deadline = time.monotonic() + timeout_s
        while not (
            (job := self.job(job_id))["Restarts"] == str(restarts) and job["JobState"] == "PENDING"
        ):
            assert time.monotonic() < deadline, f"job was not requeued: {job}"
            time.sleep(0.2)
        time.sleep(2.0)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)

    def train(self, script: Path, options: list[str], overrides: list[str], job_dir: Path,
              timeout_s: float = 300) -> TrainingJob:  # fmt: skip
        """sbatch --wait OPTIONS SCRIPT OVERRIDES from `job_dir`; the finished job."""
        job = self.submit(
            [*options, "--output=%j.out", str(script), *overrides], job_dir, job_env(job_dir)
        )
        job_id = int(job.stdout.readline())
        returncode = job.wait(timeout=timeout_s)
        output = (job_dir / f"{job_id}.out").read_text()
        return TrainingJob(job_id, returncode, output, job_dir / "runs" / f"slurm-{job_id}")

    def start_training(self, script: Path, options: list[str], overrides: list[str],
                       job_dir: Path, ranks: int) -> TrainingJob:  # fmt: skip
        """Submit without waiting; return once all `ranks` ranks can take the requeue signal."""
        # sbatch --wait is no witness for a job that requeues (see wait_for_end).
        job = self.submit(
            [*options, "--output=%j.out", str(script), *overrides],
            job_dir,
            job_env(job_dir),
            wait=False,
        )
        job_id = int(job.stdout.readline())
        job.wait(timeout=30)
        output_path = job_dir / f"{job_id}.out"
        wait_for_output(output_path, HANDLERS_READY, count=ranks, timeout_s=240)
        return TrainingJob(job_id, -1, "", job_dir / "runs" / f"slurm-{job_id}")

    def finish(self, job: TrainingJob, job_dir: Path, timeout_s: float = 300) -> TrainingJob:
        """Wait for the end of a started job (requeues included); the finished job."""
        returncode = self.wait_for_end(job.job_id, timeout_s)
        output = (job_dir / f"{job.job_id}.out").read_text()
        return TrainingJob(job.job_id, returncode, output, job.run_dir)

    def submit(
        self, args: list[str], cwd: Path, env: dict[str, str], wait: bool = True
    ) -> subprocess.Popen:
        """Start `sbatch --parsable [--wait] ARGS`; its first stdout line is the job id."""
        return subprocess.Popen(
            ["sbatch", "--parsable", *(["--wait"] if wait else []), *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running 2-node cluster for every SLURM test of the session; stopped and cleaned up after."""
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
    """A test module's submission directory: job outputs and runs/ land here."""
    return tmp_path_factory.mktemp("jobs")
