"""What the training step reports about its own speed and its data: samples/s, model and hardware
TFLOP/s per device, MFU/HFU, skipped and CPU-decoded samples.

Between logging steps nothing here waits for the device: sample and FLOP counts are host numbers,
skipped-sample counts are summed on the device. At a logging step (Lightning's
`log_every_n_steps`, and the last step) the device is synchronised once, so samples/s covers the
whole interval's device work, and the run-long counters are summed over ranks.
"""

from __future__ import annotations

import time

import torch

from clipscale.distributed import all_reduce_sum, world_size
from clipscale.flops import StepFlops


def steps_done(trainer) -> int:
    """Steps done once the step now running (or just run, from on_train_batch_end) is counted, as
    Lightning counts them for logging."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped + 1


def is_last_step(trainer) -> bool:
    """Whether the step now running (or just run) is the last of `trainer.max_steps`."""
    return trainer.max_steps > 0 and steps_done(trainer) >= trainer.max_steps


def is_logging_step(trainer) -> bool:
    """Whether the step now running (or just run, from on_train_batch_end) is one whose metrics
    Lightning sends to the loggers: every `log_every_n_steps` batches, and the last step. Values
    are read from the device only then, so the steps in between never wait for the device."""
    every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
    return steps_done(trainer) % every == 0 or is_last_step(trainer)


def synchronized_time(device: torch.device) -> float:
    """Wall time after the device has finished its queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepMeter:
    """Counts every step on the host; at a logging step, reads the interval's metrics."""

    def __init__(self) -> None:
        self.step_flops: StepFlops | None = None  # per-sample FLOPs of the trained step
        self.peak_tflops: float | None = None  # the device's dense bf16 peak (known GPUs only)
        # Throughput over each logging interval: device-synchronised clock, counts since then.
        self.interval_start: float | None = None
        self.interval_samples = 0  # over all ranks
        self.interval_model_flops = 0.0  # this rank's
        self.interval_hardware_flops = 0.0
        self.skipped_pending: torch.Tensor | int = 0  # this rank's, since the last logging step
        self.skipped_total = 0  # over all ranks, up to the last logging step (kept in checkpoints)
        self.cpu_local = 0  # images the CPU fallback decoded on this rank since the last log
        self.cpu_total = 0  # ... over all ranks, up to the last logging step

    def start(self, step_flops: StepFlops, peak_tflops: float | None) -> None:
        """A new fit: the FLOPs of one step, the device's peak, and an interval not yet started."""
        self.step_flops, self.peak_tflops = step_flops, peak_tflops
        self.interval_start, self.interval_samples = None, 0
        self.interval_model_flops = self.interval_hardware_flops = 0.0

    def start_clock(self, device: torch.device) -> None:
        """Start the throughput clock, at the beginning of the first step of a fit."""
        if self.interval_start is None:
            self.interval_start = synchronized_time(device)

    def count(self, batch: dict) -> None:
        """Add one step's samples, FLOPs and sample counters (host numbers; no device wait)."""
        local_batch = batch["images"].shape[0]
        self.interval_samples += local_batch * world_size()
        foils = batch["foil_texts"].shape[1] if "foil_texts" in batch else 0  # every slot encoded
        self.interval_model_flops += local_batch * self.step_flops.model(foils)
        self.interval_hardware_flops += local_batch * self.step_flops.hardware(foils)
        if "skipped" in batch:  # 0-d counts from the loader, already on the device
            self.skipped_pending = self.skipped_pending + sum(batch["skipped"].values())
        if "cpu_decoded_samples" in batch:  # data.decode=device (clipscale/data/decode.py)
            self.cpu_local += int(batch["cpu_decoded_samples"])

    def read(self, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """The interval's metrics at a logging step (every rank calls it: the counters are summed
        over ranks), and a new interval from now."""
        now = synchronized_time(device)
        elapsed = max(now - self.interval_start, 1e-9)
        samples_per_second = self.interval_samples / elapsed
        # This rank's FLOPs over the interval, in TFLOP/s: model FLOPs count the useful work,
        # hardware FLOPs add what gradient checkpointing and caching recompute (clipscale/flops.py).
        model_tflops = self.interval_model_flops / elapsed / 1e12
        hardware_tflops = self.interval_hardware_flops / elapsed / 1e12
        self.interval_start, self.interval_samples = now, 0
        self.interval_model_flops = self.interval_hardware_flops = 0.0
        metrics = {
            "train/global_batch_size": torch.tensor(float(batch["images"].shape[0] * world_size())),
            "train/samples_per_second": torch.tensor(samples_per_second),
            "train/tflops_per_device": torch.tensor(model_tflops, dtype=torch.float64),
            "train/hardware_tflops_per_device": torch.tensor(hardware_tflops, dtype=torch.float64),
        }
        if self.peak_tflops:  # known GPUs only (clipscale.flops.PEAK_BF16_TFLOPS)
            metrics["train/mfu"] = torch.tensor(model_tflops / self.peak_tflops)
            metrics["train/hfu"] = torch.tensor(hardware_tflops / self.peak_tflops)
        if "skipped" in batch:
            pending = torch.as_tensor(self.skipped_pending, device=device)
            self.skipped_total += int(all_reduce_sum(pending))
            self.skipped_pending = 0
            metrics["train/skipped_samples"] = torch.tensor(float(self.skipped_total))
        if "cpu_decoded_samples" in batch:
            local = torch.tensor(self.cpu_local, device=device)
            self.cpu_total += int(all_reduce_sum(local))
            self.cpu_local = 0
            metrics["train/cpu_decoded_samples"] = torch.tensor(float(self.cpu_total))
        return metrics
