"""Model FLOPs per training sample and peak device throughput, for the logged MFU estimate."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched against the CUDA
# device name. A device not listed logs achieved TFLOP/s but no MFU.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


@torch.no_grad()
def forward_flops_per_sample(model, image_size: int, context_length: int, device) -> float:
    """FLOPs of encoding one image and one caption (counted by torch's FlopCounterMode)."""
    images = torch.zeros(1, 3, image_size, image_size, device=device)
    texts = torch.zeros(1, context_length, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()  # no patch dropout: count the full sequence, as the re-encoded pass sees it
    with FlopCounterMode(display=False) as counter:
        model.encode_image(images)
        model.encode_text(texts)
    model.train(was_training)
    return float(counter.get_total_flops())


def model_flops_per_sample(forward_flops: float) -> float:
    """Useful training FLOPs of one sample: forward + backward (about twice the forward). This is
    what MFU counts, whatever the implementation recomputes."""
    return 3 * forward_flops


def hardware_flops_per_sample(forward_flops: float, grad_cache: bool) -> float:
    """FLOPs the device actually executes: gradient caching encodes every sample twice (pass 1
    without graph, pass 2 with), so one more forward. HFU counts these."""
    return forward_flops * (4 if grad_cache else 3)


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)
