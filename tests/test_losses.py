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

    def forward(self, images, texts, foil_texts=None):
        image = F.normalize(images @ self.image_proj, dim=-1)
        text = F.normalize(texts @ self.text_proj, dim=-1)
        foils = None
        if foil_texts is not None:  # [B, F, DIM] through the text tower
            foils = F.normalize(foil_texts @ self.text_proj, dim=-1)
        return image, text, self.logit_scale.exp(), self.logit_bias, foils


def global_inputs():
    gen = torch.Generator().manual_seed(11)
    images = torch.randn(GLOBAL_BATCH, DIM, generator=gen)
    texts = torch.randn(GLOBAL_BATCH, DIM, generator=gen)
    foil_texts = torch.randn(GLOBAL_BATCH, 2, DIM, generator=gen)
    # Ragged valid foils: rank 0 keeps 5 of its 12 slots, rank 1 keeps 3.
    foil_mask = torch.zeros(GLOBAL_BATCH, 2, dtype=torch.bool)
    foil_mask[[0, 1, 3, 4, 5], [0, 1, 0, 0, 1]] = True
    foil_mask[[7, 9, 11], [1, 0, 0]] = True
    return images, texts, foil_texts, foil_mask


# Every loss setting that runs on CPU: (family, loss kwargs, with foils). On CPU, auto with a
# chunk_size runs the PyTorch tiles; "triton" runs in Triton's interpreter (TRITON_INTERPRET=1).
# Chunks of 5 make ragged tiles of the 6 local rows against 12 (+ foil) keys.
_SETTINGS = [
    ("dense", {}, False),
    ("auto_chunk5", {"chunk_size": 5}, False),
    ("torch_chunk5", {"chunk_size": 5, "kernel": "torch"}, False),
    ("triton", {"kernel": "triton"}, False),
    ("dense_foils", {}, True),
    ("torch_chunk5_foils", {"chunk_size": 5, "kernel": "torch"}, True),
    ("triton_foils", {"kernel": "triton"}, True),
]
SETTINGS = {"clip": _SETTINGS, "siglip": _SETTINGS}


def loss_value(family: str, kwargs: dict, outputs, foils_mask=None):
    """clipscale's loss for (image, text, scale, bias, foil features) with optional foils."""
    image, text, scale, bias, foil_features = outputs
    foils = None if foil_features is None else (foil_features, foils_mask)
    if family == "clip":
        return ClipLoss(**kwargs)(image, text, scale, foils=foils)
    return SigLipLoss(**kwargs)(image, text, scale, bias, foils=foils)


def _ddp_worker(rank: int, world_size: int, family: str, out_dir: str) -> None:
    images, texts, foil_texts, foil_mask = global_inputs()
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    results = {}
    for name, kwargs, with_foils in SETTINGS[family]:
        model = DistributedDataParallel(Towers(with_bias=family == "siglip"))
        outputs = model(images[rows], texts[rows], foil_texts[rows] if with_foils else None)
        loss = loss_value(family, kwargs, outputs, foil_mask[rows])
        loss.backward()  # DDP averages parameter gradients over the ranks
        grads = {
            n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None
        }
        results[name] = {"loss": loss.detach(), "grads": grads}
    torch.save(results, f"{out_dir}/rank{rank}.pt")


# float32 ranks against a float64 reference. d loss/d bias = (1/N) Σ_ij (sigmoid(x_ij) − z'_ij)
# cancels: 144 sigmoids of ~0.1 minus 12 ones leave 0.05, so float32 rounding of the terms
# (~1e-7 each) is ~3e-5 of the result; open_clip's own float32 loss is off by as much.
GRAD_TOL = {"image_proj": 1e-5, "text_proj": 1e-5, "logit_scale": 1e-5, "logit_bias": 1e-4}


def single_process_reference(family: str, with_foils: bool):
    """Loss and gradients from one process on the concatenated batch, in float64.

    Without foils the loss is open_clip's own; with foils (open_clip has none) it is clipscale's
    dense loss, which test_*_foils_match_float64_formula checks against explicit float64 math.
    """
    images, texts, foil_texts, foil_mask = global_inputs()
    images, texts, foil_texts = images.double(), texts.double(), foil_texts.double()
    model = Towers(with_bias=family == "siglip").double()
    image, text, scale, bias, foils = model(images, texts, foil_texts if with_foils else None)
    if with_foils:
        loss = loss_value(family, {}, (image, text, scale, bias, foils), foil_mask)
    elif family == "clip":
        loss = open_clip.loss.ClipLoss()(image, text, scale)
    else:
        loss = open_clip.loss.SigLipLoss()(image, text, scale, bias)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_two_ranks_give_single_process_loss_and_gradients(tmp_path, monkeypatch, family):
    # The spawned ranks define the Triton kernels at import; the interpreter runs them on CPU.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    run_distributed(_ddp_worker, WORLD, family, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]

    for name, _, with_foils in SETTINGS[family]:
        reference, reference_grads = single_process_reference(family, with_foils)
        for rank in range(WORLD):
            result = results[rank][name]
            where = f"{name} rank{rank}"
            assert_relative_close(result["loss"], reference, 1e-6, name=where)
            assert result["grads"].keys() == reference_grads.keys(), where
            for param_name, grad in reference_grads.items():
                assert_relative_close(
                    result["grads"][param_name], grad, GRAD_TOL[param_name], f"{where} {param_name}"
                )


def float64_sigmoid_formula(image, text, scale, bias, foils):
    """−(1/N) Σ log sigmoid(z·(s·x·y + b)) over pairs and foil pairs, written out in float64."""
    image, text, foils = image.double(), text.double(), foils.double()
    logits = scale.double() * image @ text.T + bias.double()
    z = 2 * torch.eye(len(image), dtype=torch.float64) - 1
    foil_logits = scale.double() * image @ foils.T + bias.double()
    return -(F.logsigmoid(z * logits).sum() + F.logsigmoid(-foil_logits).sum()) / len(image)


def float64_clip_formula(image, text, scale, foils):
    """Symmetric InfoNCE with foils as extra image→text columns, written out in float64."""
    image, text, foils = image.double(), text.double(), foils.double()
    targets = torch.arange(len(image))
    image_logits = scale.double() * image @ torch.cat([text, foils]).T
    text_logits = scale.double() * text @ image.T
    return (F.cross_entropy(image_logits, targets) + F.cross_entropy(text_logits, targets)) / 2


@pytest.mark.parametrize("kwargs", [{}, {"chunk_size": 4, "kernel": "torch"}, {"chunk_size": 64}])
def test_siglip_dense_and_tiled_equal_open_clip_in_float64(kwargs):
    image, text, scale = random_features(13, DIM, seed=4, dtype=torch.float64)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    inputs = (image, text, scale, bias)
    ours, our_grads = value_and_grads(SigLipLoss(**kwargs), *inputs)
    ref, ref_grads = value_and_grads(open_clip.loss.SigLipLoss(), *inputs)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    for mine, theirs in zip(our_grads, ref_grads, strict=True):
        assert_relative_close(mine, theirs, 1e-10)


@pytest.mark.parametrize("kwargs", [{}, {"chunk_size": 3, "kernel": "torch"}])
def test_foils_match_float64_formula(kwargs):
    image, text, scale = random_features(7, DIM, seed=5, dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(6)
    foil_features = F.normalize(torch.randn(7, 3, DIM, generator=gen, dtype=torch.float64), dim=-1)
    foil_mask = torch.rand(7, 3, generator=gen) < 0.5
    valid = foil_features[foil_mask].requires_grad_()  # the formula's input: only valid foils
    cases = [
        (SigLipLoss(**kwargs), (image, text, scale, bias), float64_sigmoid_formula),
        (ClipLoss(**kwargs), (image, text, scale), float64_clip_formula),
    ]
    for loss_fn, inputs, formula in cases:
        padded = torch.zeros_like(foil_features).index_put((foil_mask,), valid)
        ours = loss_fn(*inputs, foils=(padded, foil_mask))
        expected = formula(*inputs, valid)
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
        wrt = (*inputs, valid)
        for mine, theirs in zip(
            torch.autograd.grad(ours, wrt), torch.autograd.grad(expected, wrt), strict=True
        ):
            assert_relative_close(mine, theirs, 1e-10)


def test_float64_tiled_clip_loss_equals_open_clip_to_float64_precision():
    inputs = random_features(21, DIM, seed=7, dtype=torch.float64)
    ours, our_grads = value_and_grads(ClipLoss(chunk_size=4, kernel="torch"), *inputs)
    ref, ref_grads = value_and_grads(open_clip.loss.ClipLoss(), *inputs)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    for mine, theirs in zip(our_grads, ref_grads, strict=True):
        assert_relative_close(mine, theirs, 1e-10)


@pytest.mark.parametrize("loss_class", [ClipLoss, SigLipLoss])
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel": "cuda"}, r"loss.kernel='cuda' is unknown; choose one of auto, torch, triton"),
        ({"chunk_size": 0}, r"loss.chunk_size must be a positive integer or null, got 0"),
        ({"chunk_size": 2.5}, r"loss.chunk_size must be a positive integer or null, got 2.5"),
    ],
)
def test_bad_loss_options_fail_at_construction(loss_class, kwargs, message):
    with pytest.raises(ValueError, match=message):
        loss_class(**kwargs)


def test_triton_on_cpu_without_the_interpreter_names_the_key_and_the_fixes():
    from clipscale.triton_loss import available

    image, text, scale = random_features(4, DIM, seed=8)
    if available(image)[0]:
        pytest.skip("this process loaded the Triton kernels under TRITON_INTERPRET=1")
    with pytest.raises(
        ValueError, match=r"loss.kernel=triton.*loss.kernel=auto.*TRITON_INTERPRET=1"
    ):
        ClipLoss(kernel="triton")(image, text, scale)
    with pytest.raises(ValueError, match=r"loss.kernel=triton"):
        SigLipLoss(kernel="triton")(image, text, scale, torch.tensor(-1.0))


def test_mismatched_feature_dtypes_and_devices_are_named():
    image, text, scale = random_features(4, DIM, seed=9)
    with pytest.raises(ValueError, match=r"image_features are torch.float32 but text_features"):
        ClipLoss(chunk_size=2)(image, text.double(), scale)
    with pytest.raises(ValueError, match=r"one device, got cpu, meta and cpu"):
        SigLipLoss()(image, text.to("meta"), scale, torch.tensor(-1.0))
