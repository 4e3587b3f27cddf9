"""How a step's images and texts reach the device: uint8 normalised there, and host staging.

Loaders may send uint8 images (a quarter of float32's bytes to move between processes): they are
normalised on the device, as open_clip's ToTensor + Normalize compute. With gradient caching
(grad_cache.stage_on_host: auto means on CUDA) a batch's images and texts stay in host memory,
page-locked, and each chunk is copied to the device when it is encoded, in both passes, so the
device never holds the whole batch.
"""

from __future__ import annotations

import torch

from clipscale.models import normalize_images

STAGED_KEYS = ("images", "texts")  # what stays on the host; foils and masks move as usual


class ImageNormalizer:
    """uint8 images -> normalised float on their device; float images pass unchanged. Mean and std
    are kept on the device: built from lists per call they would cost a copy per chunk."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std
        self._on_device: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        if self._on_device is None or self._on_device[0].device != images.device:
            self._on_device = tuple(
                torch.tensor(value, device=images.device) for value in (self.mean, self.std)
            )
        return normalize_images(images, *self._on_device)


def chunk_to_device(images, texts, device: torch.device, normalize: ImageNormalizer):
    """A chunk as the encoder takes it: on `device` (a no-op when it is there; a non-blocking copy
    from pinned memory when staged), images normalised. A None (a locked tower that gradient
    caching does not re-encode) stays None."""
    if images is not None:
        images = normalize(images.to(device, non_blocking=True))
    return images, None if texts is None else texts.to(device, non_blocking=True)


def stages_on_host(chunk_size, stage_on_host, device: torch.device) -> bool:
    """grad_cache.stage_on_host for this run: auto means on CUDA with gradient caching."""
    if chunk_size is None or stage_on_host is False:
        return False
    return stage_on_host is True or device.type == "cuda"


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor in page-locked memory (copied there once if it is not); others unchanged."""
    return tensor.pin_memory() if tensor.device.type == "cpu" and not tensor.is_pinned() else tensor


def split_staged(batch: dict, device: torch.device) -> tuple[dict, dict]:
    """(what stays on the host, the rest to move): images and texts, pinned for a CUDA device so
    that each chunk's copy is asynchronous."""
    staged = {key: batch[key] for key in STAGED_KEYS if key in batch}
    if device.type == "cuda":
        staged = {key: pinned(value) for key, value in staged.items()}
    return staged, {key: value for key, value in batch.items() if key not in staged}
