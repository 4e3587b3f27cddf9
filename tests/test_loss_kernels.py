"""loss.kernel dispatch: ClipLoss/SigLipLoss(kernel="triton") against float64, in Triton's interpreter.

TRITON_INTERPRET=1 must be set before the kernels are defined, so the losses run in one child
process (`python -m tests.test_loss_kernels OUTPUT`) that writes values and gradients; the tests
here compare them with float64 formulas computed in this process. (The 2-rank gloo equivalence
of every kernel setting is in tests/test_losses.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import open_clip.loss
import pytest
import torch
import torch.nn.functional as F

from clipscale.losses import ClipLoss, select_backend
from tests.numerics import assert_relative_close
from tests.test_losses import float64_clip_formula, float64_sigmoid_formula

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH, DIM = 20, 40  # D=40 is padded to the kernel's 64-wide block


def make_inputs(dtype=torch.float64):
    """Features, scale, bias, and foils with a ragged validity mask (as a data batch has)."""
    gen = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(image + torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64), dim=-1)
    foils = F.normalize(torch.randn(BATCH, 2, DIM, generator=gen, dtype=torch.float64), dim=-1)
    mask = torch.rand(BATCH, 2, generator=gen) < 0.4
    scale, bias = torch.tensor(20.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    return [t.to(dtype) for t in (image, text, scale, bias)], foils.to(dtype), mask


def child(output: str) -> None:
    """Runs under TRITON_INTERPRET=1: every dispatch case, values and gradients to `output`."""
    from clipscale.losses import SigLipLoss

    results = {}
    cases = {
        "clip_triton": (ClipLoss(kernel="triton"), None),
        "clip_triton_fp16_autocast": (ClipLoss(kernel="triton", chunk_size=8), torch.float16),
        "siglip_triton": (SigLipLoss(kernel="triton", chunk_size=7), None),
    }
    for name, (loss_fn, autocast_dtype) in cases.items():
        (image, text, scale, bias), foils, mask = make_inputs(torch.float32)
        valid = foils[mask].requires_grad_()
        leaves = [image, text, scale, bias, valid]
        for leaf in leaves[:4]:
            leaf.requires_grad_()
        padded = torch.zeros_like(foils).index_put((mask,), valid)
        args = (image, text, scale) if isinstance(loss_fn, ClipLoss) else (image, text, scale, bias)
        with torch.autocast(
            "cpu", dtype=autocast_dtype or torch.float16, enabled=bool(autocast_dtype)
        ):
            loss = loss_fn(*args, foils=(padded, mask))
        loss.backward()
        results[name] = {"loss": loss.detach(), "grads": [leaf.grad for leaf in leaves]}
    features = torch.zeros(4, 8)
    results["auto_on_cpu"] = select_backend("auto", 8, features)  # interpreter or not: tiles
    try:
        ClipLoss(kernel="triton")(torch.zeros(4, 1100), torch.zeros(4, 1100), torch.tensor(1.0))
    except ValueError as error:
        results["wide_error"] = str(error)
    torch.save(results, output)


@pytest.fixture(scope="module")
def child_results(tmp_path_factory):
    output = tmp_path_factory.mktemp("kernels") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run(
        [sys.executable, "-m", "tests.test_loss_kernels", str(output)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(output)


def float64_reference(loss_name: str):
    """Value and gradients (image, text, scale, bias, valid foils) of the float64 formula."""
    (image, text, scale, bias), foils, mask = make_inputs()
    valid = foils[mask]
    leaves = [t.clone().requires_grad_() for t in (image, text, scale, bias, valid)]
    if loss_name == "clip":
        loss = float64_clip_formula(leaves[0], leaves[1], leaves[2], leaves[4])
    else:
        loss = float64_sigmoid_formula(*leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), grads


@pytest.mark.parametrize("name", ["clip_triton", "siglip_triton"])
def test_triton_kernel_through_the_losses_matches_float64_with_foils(child_results, name):
    result = child_results[name]
    expected, expected_grads = float64_reference(name.split("_")[0])
    assert_relative_close(result["loss"], expected, 1e-6, name)
    for index, (got, want) in enumerate(zip(result["grads"], expected_grads, strict=True)):
        if want is None:  # ClipLoss has no bias
            assert got is None
            continue
        # float32 IEEE dot products in the kernel; d bias cancels (see test_losses.GRAD_TOL).
        assert_relative_close(got, want, 1e-4 if index == 3 else 1e-5, f"{name} input {index}")


def test_triton_kernel_under_fp16_autocast_stays_within_half_precision_of_float64(child_results):
    result = child_results["clip_triton_fp16_autocast"]
    expected, expected_grads = float64_reference("clip")
    # fp16 keeps 11 significant bits: products off by ≤ 2^-11 · 20 in logit.
    assert_relative_close(result["loss"], expected, 1e-3, "loss")
    for got, want in zip(result["grads"][:2], expected_grads[:2], strict=True):
        assert got.dtype == torch.float32  # float32 in, float32 out; fp16 only inside
        assert F.cosine_similarity(got.double().flatten(), want.flatten(), dim=0) >= 0.999


def test_auto_keeps_pytorch_tiles_on_cpu_even_under_the_interpreter(child_results):
    assert child_results["auto_on_cpu"] == "tiles"


def test_triton_refuses_embeddings_wider_than_the_kernel(child_results):
    assert "loss.kernel=triton supports embeddings up to D=1024" in child_results["wide_error"]
    assert "loss.kernel=torch" in child_results["wide_error"]


def test_backend_selection_without_a_gpu():
    features = torch.zeros(4, 8)
    assert select_backend("auto", None, features) == "dense"
    assert select_backend("auto", 16, features) == "tiles"
    assert select_backend("torch", None, features) == "dense"
    assert select_backend("torch", 16, features) == "tiles"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_uses_the_kernel_on_cuda_and_matches_float64():
    (image, text, scale, _), _, _ = make_inputs(torch.float32)
    image, text, scale = (t.cuda().requires_grad_() for t in (image, text, scale))
    assert select_backend("auto", 8, image) == "triton"
    assert select_backend("auto", 8, image.double()) == "tiles"  # the kernel has no float64
    loss = ClipLoss(chunk_size=8)(image, text, scale)
    loss.backward()
    reference_inputs = [t.detach().cpu().double().requires_grad_() for t in (image, text, scale)]
    expected = open_clip.loss.ClipLoss()(*reference_inputs)
    expected_grads = torch.autograd.grad(expected, reference_inputs[:2])
    assert_relative_close(loss.cpu(), expected.detach(), 1e-5, "loss")
    for got, want in zip((image.grad, text.grad), expected_grads, strict=True):
        assert_relative_close(got.cpu(), want, 1e-4, "grad")  # TF32 may be on for other ops


if __name__ == "__main__":
    child(sys.argv[1])
