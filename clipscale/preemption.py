"""Surviving preemption and time limits: checkpoint on SLURM's warning signal, requeue, resume.

SLURM sends USR1 to every task shortly before a time limit (`#SBATCH --signal=USR1@120`) or on
`scancel --signal=USR1 JOBID`. `RequeueOnSignal` only records the signal in its handler; after the
current optimizer step all ranks agree that one of them saw it, save the checkpoint together,
rank 0 requeues the job (same job id, so the same run dir) and every rank exits. The requeued job
resumes by itself: Lightning loads the newest `hpc_ckpt_N.ckpt` of `default_root_dir` when the run
is under SLURM and `ckpt_path` is null.

Lightning's own SLURM handler (`SLURMEnvironment(auto_requeue=True)`) saves inside the signal
handler, i.e. at any point of a step: possibly between two parameter updates of the optimizer, or
on one rank while another waits in an all-gather, which pairs the checkpoint's barrier with the
wrong collective. Installing our handler first makes Lightning skip its own.

What a resumed run gets back: model, optimizer, scheduler and step (Lightning's checkpoint), the
logit scale (a model parameter), each rank's RNG state (`state_dict` below), the data position
(`ResumableSampler`, from the restored step), the wandb run (`wandb_run_id`, kept in the run dir)
and the CSV history (`RunCSVLogger`: one metrics.csv a run, each step once).
"""

from __future__ import annotations

import csv
import os
import random
import re
import secrets
import signal
import subprocess
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DistributedSampler

from clipscale import distributed


class Requeued(SystemExit):
    """Raised on every rank once the checkpoint is saved and the job requeued (exit status 0)."""


def _rng_state() -> dict:
    """This process's Python, NumPy, torch CPU and CUDA generator states, as tensors and ints.

    Only tensors and Python scalars, so Lightning's `weights_only` checkpoint loading accepts them.
    """
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (
            name,
            torch.from_numpy(keys.astype(np.int64)),
            position,
            has_gauss,
            cached_gaussian,
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """Restore the generator states returned by `_rng_state`."""
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        (name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes for this job (`ARRAYID_TASK` for array tasks), or None."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def hpc_checkpoint_path(root_dir: str | os.PathLike) -> Path:
    """The next `hpc_ckpt_N.ckpt` in `root_dir`, the name Lightning resumes from under SLURM."""
    numbers = [
        int(match.group(1))
        for path in Path(root_dir).glob("hpc_ckpt_*.ckpt")
        if (match := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", path.name))
    ]
    return Path(root_dir) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class RequeueOnSignal(Callback):
    """On `signal_name`: checkpoint after the current step on all ranks, requeue on SLURM, exit."""

    def __init__(self, signal_name: str = "SIGUSR1"):
        if signal_name not in signal.Signals.__members__:
            raise ValueError(
                f"callbacks.requeue.signal_name={signal_name!r} is not a signal name; "
                "use e.g. SIGUSR1 (and #SBATCH --signal=USR1@120)"
            )
        self.signum = signal.Signals[signal_name]
        self.received = False
        self._previous_handler = None
        self._trainer: L.Trainer | None = None
        self._rng_to_restore: dict | None = None

    def _record(self, signum, frame) -> None:
        # Only a flag: saving here could interrupt an optimizer update or a collective.
        self.received = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Install the handler before Lightning's, which is then not installed."""
        self._trainer = trainer
        if stage == "fit":
            self._previous_handler = signal.signal(self.signum, self._record)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Put back the handler that was there before `setup`."""
        if stage == "fit" and self._previous_handler is not None:
            signal.signal(self.signum, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        """If any rank got the signal: save `hpc_ckpt_N.ckpt`, requeue (rank 0), exit everywhere."""
        # One tiny all-reduce per step, so that all ranks stop after the same step.
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        path = hpc_checkpoint_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)  # collective; returns once rank 0 has written the file
        rank_zero_info(
            f"clipscale: {self.signum.name} received, saved {path} at step {trainer.global_step}"
        )
        job_id = slurm_job_id()
        if trainer.is_global_zero and job_id is not None:
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
            if result.returncode == 0:
                rank_zero_info(f"clipscale: requeued SLURM job {job_id}; it resumes from {path}")
            else:
                rank_zero_warn(
                    f"clipscale: `scontrol requeue {job_id}` failed ({result.stderr.strip()}); "
                    f"resubmit with ckpt_path={path} to continue"
                )
        raise Requeued(0)

    def state_dict(self) -> dict:
        """Every rank's RNG states (gathered: the checkpoint is written by rank 0 alone)."""
        state = _rng_state()
        states = [state]
        if distributed.is_distributed():
            states = [None] * distributed.world_size()
            dist.all_gather_object(states, state)
        return {"rng_per_rank": states}

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep this rank's RNG states; they are set when training starts (after data set-up)."""
        states = state_dict["rng_per_rank"]
        if len(states) == distributed.world_size():
            self._rng_to_restore = states[distributed.rank()]
        else:
            rank_zero_warn(
                f"clipscale: checkpoint has RNG states for {len(states)} ranks, this run has a "
                "different world size; random streams restart from the seed"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restore the RNG states of a resumed run, right before its first step."""
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle split across ranks (drop_last) whose first epoch may start part-way.

    `len()` stays the full epoch, so Lightning's restored batch counters end the epoch at the same
    batch as an uninterrupted run would.
    """

    def __init__(self, dataset, batch_size: int, num_replicas: int, rank: int, seed: int,
                 epoch: int = 0, start_batch: int = 0):  # fmt: skip
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.set_epoch(epoch)
        self.resume_epoch, self.resume_start = epoch, start_batch * batch_size

    def __iter__(self):
        indices = list(super().__iter__())
        start = self.resume_start if self.epoch == self.resume_epoch else 0
        return iter(indices[start:])


def resumable_sampler(dataset, batch_size: int, seed: int, trainer: L.Trainer | None):
    """Sampler for `trainer`'s rank that continues a restored run at the batch where it stopped.

    The position comes from the restored optimizer step: CLIPModule steps once per batch, so with
    B batches per epoch, step s is batch s % B of epoch s // B.
    """
    world, rank, step = (
        (trainer.world_size, trainer.global_rank, trainer.global_step) if trainer else (1, 0, 0)
    )
    batches_per_epoch = len(dataset) // world // batch_size
    if batches_per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} samples give no batch of {batch_size} on each of {world} ranks; "
            "use a smaller data.batch_size or more samples"
        )
    return ResumableSampler(
        dataset, batch_size, world, rank, seed, step // batches_per_epoch, step % batches_per_epoch
    )


def wandb_run_id(output_dir: str | os.PathLike) -> str:
    """The wandb run id of this run dir: created once (atomically, any rank) in `wandb_run_id.txt`."""
    path = Path(output_dir) / "wandb_run_id.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f"{path.name}.{os.getpid()}")
        draft.write_text(secrets.token_hex(8))
        try:
            os.link(draft, path)  # fails if another rank created it first; then we read theirs
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip()


def wandb_resume_kwargs(logger_cfg, output_dir: str | os.PathLike) -> dict:
    """`id=` for a WandbLogger config without one, so a resumed run logs into the same wandb run."""
    if not str(logger_cfg.get("_target_", "")).endswith("WandbLogger") or logger_cfg.get("id"):
        return {}
    return {"id": wandb_run_id(output_dir)}


class RunWandbLogger(WandbLogger):
    """WandbLogger without Lightning's `anonymous` argument (wandb warns that it has no effect),
    quiet offline: the run summary prints one `wandb sync` for every offline segment of the run,
    where wandb's own hint names the last segment only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)
        if self._wandb_init.get("mode") == "offline":
            self._wandb_init.setdefault("settings", {"quiet": True})


class HistoryWriter(ExperimentWriter):
    """Writes a run's one metrics.csv across resumes. A resumed run's first rows replace what the
    killed run logged from that step on (trained again after the checkpoint); the rest is kept."""

    def _check_log_dir_exists(self) -> None:
        """Keep an earlier segment's file (Lightning's writer deletes it)."""
        self.continues = self._fs.isfile(self.metrics_file_path)

    def save(self) -> None:
        """Append the logged rows; before the first append of a resumed run, cut the history."""
        if self.continues and self.metrics:
            self._keep_rows_before(self.metrics)
            self.continues = False
        super().save()

    def _keep_rows_before(self, new_rows: list[dict]) -> None:
        """Drop the file's rows past the first new step, and its rows at that step that hold a
        metric a new row logs there (a validation logged just before the checkpoint stays)."""
        first = min(row["step"] for row in new_rows)
        logged_at_first = {key for row in new_rows if row["step"] == first for key in row}
        logged_at_first -= {"step", "epoch"}
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            header, rows = list(reader.fieldnames or []), list(reader)
        kept = [
            row
            for row in rows
            if int(row["step"]) < first
            or (
                int(row["step"]) == first and not logged_at_first & {k for k, v in row.items() if v}
            )
        ]
        # the header covers the old and the new metrics, so the appended rows fit it
        self.metrics_keys = sorted(set(header) | {key for row in new_rows for key in row})
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)


class RunCSVLogger(CSVLogger):
    """CSVLogger writing `<save_dir>/csv/metrics.csv`, one history for the run and its resumes
    (Lightning's starts a `version_N` folder each time)."""

    def __init__(self, save_dir: str, **kwargs):
        super().__init__(save_dir, name="", version="csv", **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        """The run's HistoryWriter (on rank 0; a no-op stand-in elsewhere)."""
        if self._experiment is None:
            self._experiment = HistoryWriter(log_dir=self.log_dir)
        return self._experiment
