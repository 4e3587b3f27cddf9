"""Hard negatives (foil captions) as extra image→text columns: exact against float64 references,
across real gloo ranks, and through gradient caching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from clipscale.gradcache import cached_backward, encode, encode_foils, logit_params
from clipscale.losses import ClipLoss, SigLipLoss
from clipscale.models import build_model
from tests.distributed_utils import run_distributed
from tests.numerics import assert_relative_close

BATCH, FOILS, DIM, WORLD = 8, 3, 16, 2


def inputs(dtype=torch.float64, seed=0):
    """image [B, D], text [B, D], foils [B, F, D] (normalised), a mask with some padding, scale."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(BATCH, DIM, generator=gen, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(BATCH, DIM, generator=gen, dtype=dtype), dim=-1)
    foils = F.normalize(torch.randn(BATCH, FOILS, DIM, generator=gen, dtype=dtype), dim=-1)
    mask = torch.rand(BATCH, FOILS, generator=gen) < 0.6
    mask[0] = True  # at least some foils
    scale = torch.tensor(12.0, dtype=dtype)
    return image, text, foils, mask, scale


def reference_clip(image, text, foils, mask, scale):
    """NegCLIP's loss written out: image rows over [texts; valid foils], text rows over images."""
    keys = torch.cat([text, foils[mask]])  # [N + M, D]
    labels = torch.arange(len(image))
    image_to_text = F.cross_entropy(scale * image @ keys.T, labels, reduction="sum")
    text_to_image = F.cross_entropy(scale * text @ image.T, labels, reduction="sum")
    return (image_to_text + text_to_image) / (2 * len(image))


def reference_siglip(image, text, foils, mask, scale, bias):
    """Sigmoid loss over all N×N pairs plus every (image, valid foil) pair as a negative."""
    logits = scale * image @ text.T + bias
    signs = 2 * torch.eye(len(image), dtype=logits.dtype) - 1
    foil_logits = scale * image @ foils[mask].T + bias
    total = F.logsigmoid(signs * logits).sum() + F.logsigmoid(-foil_logits).sum()
    return -total / len(image)


def grads_of(loss_fn, tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    value = loss_fn(*tensors)
    return value.detach(), torch.autograd.grad(value, tensors)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_clip_loss_with_foils_equals_the_float64_reference(chunk_size):
    image, text, foils, mask, scale = inputs()
    loss = ClipLoss(chunk_size=chunk_size)
    ours = grads_of(lambda i, t, f, s: loss(i, t, s, foils=(f, mask)), [image, text, foils, scale])
    ref = grads_of(lambda i, t, f, s: reference_clip(i, t, f, mask, s), [image, text, foils, scale])
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=0)
    for mine, theirs in zip(ours[1], ref[1], strict=True):
        assert_relative_close(mine, theirs, 1e-10)
    # Padding slots get no gradient; foils change the loss.
    assert torch.all(ours[1][2][~mask] == 0)
    assert not torch.isclose(ours[0], ClipLoss()(image, text, scale))


def test_siglip_loss_with_foils_equals_the_float64_reference():
    image, text, foils, mask, scale = inputs()
    bias = torch.tensor(-3.0, dtype=torch.float64)
    tensors = [image, text, foils, scale, bias]
    ours = grads_of(lambda i, t, f, s, b: SigLipLoss()(i, t, s, b, foils=(f, mask)), tensors)
    ref = grads_of(lambda i, t, f, s, b: reference_siglip(i, t, f, mask, s, b), tensors)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=0)
    for mine, theirs in zip(ours[1], ref[1], strict=True):
        assert_relative_close(mine, theirs, 1e-10)


class Towers(torch.nn.Module):
    """Linear 'encoders' with a learnable scale; foils go through the text encoder."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(DIM, DIM, dtype=torch.float64)
        self.text = torch.nn.Linear(DIM, DIM, dtype=torch.float64)
        self.log_scale = torch.nn.Parameter(torch.tensor(2.5, dtype=torch.float64))

    def forward(self, image, text, foils):
        return (
            F.normalize(self.image(image), dim=-1),
            F.normalize(self.text(text), dim=-1),
            F.normalize(self.text(foils), dim=-1),
            self.log_scale.exp(),
        )


def _ddp_worker(rank: int, world_size: int, chunk_size, out_dir: str) -> None:
    image, text, foils, mask, _ = inputs(seed=5)
    rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    model = DistributedDataParallel(Towers())
    image_f, text_f, foil_f, scale = model(image[rows], text[rows], foils[rows])
    loss = ClipLoss(chunk_size=chunk_size)(image_f, text_f, scale, foils=(foil_f, mask[rows]))
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
    torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_two_ranks_with_foils_give_the_single_process_gradients(tmp_path, chunk_size):
    run_distributed(_ddp_worker, WORLD, chunk_size, str(tmp_path))
    image, text, foils, mask, _ = inputs(seed=5)
    model = Towers()
    image_f, text_f, foil_f, scale = model(image, text, foils)
    reference = reference_clip(image_f, text_f, foil_f, mask, scale)
    reference.backward()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], reference.detach(), rtol=1e-10, atol=0)
        for name, param in model.named_parameters():
            assert_relative_close(result["grads"][name], param.grad, 1e-9, name=f"{rank} {name}")


SOME_FOILS = [[1, 1], [1, 0], [0, 0], [1, 1], [0, 1], [1, 1], [1, 0]]
NO_FOILS = [[0, 0]] * 7  # a global batch without one valid foil: SigLIP adds no foil term


@pytest.mark.parametrize("mask", [SOME_FOILS, NO_FOILS], ids=["some_foils", "no_foils"])
@pytest.mark.parametrize("loss_fn", [ClipLoss(), SigLipLoss()], ids=["clip", "siglip"])
def test_gradient_caching_with_foils_equals_the_full_batch(loss_fn, mask):
    torch.manual_seed(0)
    bias = {"init_logit_bias": -10.0} if isinstance(loss_fn, SigLipLoss) else {}
    model = build_model("clipscale-tiny", patch_dropout=0.25, **bias)  # random layers replay too
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(7, 3, 32, 32, generator=gen)
    texts = torch.randint(1, 49407, (7, 32), generator=gen)
    foil_texts = torch.randint(1, 49407, (7, 2, 32), generator=gen)
    foil_mask = torch.tensor(mask).bool()

    def full_batch():
        torch.manual_seed(3)
        model.zero_grad()
        image_f, text_f = encode(model, images, texts)
        foils = (encode_foils(model, foil_texts), foil_mask)
        loss_fn(image_f, text_f, *logit_params(model), foils=foils).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def cached():
        torch.manual_seed(3)
        model.zero_grad()
        cached_backward(model, images, texts, loss_fn, 3, foils=(foil_texts, foil_mask))
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected, actual = full_batch(), cached()
    assert expected.keys() <= actual.keys()  # cached: zero gradients where foils add nothing
    for name, grad in actual.items():
        assert_relative_close(grad, expected.get(name, torch.zeros_like(grad)), 1e-5, name=name)
