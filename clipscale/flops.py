"""Training FLOPs per sample, counted by torch's FlopCounterMode, and peak device throughput.

The counts are taken once, on one image and one caption pushed through the encoders of the
trained architecture (a copy on the meta device: shapes only, nothing allocated, the trained model
untouched), in training mode, so patch dropout encodes the tokens it keeps. A step then costs, per
sample, one image plus (1 + foils) captions, since hard-negative foil captions go through the text
encoder like captions. The loss's similarity matmuls are left out: about 12·N·D FLOPs per sample
for N pairs of D dims, under 1% of the encoders for ViT-B/32 at N = 32k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipscale.towers import IMAGE, TEXT, keep_locked_in_eval

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched against the CUDA
# device name. A device not listed logs achieved TFLOP/s but no MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


@dataclass(frozen=True)
class EncoderFlops:
    """FLOPs of one image through the image encoder and of one caption through the text encoder."""

    image: float
    text: float

    def per_sample(self, foils: int) -> float:
        """One image, its caption and `foils` hard-negative captions."""
        return self.image + (1 + foils) * self.text


@dataclass(frozen=True)
class StepFlops:
    """Per-sample FLOPs of a training step: the useful work (what MFU counts) and the executed
    work (what HFU counts: gradient checkpointing and gradient caching encode twice)."""

    training: EncoderFlops  # forward + backward without recomputation
    executed: EncoderFlops  # forward + backward as the model runs it (checkpointing recomputes)
    # what gradient caching adds: one forward without graph (its first pass) of each trained
    # tower; a locked tower is encoded once, in that pass (zeros without gradient caching)
    reencoded: EncoderFlops

    def model(self, foils: int = 0) -> float:
        """Useful FLOPs of one sample with `foils` foil captions: forward and backward once."""
        return self.training.per_sample(foils)

    def hardware(self, foils: int = 0) -> float:
        """FLOPs the device executes for one sample with `foils` foil captions."""
        return self.executed.per_sample(foils) + self.reencoded.per_sample(foils)


def counted_flops(run: Callable[[], None]) -> float:
    """The FLOPs that FlopCounterMode counts while `run()` executes."""
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def encoder_flops(model, backward: bool) -> EncoderFlops:
    """FLOPs of encoding one image and one caption with `model` (forward, or forward + backward)."""
    device = next(model.parameters()).device
    size = model.visual.image_size  # an int (ResNet) or (height, width) (ViT)
    height, width = (size, size) if isinstance(size, int) else size
    # Two samples, halved: BatchNorm refuses a batch of one in training mode (FLOPs are linear in
    # the batch: every counted operation is a matmul or convolution over the samples).
    images = torch.zeros(2, 3, height, width, device=device)
    texts = torch.zeros(2, model.context_length, dtype=torch.long, device=device)

    def run(encode, inputs) -> Callable[[], None]:
        def step() -> None:
            features = encode(inputs)
            if backward and features.requires_grad:  # a locked tower has nothing to train
                features.sum().backward()

        return step

    return EncoderFlops(
        counted_flops(run(model.encode_image, images)) / 2,
        counted_flops(run(model.encode_text, texts)) / 2,
    )


def step_flops(
    model, grad_checkpointing: bool, grad_cache: bool, locked: frozenset[str] = frozenset()
) -> StepFlops:
    """Count a training step's per-sample FLOPs on `model`, a copy of the trained architecture on
    the meta device (built without gradient checkpointing; it is switched on here for the count
    of what runs), its towers locked as in training (`locked`: those with nothing to train)."""
    model.train()  # patch dropout keeps its share of the tokens, as in every training pass
    keep_locked_in_eval(model, locked)  # as CLIPModule.train leaves them
    # tensors open_clip makes inside the encoders (patch dropout's scores) on the model's device
    with torch.device(next(model.parameters()).device):
        forward = encoder_flops(model, backward=False)
        training = encoder_flops(model, backward=True)
        executed = training
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
            executed = encoder_flops(model, backward=True)
    reencoded = EncoderFlops(
        forward.image * (grad_cache and IMAGE not in locked),
        forward.text * (grad_cache and TEXT not in locked),
    )
    return StepFlops(training, executed, reencoded)


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
