"""Gradient caching on 2 Lightning DDP ranks over several steps equals one process on the global
batch. Lightning turns DDP's gradient sync back on after every training_step; the cached step
reduces the gradients itself, so it must turn the sync off at every step, not only the first."""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from tests.numerics import assert_relative_close
from tests.test_module_ddp import PER_RANK_BATCH, WORLD, FixedPairs, make_module

STEPS = 2
GLOBAL_BATCH = PER_RANK_BATCH * WORLD


class RankShare(Dataset):
    """This rank's share of FixedPairs, step by step: at step s rank r reads the global batch s's
    samples r * B .. (r + 1) * B - 1 (read in the rank's own process; no sampler reorders it)."""

    def __init__(self):
        self.pairs = FixedPairs(GLOBAL_BATCH * STEPS)

    def __len__(self) -> int:
        return PER_RANK_BATCH * STEPS

    def __getitem__(self, index: int) -> dict:
        step, row = divmod(index, PER_RANK_BATCH)
        rank = dist.get_rank() if dist.is_initialized() else 0
        return self.pairs[step * GLOBAL_BATCH + rank * PER_RANK_BATCH + row]


def train(chunk_size: int | None, loader: DataLoader, **trainer_kwargs) -> dict[str, torch.Tensor]:
    """The parameter change of STEPS steps of SGD over `loader`."""
    module = make_module(chunk_size)
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **trainer_kwargs)  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    return {n: p.detach() - before[n] for n, p in module.model.named_parameters()}


def test_two_rank_gradient_caching_equals_the_single_process_over_several_steps():
    single = DataLoader(FixedPairs(GLOBAL_BATCH * STEPS), batch_size=GLOBAL_BATCH)
    expected = train(None, single, devices=1)
    # Chunks of 4 in a per-rank batch of 6; the second step crashed (DDP's sync was back on).
    ranks = DataLoader(RankShare(), batch_size=PER_RANK_BATCH)
    actual = train(4, ranks, devices=WORLD, strategy="ddp_spawn", use_distributed_sampler=False)
    for name, update in expected.items():
        assert_relative_close(actual[name], update, 1e-5, name=name)
