"""Non-finite guard: a step whose loss or gradients hold NaN/Inf on any rank updates nothing.

A large-batch run that diverges must not keep stepping with NaN weights until its time limit. Each
step, every rank computes one flag (its loss and its gradients' total norm are finite or not) and
one all-reduce (MAX) makes all ranks agree, so a NaN seen on one rank skips the step everywhere and
the replicas never drift apart. `guard.max_consecutive_nonfinite` skips in a row stop the run with
a one-line error; the checkpoints written before are kept (the skipped steps changed no weight).

Two ways to skip, because reading a device flag on the host waits for the GPU every step:
- host path (CPU, or an optimizer without a device-side skip): the flag is read at once; a skipped
  step has no optimizer update (gradients dropped, so AdamW leaves its moments and step count as
  they were), no scheduler step and no logit-scale clamp. Exact: the run equals one that never saw
  that batch.
- device path (CUDA with a fused optimizer, e.g. AdamW(fused=True)): the flag is handed to the
  optimizer as `found_inf`, the tensor GradScaler uses, and the fused kernel skips the update (and
  takes back its step count) on the device. The host never waits; it reads the counters only at
  logging steps, so the stop comes at the next one. The first step at which a streak reached the
  limit is recorded on the device, so a streak that ended between two checks still stops the run,
  with the host path's message. Trade-off: the scheduler cannot know, so it still steps and the LR
  schedule runs on by one step per skipped step.
Either way Lightning's global_step counts the skipped batch as a step, so max_steps and periodic
checkpoints stay in batches. Under 16-mixed the GradScaler skips steps with Inf/NaN gradients
itself, and overflow is routine for it (the scale backs off and training goes on): a step whose
loss is finite but whose gradients are not is a scaler overflow, counted in `skipped_steps` and
in `scaler_overflow_steps` but not in the streak towards the limit; only a non-finite loss is.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from clipscale.errors import ConfigError, UserError
from clipscale.optim import steps_with_amp_scaling


class NonFiniteError(UserError):
    """Too many non-finite steps in a row: the run has diverged; printed as one line."""


def nonfinite_flags(loss: torch.Tensor, gradients: list[torch.Tensor]) -> torch.Tensor:
    """[loss, gradients]: each 1.0 on every rank if it is NaN/Inf on some rank, else 0.0 (a device
    tensor: nothing waits for it). One all-reduce of two numbers."""
    loss = loss.detach().float().reshape(())
    # NaN or Inf in any element makes the total norm non-finite.
    norm = torch.nn.utils.get_total_norm(gradients).to(loss.device) if gradients else loss * 0
    flags = (~torch.isfinite(torch.stack([loss, norm.float()]))).float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


class NonFiniteGuard:
    """Skips non-finite steps (see module docstring), counts them, stops after too many in a row."""

    def __init__(self, max_consecutive_nonfinite: int = 10):
        if not isinstance(max_consecutive_nonfinite, int) or max_consecutive_nonfinite < 1:
            raise ConfigError(
                f"guard.max_consecutive_nonfinite={max_consecutive_nonfinite} must be an integer "
                ">= 1 (non-finite steps in a row before the run stops); the default is 10"
            )
        self.max_consecutive = max_consecutive_nonfinite
        # Python numbers until the first step, then 0-d tensors on the flag's device (the device
        # path never reads them between checks).
        self.skipped_steps: int | torch.Tensor = 0
        self.scaler_overflow_steps: int | torch.Tensor = 0  # of skipped_steps (16-mixed)
        self.consecutive: int | torch.Tensor = 0
        self.last_finite_loss: float | torch.Tensor = float("nan")
        # Where a streak first reached the limit (-1: not yet) and the last finite loss before it:
        # the device path reads the counters only at checks, and a streak that ended between two
        # checks must still stop the run there.
        self.limit_step: int | torch.Tensor = -1
        self.limit_loss: float | torch.Tensor = float("nan")

    def state_dict(self) -> dict:
        """The counters as Python numbers (a checkpoint is a logging point: one read is fine)."""
        return {
            "skipped_steps": int(self.skipped_steps),
            "scaler_overflow_steps": int(self.scaler_overflow_steps),
            "consecutive": int(self.consecutive),
            "last_finite_loss": float(self.last_finite_loss),
            "limit_step": int(self.limit_step),
            "limit_loss": float(self.limit_loss),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue counting from a checkpoint: a resumed run keeps its skip totals and streak."""
        self.skipped_steps = int(state["skipped_steps"])
        self.scaler_overflow_steps = int(state.get("scaler_overflow_steps", 0))  # newer key
        self.consecutive = int(state["consecutive"])
        self.last_finite_loss = float(state["last_finite_loss"])
        self.limit_step = int(state.get("limit_step", -1))  # absent in older checkpoints
        self.limit_loss = float(state.get("limit_loss", float("nan")))

    def step(
        self,
        loss: torch.Tensor,
        optimizer,
        scheduler,
        step: int,
        *,
        on_device: bool = False,
        loss_only: bool = False,
        check: bool = True,
    ) -> bool:
        """optimizer.step() and scheduler.step() unless this step is non-finite on some rank.

        `optimizer` is a torch optimizer or Lightning's wrapper of one; `step` the 0-based index of
        this update (Lightning's global_step). `check`: on the device path, read the counters
        now and stop if a streak reached the limit since the last check (the host path checks
        every step). `loss_only` (a GradScaler steps the optimizer): only a non-finite loss is a
        non-finite step here; finite loss with non-finite gradients is a scaler overflow, which
        the scaler skips. Returns False when the host knows the step was skipped (the caller then
        leaves the logit scale alone); the device path returns True.
        """
        inner = getattr(optimizer, "optimizer", optimizer)
        loss_flag, gradient_flag = nonfinite_flags(loss, _gradients(inner))
        if loss_only:
            flag, overflow = loss_flag, gradient_flag * (1 - loss_flag)
        else:
            flag, overflow = torch.maximum(loss_flag, gradient_flag), loss_flag * 0
        self._count(flag, overflow, loss, step)
        if on_device and steps_with_amp_scaling(inner):
            self._device_step(flag, optimizer, inner, scheduler, loss_only)
            if check:
                self._stop_if_diverged()
            return True
        self._stop_if_diverged()  # host path: the counters are read at every step
        if not bool(flag):
            optimizer.step()
            scheduler.step()
            return True
        if not loss_only:
            # No gradient, no update: AdamW skips parameters without .grad (moments, step count and
            # weight decay untouched). optimizer.step() still runs so Lightning counts the step.
            inner.zero_grad(set_to_none=True)
        # With loss_only (16-mixed) the gradients are non-finite too and GradScaler skips the step.
        optimizer.step()
        return False

    def _count(self, flag: torch.Tensor, overflow: torch.Tensor, loss: torch.Tensor, step) -> None:
        """Update the counters with device arithmetic only (nothing here waits for the device)."""
        if not isinstance(self.skipped_steps, torch.Tensor):  # the first step: onto the device
            for name in self.state_dict():  # every counter a checkpoint keeps
                value = torch.tensor(float(getattr(self, name)), dtype=torch.float64)
                setattr(self, name, value.to(flag.device))
        flag, overflow = flag.to(self.consecutive.dtype), overflow.to(self.consecutive.dtype)
        self.skipped_steps = self.skipped_steps + flag + overflow
        self.scaler_overflow_steps = self.scaler_overflow_steps + overflow
        self.consecutive = (self.consecutive + flag) * flag  # resets to 0 on a finite step
        finite_loss = loss.detach().to(self.last_finite_loss.dtype).reshape(())
        self.last_finite_loss = torch.where(flag > 0, self.last_finite_loss, finite_loss)
        # The first time a streak reaches the limit is where the host path stops.
        reached = (self.consecutive >= self.max_consecutive) & (self.limit_step < 0)
        self.limit_step = torch.where(reached, float(step), self.limit_step)
        self.limit_loss = torch.where(reached, self.last_finite_loss, self.limit_loss)

    def _device_step(self, flag, optimizer, inner, scheduler, loss_only) -> None:
        """The fused kernel skips the update when found_inf is 1; counters stay on the device."""
        # A GradScaler (16-mixed, loss_only) sets and deletes its own found_inf in its step.
        if not loss_only:
            inner.found_inf = flag
            try:
                optimizer.step()
            finally:
                del inner.found_inf
        else:
            optimizer.step()
        scheduler.step()

    def _stop_if_diverged(self) -> None:
        limit_step = int(self.limit_step)
        if limit_step >= 0:
            raise NonFiniteError(
                f"{self.max_consecutive} non-finite steps in a row (loss or gradients NaN/Inf), "
                f"the last at step {limit_step}; last finite loss {float(self.limit_loss):.6g}. "
                "Training stopped (guard.max_consecutive_nonfinite="
                f"{self.max_consecutive}); the checkpoints written so far hold finite weights: "
                "resume from one with a lower optim.optimizer.lr or more optim.warmup_steps"
            )


def _gradients(optimizer) -> list[torch.Tensor]:
    return [
        p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None
    ]


def guard_options(trainer) -> dict:
    """NonFiniteGuard.step's keyword arguments for this Lightning trainer: the device path on CUDA,
    the loss alone under a GradScaler (16-mixed)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return {
        "on_device": trainer.strategy.root_device.type == "cuda",
        "loss_only": scaler is not None,
    }
