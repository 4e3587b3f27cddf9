"""grad_cache.stage_on_host: the per-rank batch stays in host memory and each chunk is copied to
the device and normalised when it is encoded, in both passes. On CPU the copy is a no-op, but the
code path (the batch kept as the loader gave it, uint8 chunks prepared one by one) is the same,
forced with stage_on_host=true; the update must equal the resident path's and the plain step's."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from clipscale.module import CLIPModule
from tests.numerics import assert_relative_close

BATCH, CHUNK = 8, 3  # chunks of 3, 3 and 2


class Uint8Pairs(Dataset):
    """Fixed random uint8 images (as a JPEG decoder gives them) and captions."""

    def __init__(self, length: int = BATCH):
        gen = torch.Generator().manual_seed(11)
        self.images = torch.randint(0, 256, (length, 3, 32, 32), generator=gen, dtype=torch.uint8)
        self.texts = torch.randint(1, 49407, (length, 32), generator=gen)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"images": self.images[index], "texts": self.texts[index]}


class RecordingModule(CLIPModule):
    """Records what reaches the step and each chunk preparation (shape and dtype)."""

    def training_step(self, batch, batch_idx):
        self.step_images = batch["images"]
        self.prepared = []
        return super().training_step(batch, batch_idx)

    def _prepare_chunk(self, images, texts):
        self.prepared.append((images.shape[0], images.dtype))
        return super()._prepare_chunk(images, texts)


def make_module(chunk, stage) -> RecordingModule:
    torch.manual_seed(0)
    return RecordingModule(
        model={"name": "clipscale-tiny"},
        loss={"_target_": "clipscale.losses.ClipLoss"},
        optim={
            "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5},
            "warmup_steps": 1,
            "grad_clip_norm": None,
        },
        grad_cache={"chunk_size": chunk, "stage_on_host": stage},
    )


def one_step(chunk, stage) -> tuple[RecordingModule, dict[str, torch.Tensor]]:
    module = make_module(chunk, stage)
    start = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(Uint8Pairs(), batch_size=BATCH))
    update = {n: p.detach() - start[n] for n, p in module.model.named_parameters()}
    return module, update


def test_host_staged_chunks_give_the_resident_and_the_plain_update():
    staged, staged_update = one_step(CHUNK, True)
    resident, resident_update = one_step(CHUNK, False)
    _, plain_update = one_step(None, False)
    assert staged.stages_on_host(torch.device("cpu")) and not resident.stages_on_host(
        torch.device("cpu")
    )
    # The whole batch reached the step as uint8; chunks were prepared one by one, in both passes.
    assert staged.step_images.dtype == torch.uint8
    assert staged.prepared == [(3, torch.uint8), (3, torch.uint8), (2, torch.uint8)] * 2
    for name, expected in resident_update.items():
        torch.testing.assert_close(staged_update[name], expected, rtol=0, atol=0)
        if "logit" not in name:  # logit_scale: its update is clamped
            assert_relative_close(staged_update[name], plain_update[name], 1e-5, name=name)


def test_auto_stages_only_on_cuda_with_gradient_caching():
    module = make_module(CHUNK, "auto")
    assert not module.stages_on_host(torch.device("cpu"))
    assert module.stages_on_host(torch.device("cuda"))  # the decision only; no CUDA needed
    module.chunk_size = None
    assert not module.stages_on_host(torch.device("cuda"))
