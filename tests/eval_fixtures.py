"""Helpers that write tiny evaluation datasets in clip_benchmark's webdataset layout.

Images are the demo's procedurally drawn shapes (clipscale.data.synthetic), so datasets are
deterministic and need no download. Used by the evaluation tests.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import torch

from clipscale.data.synthetic import CLASSNAMES, TEMPLATES, draw_sample


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"].decode()
            for ext, payload in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _write_split(root: Path, samples: list[dict[str, bytes]], per_shard: int, split="test"):
    (root / split).mkdir(parents=True, exist_ok=True)
    shards = [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]
    for number, shard in enumerate(shards):
        _write_tar(root / split / f"{number}.tar", shard)
    (root / split / "nshards.txt").write_text(f"{len(shards)}\n")


def write_classification_dataset(
    root: Path, num_samples: int, seed: int = 0, per_shard: int = 50, templates=TEMPLATES
) -> Path:
    """A zero-shot dataset of drawn shapes: class = '<colour> <shape>' (24 classes)."""
    samples = []
    for index in range(num_samples):
        image, _, label = draw_sample(seed, "val", index)
        samples.append(
            {
                "__key__": f"s{index:06d}".encode(),
                "png": _png_bytes(image),
                "cls": str(label).encode(),
            }
        )
    _write_split(root, samples, per_shard)
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def write_retrieval_dataset(
    root: Path, num_images: int, captions_per_image: int = 2, seed: int = 0, per_shard: int = 40
) -> Path:
    """A retrieval dataset: each drawn image with `captions_per_image` caption lines in txt."""
    samples = []
    for index in range(num_images):
        image, caption, label = draw_sample(seed, "val", index)
        # Numbered so that no two images share a caption: exact ties would make the comparison
        # with clip_benchmark depend on its top-k tie order rather than on the metric.
        variants = [
            f"{caption}, picture {index}",
            f"an image of a {CLASSNAMES[label]}, picture {index}",
            f"the {CLASSNAMES[label]} of picture {index}",
        ]
        captions = "\n".join(variants[:captions_per_image])
        samples.append(
            {
                "__key__": f"r{index:06d}".encode(),
                "png": _png_bytes(image),
                "txt": captions.encode(),
            }
        )
    _write_split(root, samples, per_shard)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def write_lightning_checkpoint(path: Path, model: torch.nn.Module, model_name: str) -> Path:
    """A checkpoint in CLIPModule's format (state_dict `model.*`, hyper_parameters.model.name)."""
    state_dict = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {"state_dict": state_dict, "hyper_parameters": {"model": {"name": model_name}}}, path
    )
    return path
