"""`data.decode=device`: decode shipped image bytes on the training device, crop, resize.

Why: decoding JPEGs with PIL in the loader workers costs about 2 CPU ms per sample, so a node of
fast GPUs would need ~90 cores for it. With `data.decode=device` the workers only read the tar
members, read each image's header (its size, without decoding) and draw the sample's crop box
from the sample's own seeded RNG (pipeline.py); this module decodes the whole batch where the
model runs (EpochLoader applies `DeviceDecoder` to each batch in the training process, so the
training step and the validation code that iterates `val_dataloader()` both get pixels):

- CUDA: one `torchvision.io.decode_jpeg(list, device="cuda")` call (nvjpeg) for the JPEGs;
- CPU: the same call on CPU tensors (libjpeg-turbo), so the path is tested without a GPU.

Whatever that batch call cannot decode (PNG, WebP, GIF, 16-bit and animated images, and the
JPEGs nvjpeg refuses: CMYK, some progressive files) is decoded on the CPU one image at a time by
the worker path's own decoder (`open_rgb`: PIL, 8-bit RGB, the first frame), so every image kind
the worker path accepts gives the same pixels here; these are counted as `cpu_decoded_samples`
(logged as `train/cpu_decoded_samples`). Bytes no decoder accepts (a truncated body, say) are
dropped from the batch and counted as `skipped.corrupt_image`, as the worker path counts them;
with several ranks the data module then trims every rank to the shortest batch
(WebDataModule.on_after_batch_transfer), so the contrastive batch holds neither padding nor
duplicates and the gathered shapes match. Evaluation (`DeviceTransform`) drops and counts them
the same way (clipscale/eval/datasets.py reports the count with the metrics).

The crop box is the one open_clip's RandomResizedCrop would draw in the worker for the same seed
(`draw_crop`), so both modes crop the same region; only the decoder's and the resampler's
rounding differ (PIL's bicubic resize against torch's antialiased bicubic):
`MEAN_ABS_TOLERANCE` bounds that difference in the tests.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import (
    CenterCrop,
    InterpolationMode,
    Normalize,
    RandomResizedCrop,
    Resize,
)
from torchvision.transforms.v2 import functional as F

from clipscale.models import normalize_images

DECODE_MODES = ("auto", "worker", "device")
# Device output against worker output for the same box, in 0-255 levels. The decoders agree
# exactly here (JPEGs: PIL and torchvision both use libjpeg-turbo, tested; everything else is
# decoded by PIL in both modes); the resamplers do not: PIL's bicubic runs in fixed point with its own rounding, torch's antialiased
# bicubic in float. Measured on smooth test images: mean 0.005, max 2 levels. A box moved by one
# pixel already differs by a mean of ~2 levels, so these bounds do tell boxes apart.
MEAN_ABS_TOLERANCE = 0.25
MAX_ABS_TOLERANCE = 2
JPEG_MAGIC = b"\xff\xd8"


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment; None where that is not found.

    Walking the segment lengths to the SOF marker costs ~3 µs against PIL's ~20 µs for opening
    the file, a tenth of a byte-shipping worker's time per sample.
    """
    if data[:2] != b"\xff\xd8":
        return None
    at, end = 2, len(data)
    while at + 9 <= end:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            return (width, height) if width and height else None
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header alone; ValueError if it is no image PIL can open.

    JPEGs: their SOF segment (`jpeg_size`); other formats: PIL's `open`, which reads only the
    header. Either costs microseconds, not a decode.
    """
    size = jpeg_size(data)
    if size is not None:
        return size
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise ValueError(f"no image header PIL can read ({error})") from error


def open_rgb(data: bytes) -> Image.Image:
    """The image in `data` as 8-bit RGB (an animation's first frame); PIL's error if it cannot.

    16-bit grey keeps its high byte, as PIL does for 16-bit colour: PIL's own conversion clips
    16-bit grey at 255, which turns all but the darkest 0.4% of levels white.
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.mode.startswith("I;16"):
            high_bytes = (np.asarray(image) >> 8).astype(np.uint8)
            return Image.fromarray(high_bytes, "L").convert("RGB")
        return image.convert("RGB")  # forces the full decode, so truncation shows here


def seeded_call(transform: Callable, image, seed: int):
    """`transform(image)` with torch's CPU RNG seeded by `seed`, then restored.

    torchvision's v1 random transforms draw from the global generator; seeding it per sample
    makes the crop a function of the sample's position, whatever ran before in the process.
    """
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators are left alone
    try:
        return transform(image)
    finally:
        torch.set_rng_state(state)


def random_crop_of(transform) -> RandomResizedCrop | None:
    """The RandomResizedCrop that open_clip's train transform starts with, else None."""
    steps = getattr(transform, "transforms", [])
    return steps[0] if steps and isinstance(steps[0], RandomResizedCrop) else None


def _params(crop: RandomResizedCrop, shaped: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in crop.get_params(shaped, crop.scale, crop.ratio))


_generator = torch.Generator()  # per process; reseeded for every sample


def draw_crop(crop: RandomResizedCrop, width: int, height: int, seed: int) -> tuple[int, ...]:
    """(top, left, height, width): the box `crop` draws for a width×height image under `seed`.

    The worker path runs RandomResizedCrop with torch's RNG seeded by the sample's seed
    (`seeded_call`); this makes the same draws, in the same order and float32 precision,
    from a generator seeded alike, without saving and restoring the global RNG state (2.5× faster,
    which matters in a worker that does little else). Bit-identical boxes are tested against
    `crop.get_params`; the rare image where every try misses falls back to that very call.
    """
    _generator.manual_seed(seed)
    area = width * height
    log_ratio = torch.log(torch.tensor(crop.ratio)).tolist()  # float32, as get_params
    draw = torch.empty(1)
    for _ in range(10):
        target_area = area * draw.uniform_(*crop.scale, generator=_generator).item()
        aspect = draw.uniform_(*log_ratio, generator=_generator).exp_().item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=_generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=_generator))
            return top, left, h, w
    return draw_crop_reference(crop, width, height, seed)


def draw_crop_reference(crop: RandomResizedCrop, width: int, height: int, seed: int):
    """`draw_crop` by calling RandomResizedCrop.get_params under the seeded global RNG."""
    shaped = torch.empty(1, 1, 1).expand(1, height, width)  # no memory: only the shape is read
    return seeded_call(lambda image: _params(crop, image), shaped, seed)


def _decode_all(encoded: Sequence[torch.Tensor], device: torch.device):
    """([3, H, W] uint8 on `device`, or None where no decoder accepts the bytes), CPU-decoded count."""
    images: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if bytes(data[:2].tolist()) == JPEG_MAGIC]
    if jpegs:
        try:
            batch = decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpegs, batch, strict=True):
                images[i] = image
        except RuntimeError:
            # One bad file fails the whole call: decode them one by one to find it.
            for i in jpegs:
                with contextlib.suppress(RuntimeError):  # left None: tried below, then dropped
                    images[i] = decode_jpeg(encoded[i], mode=ImageReadMode.RGB, device=device)
    on_cpu = 0
    for i, image in enumerate(images):
        if image is not None:
            continue
        try:
            rgb = open_rgb(encoded[i].numpy().tobytes())
        except Exception:  # noqa: BLE001 - corrupt for every decoder: the caller drops and counts it
            continue
        images[i] = F.pil_to_tensor(rgb).to(device, non_blocking=True)  # [3, H, W] uint8
        on_cpu += 1
    return images, on_cpu


def _resized(
    image: torch.Tensor, box: Sequence[int] | None, size: int, interpolation, squash: bool = False
) -> torch.Tensor:
    """The box resized to size×size (training), or shorter side to `size` + centre crop (eval;
    with `squash`, open_clip's resize_mode=squash, the whole image resized to size×size)."""
    if box is not None:
        top, left, height, width = box
        image = image[:, top : top + height, left : left + width]
        return F.resize(image, [size, size], interpolation=interpolation, antialias=True)
    if squash:
        return F.resize(image, [size, size], interpolation=interpolation, antialias=True)
    image = F.resize(image, size, interpolation=interpolation, antialias=True)
    return F.center_crop(image, [size, size])


def decode_batch(
    encoded: Sequence[torch.Tensor],
    boxes: Sequence[Sequence[int]] | None,
    size: int,
    device: torch.device,
    interpolation: InterpolationMode = InterpolationMode.BICUBIC,
    squash: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(uint8 images [V, 3, size, size] on `device`, valid bool [B], CPU-decoded count).

    `encoded`: B uint8 CPU tensors of file bytes; `boxes`: B (top, left, height, width) crop
    boxes (training), or None for the eval transform (resize the shorter side, centre crop).
    V = valid.sum(): samples whose bytes no decoder accepts are left out, in order.
    """
    images, on_cpu = _decode_all(encoded, torch.device(device))
    valid = torch.tensor([image is not None for image in images], dtype=torch.bool)
    out = [
        _resized(image, None if boxes is None else boxes[i], size, interpolation, squash)
        for i, image in enumerate(images)
        if image is not None
    ]
    if not out:
        return torch.empty(0, 3, size, size, dtype=torch.uint8, device=device), valid, on_cpu
    return torch.stack(out), valid, on_cpu


class DeviceDecoder:
    """Turns a batch of shipped bytes (pipeline.py `batched(encoded=True)`) into a pixel batch.

    Training batches get uint8 images (CLIPModule normalises them, as for worker batches);
    evaluation batches get float images normalised like open_clip's eval transform, since the
    validation code feeds them to the model as they are.
    """

    def __init__(self, transform, device: torch.device) -> None:
        crop = random_crop_of(transform)
        steps = getattr(transform, "transforms", [])
        resize = next((s for s in steps if isinstance(s, Resize | RandomResizedCrop)), None)
        # resize_mode=squash (SigLIP weights): Resize to (size, size) with no crop after it
        self.squash = resize is not None and not isinstance(resize.size, int) and not crop
        centre_crop = any(isinstance(s, CenterCrop) for s in steps)
        if resize is None or not (crop or centre_crop or self.squash):
            raise ValueError(f"data.decode=device cannot reproduce the transform {transform}")
        size = resize.size if isinstance(resize.size, int) else resize.size[0]
        self.size, self.interpolation, self.device = size, resize.interpolation, device
        normalize = next((s for s in steps if isinstance(s, Normalize)), None)
        self.normalize = None if normalize is None else (normalize.mean, normalize.std)

    def __call__(self, batch: dict) -> dict:
        """Decode `batch["encoded"]`; drop the samples that fail (counted as corrupt_image)."""
        if "encoded" not in batch:
            return batch
        batch = dict(batch)
        lengths = batch.pop("encoded_lengths").tolist()
        encoded = torch.split(batch.pop("encoded"), lengths)
        crops = batch.pop("crops", None)
        boxes = None if crops is None else crops.tolist()
        images, valid, on_cpu = decode_batch(
            encoded, boxes, self.size, self.device, self.interpolation, self.squash
        )
        if self.normalize is not None:
            images = normalize_images(images, *self.normalize)
        failed = len(lengths) - int(valid.sum())
        if failed:
            notes = [
                ("corrupt_image", "a data.decode=device batch", key)
                for key, ok in zip(batch["keys"], valid.tolist(), strict=True)
                if not ok
            ]
            batch = keep_samples(batch, valid)
            skipped = dict(batch["skipped"])
            skipped["corrupt_image"] = skipped["corrupt_image"] + failed
            batch["skipped"] = skipped
            batch["skip_notes"] = batch.get("skip_notes", []) + notes
        batch["images"] = images
        batch["cpu_decoded_samples"] = on_cpu  # an int: moving the batch leaves it on the host
        return batch


PER_SAMPLE = ("images", "texts", "keys", "foil_texts", "foil_mask")


def keep_samples(batch: dict, keep: torch.Tensor | int) -> dict:
    """The batch with only the samples `keep` selects: a bool mask [B], or the first `keep`."""
    out = dict(batch)
    for name in PER_SAMPLE:
        if name not in batch:
            continue
        value = batch[name]
        if isinstance(keep, int):
            out[name] = value[:keep]
        elif isinstance(value, list):
            out[name] = [v for v, k in zip(value, keep.tolist(), strict=True) if k]
        else:
            out[name] = value[keep.to(value.device)]
    return out


class DeviceTransform:
    """The eval transform, to be applied by decoding on `device` (evaluation with decode=device).

    Evaluation readers (clipscale/eval/datasets.py) that see one ship each sample's encoded bytes
    and decode the batch with `decode_eval_batch`; code that hands it a PIL image (the
    compositional probe) gets the wrapped PIL transform, so the object stands in for it anywhere.
    """

    def __init__(self, transform, device: torch.device | str) -> None:
        self.transform, self.device = transform, torch.device(device)
        self.decoder = DeviceDecoder(transform, self.device)

    def __call__(self, image):
        return self.transform(image)

    def decode(self, encoded: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float images [V, 3, S, S] on the device, valid bool [B]).

        Samples that no decoder accepts are left out (V = valid.sum()); the evaluation reader
        counts them as `corrupt_image`, as the worker path does.
        """
        decoder = self.decoder
        images, valid, _ = decode_batch(
            encoded, None, decoder.size, self.device, decoder.interpolation, decoder.squash
        )
        return normalize_images(images, *decoder.normalize), valid
