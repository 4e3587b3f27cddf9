"""One optimizer step of the real CLIPModule on 2 Lightning DDP ranks equals one step in one process."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from clipscale.module import CLIPModule
from tests.numerics import assert_relative_close

PER_RANK_BATCH, WORLD = 6, 2


class FixedPairs(Dataset):
    """2 × 6 fixed random (image, text) pairs as clipscale batch dicts."""

    def __init__(self, length: int = PER_RANK_BATCH * WORLD):
        gen = torch.Generator().manual_seed(42)
        self.images = torch.randn(length, 3, 32, 32, generator=gen)
        self.texts = torch.randint(1, 49407, (length, 32), generator=gen)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"images": self.images[index], "texts": self.texts[index]}


def make_module(chunk_size: int | None) -> CLIPModule:
    """The tiny model with plain SGD (a step proportional to the gradient, unlike Adam's first step)."""
    torch.manual_seed(0)
    return CLIPModule(
        model={"name": "clipscale-tiny"},
        loss={"_target_": "clipscale.losses.ClipLoss"},
        optim={
            "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5},
            "warmup_steps": 1,
            "grad_clip_norm": None,
        },
        grad_cache={"chunk_size": chunk_size},
    )


def one_step(module: CLIPModule, batch_size: int, **trainer_kwargs) -> dict[str, torch.Tensor]:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    loader = DataLoader(FixedPairs(), batch_size=batch_size, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return {name: p.detach().clone() for name, p in module.model.named_parameters()}


@pytest.fixture(scope="module")
def single_process_step() -> tuple[dict, dict]:
    """Reference: one process, the concatenated 12-sample batch, no gradient caching."""
    module = make_module(None)
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    return before, one_step(module, PER_RANK_BATCH * WORLD, devices=1)


@pytest.mark.parametrize("chunk_size", [None, 4])  # 4 does not divide the per-rank batch of 6
def test_two_rank_ddp_step_equals_single_process_step(single_process_step, chunk_size):
    before, expected = single_process_step
    # ddp_spawn: Lightning starts 2 gloo processes; rank r reads samples r, r+2, ... (DistributedSampler)
    after = one_step(make_module(chunk_size), PER_RANK_BATCH, devices=WORLD, strategy="ddp_spawn")
    for name, param in expected.items():
        # Compare the updates (after − before): parameters barely move relative to their size.
        assert_relative_close(after[name] - before[name], param - before[name], 1e-5, name=name)
