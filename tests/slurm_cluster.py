"""A real one-node SLURM cluster for the tests: installed, started and stopped by this module.

`SlurmCluster.start()` writes /etc/slurm/slurm.conf (keeping any file that was there), starts
munged if no munge daemon answers, then slurmctld and slurmd with their state, spool, logs and pid
files in a private folder. `stop()` cancels the jobs left, stops the daemons it started by the pids
in their pid files and puts the configuration back. /etc/slurm/slurm.conf is a fixed path and
slurmctld listens on fixed ports, so one cluster runs per machine: an exclusive lock on
`LOCK_PATH` makes a second test session wait instead of taking over the first one's daemons.
"""

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "ci_install_slurm.sh"
SLURM_CONF = Path("/etc/slurm/slurm.conf")
LOCK_PATH = Path("/tmp/clipscale-slurm-cluster.lock")
MUNGE_DIRS = ("/run/munge", "/var/log/munge", "/var/lib/munge")
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
    if all(shutil.which(name) for name in BINARIES):
        return None
    if shutil.which("apt-get") is None:
        return "SLURM is not installed and apt-get is unavailable to install it"
    return None


def install() -> None:
    """Install the SLURM and munge packages with the same script CI uses."""
    if not all(shutil.which(name) for name in BINARIES):
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True, capture_output=True, text=True)


def _node_line() -> str:
    """This machine's NodeName line from `slurmd -C`, memory lowered so the node registers."""
    first_line = subprocess.run(
        ["slurmd", "-C"], check=True, capture_output=True, text=True
    ).stdout.splitlines()[0]
    # slurmd drains a node whose measured memory is below the configured one; leave 5% of room.
    memory = int(re.search(r"RealMemory=(\d+)", first_line).group(1))
    return re.sub(r"RealMemory=\d+", f"RealMemory={int(memory * 0.95)}", first_line)


def _slurm_conf(state_dir: Path) -> str:
    """The slurm.conf text for one node running jobs as root, all state under `state_dir`."""
    return "\n".join(
        [
            "ClusterName=clipscale-test",
            f"SlurmctldHost={socket.gethostname()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "ReturnToService=2",
            # Without it a job asking for more CPUs than the node has pends forever.
            "EnforcePartLimits=ALL",
            "MailProg=/bin/true",
            # Seconds between SIGTERM and SIGKILL when a job is requeued or cancelled.
            "KillWait=10",
            f"StateSaveLocation={state_dir}/state",
            f"SlurmdSpoolDir={state_dir}/spool",
            f"SlurmctldPidFile={state_dir}/slurmctld.pid",
            f"SlurmdPidFile={state_dir}/slurmd.pid",
            f"SlurmctldLogFile={state_dir}/slurmctld.log",
            f"SlurmdLogFile={state_dir}/slurmd.log",
            _node_line(),
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def _munge_answers() -> bool:
    """Whether a munge daemon is running and credentials round-trip."""
    encode = subprocess.run(["munge", "-n"], capture_output=True)
    if encode.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=encode.stdout, capture_output=True).returncode == 0


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    """Poll `predicate` every 0.2 s until it is true; raise naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"SLURM test cluster: {what} not reached within {timeout_s} s")
        time.sleep(0.2)


def _stop_pid_file(pid_file: Path, timeout_s: float = 10.0) -> None:
    """SIGTERM the process named in `pid_file` and wait for it to exit (SIGKILL after `timeout_s`)."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class SlurmCluster:
    """A single-node SLURM cluster whose daemons keep their files under `state_dir`."""

    state_dir: Path
    started_munge: bool = False
    _lock_file: object = None
    _saved_conf: bytes | None = None
    _pid_files: list[Path] = field(default_factory=list)

    def start(self) -> None:
        """Take the machine lock, write the configuration and start munged, slurmctld, slurmd."""
        self._lock_file = open(LOCK_PATH, "w")  # noqa: SIM115 (held until stop())
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        for sub in ("state", "spool"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._saved_conf = SLURM_CONF.read_bytes() if SLURM_CONF.exists() else None
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(_slurm_conf(self.state_dir))
        # -c: forget jobs from any earlier state; -i: ignore unreadable state files.
        subprocess.run(["slurmctld", "-c", "-i"], check=True)
        self._pid_files.append(self.state_dir / "slurmctld.pid")
        subprocess.run(["slurmd"], check=True)
        self._pid_files.append(self.state_dir / "slurmd.pid")
        _wait_for(self._node_idle, 30, "node state 'idle' in sinfo")

    def _start_munge(self) -> None:
        """Start munged as the munge user unless a running one already answers."""
        if _munge_answers():
            return
        for directory in MUNGE_DIRS:
            Path(directory).mkdir(parents=True, exist_ok=True)
        # munged refuses ("Logfile is insecure") to run as munge with files root once created.
        subprocess.run(["chown", "-R", "munge:munge", *MUNGE_DIRS], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        self.started_munge = True
        _wait_for(_munge_answers, 10, "munge credential round trip")

    def _node_idle(self) -> bool:
        """Whether sinfo reports the node idle (registered and ready for jobs)."""
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def stop(self) -> None:
        """Cancel remaining jobs, stop the daemons this cluster started, restore slurm.conf."""
        if self._pid_files:
            subprocess.run(["scancel", "--full", "--user=root"], capture_output=True)
            _wait_for(lambda: not self.job_ids(), 30, "no jobs left after scancel")
        for pid_file in reversed(self._pid_files):
            _stop_pid_file(pid_file)
        self._pid_files.clear()
        if self.started_munge:
            _stop_pid_file(Path("/run/munge/munged.pid"))
            self.started_munge = False
        if self._saved_conf is not None:
            SLURM_CONF.write_bytes(self._saved_conf)
        elif SLURM_CONF.exists():
            SLURM_CONF.unlink()
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the flock
            self._lock_file = None

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
