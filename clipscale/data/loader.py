"""The training stream's position (for exact resume) and the DataLoader that starts each pass.

The position of a rank's stream is (epoch, batches received in it, each worker's raw cursor):
the number of raw samples that worker had pulled from its (shuffled) stream through the last
batch received. Batches are counted when the trainer takes them (`on_before_batch_transfer`),
not when the loader prefetches them, so a checkpoint taken after step s resumes at batch s+1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from clipscale import distributed
from clipscale.data.reading import SkipLog

log = logging.getLogger(__name__)

RESUME_MODES = ("exact", "approximate")


class StreamPosition:
    """Where this rank's training stream is, and the position a resume should start from."""

    def __init__(self, rank: int, workers: int, layout: dict, mode: str = "exact") -> None:
        if mode not in RESUME_MODES:
            raise ValueError(f"data.resume={mode!r}: expected one of {', '.join(RESUME_MODES)}")
        self.rank, self.workers, self.layout, self.mode = rank, workers, layout, mode
        self.epoch, self.batches, self.salt = 0, 0, 0
        self.epoch_shift = 0  # data epoch - trainer epoch, set at a resume (see data_epoch)
        self.cursors = [0] * workers
        self.samples = 0  # samples this rank trained on in the current epoch
        self.epoch_samples: dict[int, int] = {}  # finished and current epochs -> samples used
        self.pending: dict | None = None  # a loaded position, applied when its epoch begins

    def record(self, position: torch.Tensor) -> None:
        """Note one batch taken by the trainer: `position` = [epoch, worker, cursor]."""
        epoch, worker, cursor = (int(v) for v in position.tolist())
        if epoch != self.epoch:
            log.info(
                "data: epoch %d used %d samples on rank %d", self.epoch, self.samples, self.rank
            )
            self.epoch, self.batches, self.salt = epoch, 0, 0
            self.cursors, self.samples = [0] * self.workers, 0
        self.batches += 1
        self.cursors[worker] = cursor

    def count_samples(self, samples: int) -> None:
        """Add the samples of a batch the step really used (after any trimming)."""
        self.samples += samples
        self.epoch_samples[self.epoch] = self.samples

    def data_epoch(self, trainer_epoch: int, batches_per_epoch: int | None) -> int:
        """The epoch a pass that begins now reads: the trainer's, shifted by what a resume showed.

        A checkpoint written after the last batch of epoch e resumes in Lightning at current_epoch
        e + 2 (seen with every_n_train_steps at an epoch's end), which would skip epoch e + 1's
        samples and order. The loaded position knows better: epoch e, all its batches taken, so
        the next pass reads e + 1. The shift found at the resume holds for the rest of the run.
        """
        pending = self.pending
        if pending is not None:
            finished = batches_per_epoch is not None and pending["batches"] >= batches_per_epoch
            self.epoch_shift = pending["epoch"] + int(finished) - trainer_epoch
        return trainer_epoch + self.epoch_shift

    def start(self, epoch: int) -> tuple[int, list[int], int]:
        """(batches already taken, worker cursors, salt) for a pass over `epoch` that begins now."""
        pending, self.pending = self.pending, None
        if pending is None or pending["epoch"] != epoch or not pending["batches"]:
            return 0, [0] * self.workers, 0
        if self.mode == "exact":
            return pending["batches"], list(pending["cursors"]), pending["salt"]
        # approximate: the rest of the epoch from a fresh draw (new salt), without re-reading
        self.salt = pending["salt"] + 1
        return pending["batches"], [0] * self.workers, self.salt

    def state_dict(self) -> dict:
        """This rank's position plus the layout it is valid for (ranks, workers, batch...)."""
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "cursors": list(self.cursors),
            "salt": self.salt,
            "samples": self.samples,
            "layout": dict(self.layout),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state`; a different layout cannot be exact, so it falls back to approximate."""
        if state["layout"] != self.layout and self.mode == "exact":
            log.warning(
                "data: the checkpoint's loader layout %s differs from this run's %s; the stream "
                "cannot resume exactly and restarts the rest of epoch %d with a new draw",
                state["layout"],
                self.layout,
                state["epoch"],
            )
            self.mode = "approximate"
        self.pending = dict(state)
        self.epoch, self.batches, self.salt = state["epoch"], state["batches"], state["salt"]
        self.samples = state["samples"]
        self.cursors = list(state["cursors"]) if len(state["cursors"]) == self.workers else []
        self.cursors = self.cursors or [0] * self.workers


def gather_rank_states(state: dict) -> list[dict]:
    """Every rank's position (a checkpoint is written by rank 0 alone), in rank order."""
    if not distributed.is_distributed():
        return [state]
    states: list = [None] * distributed.world_size()
    torch.distributed.all_gather_object(states, state)
    return states


class EpochLoader(DataLoader):
    """A DataLoader that tells its ShardStream the epoch and start position of each pass.

    With a `decoder` (decode.DeviceDecoder), every batch of shipped bytes is decoded on the
    device as the loader yields it. The batches' skip notes are logged here, once per shard and
    kind over all workers (reading.SkipLog), and leave the batch.
    """

    def __init__(
        self,
        dataset,
        current_epoch: Callable[[], int] | None,
        position: StreamPosition | None = None,
        decoder: Callable[[dict], dict] | None = None,
        **kwargs,
    ):
        # Batches are made in the workers, so the loader itself must not batch again.
        super().__init__(dataset, batch_size=None, **kwargs)
        self.current_epoch = current_epoch
        self.position = position
        self.decoder = decoder  # data.decode=device: shipped bytes -> pixels on the device
        self.skip_log = SkipLog()
        self.passes = 0

    def __iter__(self):
        # The trainer's epoch keeps the order right after a resume; alone, count the passes.
        epoch = self.current_epoch() if self.current_epoch is not None else self.passes
        self.passes += 1
        if self.position is not None:
            epoch = self.position.data_epoch(epoch, self._batches_per_epoch())
        workers = max(1, self.num_workers)
        done, cursors, salt = self.position.start(epoch) if self.position else (0, [0] * workers, 0)
        self.dataset.start(epoch, done, cursors, salt)
        batches = super().__iter__()
        if self.decoder is not None:
            # Decoded here, in the process that owns the device, so that training and the
            # validation code (which iterates val_dataloader() itself) receive pixels alike.
            batches = map(self.decoder, batches)
        return map(self._log_skips, batches)

    def _log_skips(self, batch: dict) -> dict:
        """Log the batch's new skip notes and take them out of the batch."""
        self.skip_log.report(batch.pop("skip_notes", ()))
        return batch

    def _batches_per_epoch(self) -> int | None:
        try:
            return len(self.dataset)
        except TypeError:  # a stream without a known length
            return None

    def state_dict(self) -> dict:
        """Nothing: every rank's position is saved by WebDataModule.state_dict (gathered there).

        Having the method tells Lightning the loader resumes mid-epoch (no warning on resume).
        """
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to load here: WebDataModule.load_state_dict restores the position."""
