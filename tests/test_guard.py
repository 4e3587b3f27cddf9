"""Non-finite guard: a NaN on one rank skips the step on every rank, exactly as if the batch had
never been there; too many in a row stop the run with a one-line error (real gloo processes)."""

from __future__ import annotations

import csv
import math
import os
import re

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.parallel import DistributedDataParallel

from clipscale.config import ConfigError
from clipscale.guard import NonFiniteError, NonFiniteGuard
from tests.conftest import REPO_ROOT, run_cli
from tests.distributed_utils import run_distributed

STEPS, POISONED = 6, 2  # the batch index that gets a NaN


def batches(rank: int, drop: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's STEPS regression batches (different on each rank); `drop` leaves one out."""
    generator = torch.Generator().manual_seed(100 + rank)
    data = [
        (torch.randn(5, 4, generator=generator), torch.randn(5, 3, generator=generator))
        for _ in range(STEPS)
    ]
    return [batch for index, batch in enumerate(data) if index != drop]


def train(rank: int, poison: str | None, device_path: bool, drop: int | None = None) -> dict:
    """DDP AdamW over a linear layer with the guard, constant LR; returns the final state.

    poison="input": a NaN pixel in rank 0's batch POISONED (loss and, through DDP, all gradients
    NaN). poison="loss": rank 1's loss alone is NaN after backward, gradients stay finite on both
    ranks, so only the guard's all-reduced flag can tell rank 0 to skip.
    """
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=device_path)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    guard = NonFiniteGuard(max_consecutive_nonfinite=3)
    for step, (inputs, targets) in enumerate(batches(rank, drop)):
        optimizer.zero_grad(set_to_none=True)
        if poison == "input" and rank == 0 and step == POISONED:
            inputs = inputs.clone()
            inputs[0, 0] = float("nan")
        loss = ((wrapped(inputs) - targets) ** 2).mean()
        loss.backward()
        if poison == "loss" and rank == 1 and step == POISONED:
            loss = loss + float("nan")
        guard.step(loss.detach(), optimizer, scheduler, step, on_device=device_path)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "optimizer": optimizer.state_dict()["state"],
        "scheduler_steps": scheduler.last_epoch,
        "skipped": float(guard.skipped_steps),
    }


def all_variants(rank: int, world_size: int, folder: str) -> None:
    """Every variant in one pair of processes (starting processes costs more than the runs)."""
    results = {
        (poison, device_path): train(rank, poison, device_path)
        for poison in ("input", "loss")
        for device_path in (False, True)
    }
    for device_path in (False, True):  # the references: batch POISONED never seen
        results[("dropped", device_path)] = train(rank, None, device_path, drop=POISONED)
    results[("kept", False)] = train(rank, None, False)  # a control: every batch trained on
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("guard")
    run_distributed(all_variants, 2, str(folder))
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def assert_same_state(got: dict, expected: dict) -> None:
    for a, b in zip(got["params"], expected["params"], strict=True):
        assert torch.equal(a, b)
    assert got["optimizer"].keys() == expected["optimizer"].keys()
    for index, state in expected["optimizer"].items():
        for name, value in state.items():  # step, exp_avg, exp_avg_sq: bitwise
            assert torch.equal(got["optimizer"][index][name], value), (index, name)


@pytest.mark.parametrize("poison", ["input", "loss"])
@pytest.mark.parametrize("device_path", [False, True], ids=["host", "device"])
def test_nan_on_one_rank_skips_the_step_on_all_ranks_as_if_the_batch_was_dropped(
    two_rank_results, poison, device_path
):
    for rank in (0, 1):
        got, reference = (
            two_rank_results[rank][(poison, device_path)],
            two_rank_results[rank][("dropped", device_path)],
        )
        assert got["skipped"] == 1.0
        assert all(torch.isfinite(p).all() for p in got["params"])
        assert_same_state(got, reference)
        # Host path: no scheduler step on the skipped step. Device path: it steps (documented).
        assert got["scheduler_steps"] == STEPS - (0 if device_path else 1)
    assert_same_state(
        two_rank_results[0][(poison, device_path)], two_rank_results[1][(poison, device_path)]
    )


def test_the_reference_differs_from_a_run_that_kept_the_batch(two_rank_results):
    """The comparison above can fail: training on batch POISONED changes the weights."""
    dropped, kept = (two_rank_results[0][(name, False)]["params"] for name in ("dropped", "kept"))
    assert not torch.equal(dropped[0], kept[0])


def nan_steps(guard: NonFiniteGuard, losses: list[float], device_path=False, every=1, first_step=0):
    """Steps of a 2-input linear layer whose loss takes the given values (its gradients are 0)."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=device_path)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step, value in enumerate(losses, start=first_step):
        optimizer.zero_grad()
        loss = model(torch.ones(1, 2)).sum() * 0 + value
        loss.backward()
        check = (step + 1) % every == 0  # as the module checks at logging steps
        guard.step(loss.detach(), optimizer, scheduler, step, on_device=device_path, check=check)


def test_consecutive_nonfinite_steps_stop_with_the_step_and_last_finite_loss():
    guard = NonFiniteGuard(max_consecutive_nonfinite=3)
    nan, inf = float("nan"), float("inf")
    nan_steps(guard, [1.5, nan, 2.25, nan, inf])  # a finite step in between resets the count
    assert guard.skipped_steps == 3
    with pytest.raises(NonFiniteError) as error:
        nan_steps(guard, [nan], first_step=5)
    assert str(error.value).startswith("3 non-finite steps in a row")
    assert "at step 5" in str(error.value) and "last finite loss 2.25" in str(error.value)


def test_a_restored_guard_continues_the_streak_and_the_total():
    guard = NonFiniteGuard(max_consecutive_nonfinite=3)
    nan = float("nan")
    nan_steps(guard, [1.0, nan, 0.75, nan, nan])
    restored = NonFiniteGuard(max_consecutive_nonfinite=3)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == {
        "skipped_steps": 3,
        "scaler_overflow_steps": 0,
        "consecutive": 2,
        "last_finite_loss": 0.75,
        "limit_step": -1,
        "limit_loss": pytest.approx(float("nan"), nan_ok=True),
    }
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row.*last finite loss 0.75"):
        nan_steps(restored, [nan], first_step=5)


def test_device_path_stops_at_the_check_interval():
    """No host read each step: the stop comes at the next check, naming where the limit was hit."""
    guard = NonFiniteGuard(max_consecutive_nonfinite=2)
    nan = float("nan")
    nan_steps(guard, [0.5, nan, nan], device_path=True, every=4)  # 2 in a row, not yet read
    with pytest.raises(
        NonFiniteError, match="2 non-finite steps in a row.*at step 2; last finite loss 0.5"
    ):
        nan_steps(guard, [nan], device_path=True, every=4, first_step=3)  # step 3 is read


def test_device_path_stops_for_a_streak_that_ended_between_two_checks():
    """The review's case: limit 3, a check every 10 steps, 6 non-finite steps then finite ones.
    The host path stops at step 3; the device path stops at its next check (step 9) with the
    same message, although the streak was over by then."""
    nan = float("nan")
    losses = [1.25] + [nan] * 6 + [0.5] * 5
    errors = {}
    for device_path in (False, True):
        with pytest.raises(NonFiniteError) as error:
            nan_steps(NonFiniteGuard(3), losses, device_path=device_path, every=10)
        errors[device_path] = str(error.value)
    assert errors[False].startswith("3 non-finite steps in a row")
    assert "at step 3; last finite loss 1.25" in errors[False]
    assert errors[True] == errors[False]
    # ...and the device path did not stop before its check: steps 0..8 run without an error.
    guard = NonFiniteGuard(3)
    nan_steps(guard, losses[:9], device_path=True, every=10)
    assert guard.skipped_steps == 6 and guard.consecutive == 0


def test_bad_limit_names_the_key():
    with pytest.raises(ConfigError, match="guard.max_consecutive_nonfinite=0"):
        NonFiniteGuard(max_consecutive_nonfinite=0)


def test_cli_refuses_a_bad_limit_in_one_line(tmp_path):
    result = run_cli("guard.max_consecutive_nonfinite=0", f"paths.output_dir={tmp_path}")
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: guard.max_consecutive_nonfinite=0 must be an integer >= 1")
    )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run dir left behind


class PoisonImages(Callback):
    """Test-only: from `from_step` on, rank `rank`'s images are NaN (so its loss is NaN)."""

    def __init__(self, rank: int, from_step: int):
        self.rank, self.from_step = rank, from_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.from_step:
            batch["images"] = torch.full(batch["images"].shape, float("nan"))


def test_training_run_stops_after_consecutive_nan_steps_keeping_finite_checkpoints(tmp_path):
    """The CLI on 2 gloo ranks: rank 1's images turn NaN at step 3; steps 3 and 4 are skipped on
    both ranks (checkpoints 3, 4, 5 hold the same weights and optimizer state), step 5 stops."""
    result = run_cli(
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=20",
        "data.batch_size=4",
        "data.num_workers=0",
        "logger=csv",
        "eval.every_n_steps=null",
        "eval.demo_zeroshot=false",
        "trainer.enable_progress_bar=false",
        "guard.max_consecutive_nonfinite=3",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "+callbacks.poison._target_=tests.test_guard.PoisonImages",
        "+callbacks.poison.rank=1",
        "+callbacks.poison.from_step=3",
        f"paths.output_dir={tmp_path}",
        env={"PYTHONPATH": str(REPO_ROOT)},
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors, result.stderr[-3000:]
    assert errors[0].startswith("error: 3 non-finite steps in a row"), errors
    assert "at step 5; last finite loss" in errors[0]
    assert math.isfinite(float(re.search(r"last finite loss (\S+)\.", errors[0]).group(1)))
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").glob("step*.ckpt"))
    assert checkpoints[-1] == "step000005.ckpt", checkpoints  # nothing after the stop
    states = [
        torch.load(tmp_path / "checkpoints" / f"step00000{s}.ckpt", weights_only=False)
        for s in (3, 4, 5)
    ]
    for state in states[1:]:
        for name, value in states[0]["state_dict"].items():
            assert torch.equal(state["state_dict"][name], value), name
            assert torch.isfinite(value).all()
        reference = states[0]["optimizer_states"][0]["state"]
        for index, slots in reference.items():
            for slot, value in slots.items():
                assert torch.equal(state["optimizer_states"][0]["state"][index][slot], value)
    # The counters go into the checkpoints, so a resume continues the streak and the total.
    counters = [state["clipscale_counters"]["guard"] for state in states]
    assert (
        [c["skipped_steps"] for c in counters] == [c["consecutive"] for c in counters] == [0, 1, 2]
    )
    with open(next(tmp_path.glob("csv/metrics.csv"))) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/skipped_steps")]
    assert [float(row["train/skipped_steps"]) for row in rows] == [0, 0, 0, 1, 2]
    # ...and step 3 did train: its weights differ from step 2's.
    step2 = torch.load(tmp_path / "checkpoints" / "step000002.ckpt", weights_only=False)
    assert any(
        not torch.equal(step2["state_dict"][name], value)
        for name, value in states[0]["state_dict"].items()
    )
