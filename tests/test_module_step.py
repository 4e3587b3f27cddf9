"""The optimizer step of CLIPModule: clipping under fp16 loss scaling, the logged learning rate,
BatchNorm under gradient caching, and per-rank random streams."""

from __future__ import annotations

import json

import lightning as L
import open_clip
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, Dataset

from clipscale.config import ConfigError
from clipscale.models import build_model
from clipscale.module import CLIPModule
from clipscale.train import SeedPerRank


class RandomPairs(Dataset):
    """Fixed random (image, text) pairs as clipscale batch dicts."""

    def __init__(self, length: int = 8, image_size: int = 32, same: bool = False):
        gen = torch.Generator().manual_seed(7)
        count = 1 if same else length
        self.images = torch.randn(count, 3, image_size, image_size, generator=gen)
        self.texts = torch.randint(1, 49407, (count, 32), generator=gen)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = index % len(self.images)
        return {"images": self.images[index], "texts": self.texts[index]}


def make_module(
    lr=1.0, clip=None, warmup=1, model="clipscale-tiny", chunk=None, optimizer=None, **model_cfg
):
    torch.manual_seed(0)
    return CLIPModule(
        model={"name": model, **model_cfg},
        loss={"_target_": "clipscale.losses.ClipLoss"},
        optim={
            "optimizer": optimizer or {"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr},
            "warmup_steps": warmup,
            "grad_clip_norm": clip,
        },
        grad_cache={"chunk_size": chunk},
    )


def fit(module, steps=1, batch_size=8, dataset=None, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    loader = DataLoader(dataset or RandomPairs(), batch_size=batch_size)
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def update(module, before) -> torch.Tensor:
    """The parameter change of one step, flattened (logit_scale left out: it is clamped)."""
    return torch.cat(
        [
            (p.detach() - before[n]).flatten()
            for n, p in module.named_parameters()
            if "logit" not in n
        ]
    )


def test_clipping_bounds_the_true_gradient_under_fp16_loss_scaling():
    reference, scaled = make_module(clip=1.0), make_module(clip=1.0)
    start = {n: p.detach().clone() for n, p in reference.named_parameters()}
    fit(reference, precision="32-true")
    # Lightning turns 16-mixed into bf16 on CPU; a real fp16 loss scaler is given explicitly.
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fit(scaled, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    assert scaler.get_scale() == 1024.0  # the step ran with scaled gradients and was not skipped
    expected, actual = update(reference, start), update(scaled, start)
    # SGD with lr 1: the update is minus the clipped gradient, whose norm is exactly the bound.
    assert expected.norm().item() == pytest.approx(1.0, rel=1e-3)
    assert actual.norm().item() == pytest.approx(expected.norm().item(), rel=0.02)
    cosine = torch.nn.functional.cosine_similarity(actual, expected, dim=0).item()
    assert cosine > 0.99


def test_logged_learning_rate_is_the_rate_of_that_step():
    module = make_module(lr=1e-4, warmup=2)  # warmup: step 0 uses lr / 2
    trainer = fit(module, steps=1)
    assert trainer.callback_metrics["train/lr"].item() == pytest.approx(5e-5)


@pytest.fixture
def tiny_resnet(tmp_path):
    """A 2-stage ModifiedResNet CLIP (BatchNorm layers), registered with open_clip for this test."""
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": {
            "context_length": 32,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    (tmp_path / "clipscale-test-rn.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    return "clipscale-test-rn"


def test_gradient_caching_refuses_batch_norm_models(tiny_resnet):
    with pytest.raises(ConfigError, match=r"BatchNorm2d.*grad_cache.chunk_size=null"):
        make_module(model=tiny_resnet, chunk=4)
    make_module(model=tiny_resnet, chunk=None)  # without caching the model trains as usual


def test_batch_norm_statistics_update_once_per_step_without_caching(tiny_resnet):
    module = make_module(model=tiny_resnet)
    fit(module, steps=1)
    counts = {
        int(m.num_batches_tracked) for m in module.modules() if hasattr(m, "num_batches_tracked")
    }
    assert counts == {1}


class RecordRandomness(L.Callback):
    """Per rank: a checksum of the initial parameters and the patch-dropout output of step 0."""

    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        record = {"params": sum(float(p.double().sum()) for p in pl_module.parameters())}
        trunk = pl_module.model.visual
        with torch.no_grad():
            tokens = trunk.conv1(pl_module.float_images(batch["images"][:1]))  # [1, D, h, w]
            tokens = tokens.flatten(2).transpose(1, 2)
            record["kept"] = trunk.patch_dropout(tokens).sum(dim=-1).tolist()
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_ranks_draw_different_masks_from_identical_initial_weights(tmp_path):
    module = make_module(patch_dropout=0.5)
    callbacks = [SeedPerRank(seed=0), RecordRandomness(tmp_path)]
    fit(
        module,
        batch_size=4,
        dataset=RandomPairs(same=True),
        devices=2,
        strategy="ddp_spawn",
        callbacks=callbacks,
    )
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["params"] == rank1["params"]
    assert rank0["kept"] != rank1["kept"]  # same image, different patches kept


def test_sincos_tiny_differs_from_tiny_only_in_fixed_image_positions():
    """clipscale-tiny-sincos (the compositional demo's model): the same architecture as
    clipscale-tiny but for the image tower's 2-D sin-cos positions, which no seed changes and no
    training step (AdamW with weight decay included) moves."""
    tiny = open_clip.get_model_config("clipscale-tiny")
    sincos = open_clip.get_model_config("clipscale-tiny-sincos")
    assert sincos["vision_cfg"].pop("pos_embed_type") == "sin_cos_2d"
    assert sincos == tiny

    adamw = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2, "weight_decay": 0.5}
    module = make_module(model="clipscale-tiny-sincos", optimizer=adamw)
    positions = module.model.visual.positional_embedding
    torch.manual_seed(123)
    other = build_model("clipscale-tiny-sincos")
    assert torch.equal(other.visual.positional_embedding, positions)  # not drawn from the seed
    before, proj_before = positions.detach().clone(), module.model.visual.proj.detach().clone()
    fit(module, steps=2)
    assert torch.equal(module.model.visual.positional_embedding, before)
    assert not torch.equal(module.model.visual.proj, proj_before)  # the rest of the tower trained
