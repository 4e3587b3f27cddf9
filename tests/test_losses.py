"""ClipLoss/SigLipLoss equal open_clip's losses, and stay exact across real gloo ranks."""

from __future__ import annotations

import open_clip.loss
import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from clipscale.losses import ClipLoss, SigLipLoss
from tests.distributed_utils import run_distributed
from tests.numerics import assert_relative_close

GLOBAL_BATCH, DIM, WORLD = 12, 16, 2


def random_features(batch: int, dim: int, seed: int, dtype=torch.float32):
    """L2-normalised image/text features that require grad, and a logit scale."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=gen, dtype=dtype), dim=-1)
    scale = torch.tensor(14.3, dtype=dtype)
    return image.requires_grad_(), text.requires_grad_(), scale.requires_grad_()


def value_and_grads(loss_fn, *inputs):
    loss = loss_fn(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), grads


def test_clip_loss_matches_open_clip_value_and_gradients():
    inputs = random_features(33, DIM, seed=1)
    ours, our_grads = value_and_grads(ClipLoss(), *inputs)
    ref, ref_grads = value_and_grads(open_clip.loss.ClipLoss(), *inputs)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    for mine, theirs in zip(our_grads, ref_grads, strict=True):
        assert_relative_close(mine, theirs, 1e-5)


def test_siglip_loss_matches_open_clip_value_and_gradients():
    image, text, scale = random_features(20, DIM, seed=2)
    bias = torch.tensor(-10.0, requires_grad=True)
    ours, our_grads = value_and_grads(SigLipLoss(), image, text, scale, bias)
    ref, ref_grads = value_and_grads(open_clip.loss.SigLipLoss(), image, text, scale, bias)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    for mine, theirs in zip(our_grads, ref_grads, strict=True):
        assert_relative_close(mine, theirs, 1e-5)


def test_clip_loss_rejects_mismatched_shapes():
    image, text, scale = random_features(8, DIM, seed=3)
    with pytest.raises(ValueError, match=r"\[B, D\].*\(8, 16\) and \(7, 16\)"):
        ClipLoss()(image, text[:7], scale)


class Towers(torch.nn.Module):
    """Two linear 'encoders' and a learnable log-scale: enough parameters to check DDP gradients."""

    def __init__(self, with_bias: bool):
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.image_proj = torch.nn.Parameter(torch.randn(DIM, DIM, generator=gen) / 4)
        self.text_proj = torch.nn.Parameter(torch.randn(DIM, DIM, generator=gen) / 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))
        # Only the sigmoid loss uses a bias; an unused parameter would stall DDP's reduction.
        self.logit_bias = torch.nn.Parameter(torch.tensor(-5.0)) if with_bias else None

    def forward(self, images, texts):
        image = F.normalize(images @ self.image_proj, dim=-1)
        text = F.normalize(texts @ self.text_proj, dim=-1)
        return image, text, self.logit_scale.exp(), self.logit_bias


def global_inputs():
    gen = torch.Generator().manual_seed(11)
    return torch.randn(GLOBAL_BATCH, DIM, generator=gen), torch.randn(
        GLOBAL_BATCH, DIM, generator=gen
    )


def loss_call(loss_name: str, outputs):
    image, text, scale, bias = outputs
    if loss_name == "clip":
        return ClipLoss()(image, text, scale), open_clip.loss.ClipLoss()
    if loss_name == "clip_tiled":  # 6 rows per rank against 12 keys in ragged 5-wide tiles
        return ClipLoss(chunk_size=5)(image, text, scale), open_clip.loss.ClipLoss()
    return SigLipLoss()(image, text, scale, bias), open_clip.loss.SigLipLoss()


def _ddp_worker(rank: int, world_size: int, loss_name: str, out_dir: str) -> None:
    images, texts = global_inputs()
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    model = DistributedDataParallel(Towers(with_bias=loss_name == "siglip"))
    loss, _ = loss_call(loss_name, model(images[rows], texts[rows]))
    loss.backward()  # DDP averages parameter gradients over the ranks
    grads = {
        name: p.grad.clone() for name, p in model.module.named_parameters() if p.grad is not None
    }
    torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("loss_name", ["clip", "clip_tiled", "siglip"])
def test_two_ranks_give_single_process_loss_and_gradients(tmp_path, loss_name):
    run_distributed(_ddp_worker, WORLD, loss_name, str(tmp_path))

    # Reference: one process, the concatenated batch, open_clip's own loss.
    model = Towers(with_bias=loss_name == "siglip")
    image, text, scale, bias = model(*global_inputs())
    _, reference_fn = loss_call(loss_name, (image, text, scale, bias))
    args = (image, text, scale) if loss_name != "siglip" else (image, text, scale, bias)
    reference = reference_fn(*args)
    reference.backward()

    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], reference.detach(), rtol=1e-5, atol=0)
        for name, param in model.named_parameters():
            if param.grad is None:
                continue
            assert_relative_close(
                result["grads"][name], param.grad, 1e-5, name=f"rank{rank} {name}"
            )
