"""grad_cache.stage_on_host: the per-rank batch stays in host memory and each chunk is copied to
the device and normalised when it is encoded, in both passes. On CPU the copy is a no-op, but the
code path (the batch kept as the loader gave it, uint8 chunks prepared one by one) is the same,
forced with stage_on_host=true; the update must equal the resident path's and the plain step's.
Every collective's tensors live on the process group's device, not on the host-staged batch's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from clipscale.data.webdataset import WebDataModule, trim_to_shortest
from clipscale.module import CLIPModule
from tests.distributed_utils import free_port, run_distributed
from tests.numerics import assert_relative_close
from tests.test_data_webdataset import TINY, write_clean_shards

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


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
               "reduce_scatter_tensor", "broadcast")  # fmt: skip


def record_collectives(calls: list[dict]) -> None:
    """Wrap torch.distributed's collectives in this process: each call still runs on the real
    process group, and its name and the devices of its tensors are appended to `calls`."""
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def recording(*args, _original=original, _name=name, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list | tuple) for t in a]
            calls.append({"name": _name, "devices": sorted({str(t.device) for t in tensors})})
            return _original(*args, **kwargs)

        setattr(dist, name, recording)


def _collectives_worker(rank: int, world_size: int, shards: str, folder: str) -> None:
    calls: list[dict] = []
    record_collectives(calls)
    # A host-staged batch on a device that is not the process group's (meta stands in for the
    # CPU under NCCL): ranks with 5 and 3 samples agree on 3.
    size = 5 if rank == 0 else 3
    batch = {"keys": [f"k{i}" for i in range(size)], "images": torch.empty(size, 3, 32, 32,
             device="meta"), "texts": torch.zeros(size, 32, dtype=torch.long)}  # fmt: skip
    trimmed = len(trim_to_shortest(batch)["keys"])
    trim_calls, calls[:] = list(calls), []

    # A training run with host staging forced: Lightning joins the process group made here.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # fmt: skip
    data = WebDataModule(train_shards=shards, resampled=False, batch_size=4, num_workers=0,
                         model_name=TINY, pin_memory=False, persistent_workers=False)  # fmt: skip
    module = make_module(3, True)
    trainer = L.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", max_steps=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    result = {"trimmed": trimmed, "trim_calls": trim_calls, "fit_calls": calls,
              "staged": module.stages_on_host(module.device), "device": str(module.device),
              "batch_device": str(module.step_images.device)}  # fmt: skip
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))


def test_every_collective_uses_the_process_group_device_under_host_staging(tmp_path):
    write_clean_shards(tmp_path, shards=2, per_shard=9)  # 9 samples a rank: 2 batches of 4
    run_distributed(_collectives_worker, 2, str(tmp_path / "{0000..0001}.tar"), str(tmp_path))
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # The count trim_to_shortest reduces is made on the group's device (gloo: the CPU).
        assert result["trimmed"] == 3
        assert result["trim_calls"] == [{"name": "all_reduce", "devices": ["cpu"]}]
        # The run: host staging was on, and every collective's tensors were on the module's device.
        assert result["staged"] and result["batch_device"] == "cpu"
        assert result["fit_calls"], "no collective was recorded"
        assert {"all_reduce"} <= {call["name"] for call in result["fit_calls"]}
        for call in result["fit_calls"]:
            assert call["devices"] in ([], [result["device"]]), call
