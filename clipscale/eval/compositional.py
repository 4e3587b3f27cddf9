"""Compositional probe: does the true caption beat every foil of its image?

A probe dataset is a folder holding `probe.jsonl` and the images it names. Each line is

    {"image": "<path relative to the folder>", "caption": "...", "foils": ["...", ...],
     "type": "<kind>"}

(other fields, such as the built-in probe's `scene`, are ignored). A sample is correct when the
cosine of the image with its caption is strictly above its cosine with every foil: a tie, or a
NaN/inf score, is a failure. Reported per `type` and `overall`, each with its chance level
`<type>_chance` = the mean of 1 / (1 + number of foils), and `<type>_num_samples`. Ranks score
samples i = rank (mod world size) and sum their counts, so every rank gets the single-process
numbers. `python -m clipscale.data.probe` writes the built-in two-object probe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from clipscale.distributed import all_reduce_sum, rank, world_size

PROBE_FILE = "probe.jsonl"


@dataclass(frozen=True)
class ProbeSample:
    """One probe line: an image path, its true caption, its foils and its type."""

    image: Path
    caption: str
    foils: tuple[str, ...]
    type: str


def _field(record: dict, name: str, where: str):
    if name not in record:
        raise ValueError(f"{where}: field {name!r} is missing")
    return record[name]


def read_probe(root: str | Path) -> list[ProbeSample]:
    """Every sample of `root/probe.jsonl`; a bad line is refused naming its number and field."""
    root = Path(root)
    path = root / PROBE_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"compositional dataset {str(root)!r} has no {PROBE_FILE}; write one JSON object a "
            'line: {"image", "caption", "foils", "type"} (python -m clipscale.data.probe '
            "--output DIR writes the built-in probe)"
        )
    samples = []
    for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        image = _field(record, "image", where)
        caption = _field(record, "caption", where)
        foils = _field(record, "foils", where)
        kind = _field(record, "type", where)
        if not isinstance(image, str) or not (root / image).is_file():
            raise ValueError(f"{where}: field 'image' = {image!r} is not a file under {root}")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{where}: field 'caption' must be a non-empty string")
        if not isinstance(foils, list) or not foils:
            raise ValueError(f"{where}: field 'foils' must be a non-empty list of captions")
        if not all(isinstance(f, str) and f.strip() for f in foils):
            raise ValueError(f"{where}: field 'foils' holds an empty or non-string caption")
        if not isinstance(kind, str) or not kind.strip() or kind in ("overall", "num_samples"):
            raise ValueError(f"{where}: field 'type' must be a name (not 'overall'), got {kind!r}")
        samples.append(ProbeSample(root / image, caption, tuple(foils), kind))
    if not samples:
        raise ValueError(f"{path} holds no samples")
    return samples


def caption_beats_foils(caption_scores: torch.Tensor, foil_scores: torch.Tensor, foil_mask):
    """Per-sample bool [N]: caption score [N] strictly above every real foil score [N, F]."""
    best_foil = foil_scores.masked_fill(~foil_mask, float("-inf")).amax(dim=1)  # [N]
    finite = torch.isfinite(caption_scores) & torch.isfinite(foil_scores).logical_or(
        ~foil_mask
    ).all(1)
    return (caption_scores > best_foil) & finite


@torch.no_grad()
def _score_batch(model, tokenizer, transform, batch: list[ProbeSample], device) -> torch.Tensor:
    images = torch.stack([transform(Image.open(s.image).convert("RGB")) for s in batch])
    image_features = F.normalize(model.encode_image(images.to(device)), dim=-1)  # [B, D]
    width = max(len(s.foils) for s in batch)
    texts = [t for s in batch for t in (s.caption, *s.foils, *[""] * (width - len(s.foils)))]
    text_features = F.normalize(model.encode_text(tokenizer(texts).to(device)), dim=-1)
    text_features = text_features.view(len(batch), 1 + width, -1)  # [B, 1 + F, D]
    scores = torch.einsum("bd,btd->bt", image_features, text_features)  # [B, 1 + F]
    mask = torch.tensor([[i < len(s.foils) for i in range(width)] for s in batch], device=device)
    return caption_beats_foils(scores[:, 0], scores[:, 1:], mask).cpu()


@torch.no_grad()
def evaluate_compositional(
    model, tokenizer, transform, root, batch_size: int, device="cpu", max_samples=None
) -> dict:
    """{type, type_chance, type_num_samples, ..., overall, overall_chance, num_samples}."""
    samples = read_probe(root)[:max_samples]
    types = sorted({s.type for s in samples})
    # rows: samples, correct, summed chance; one column per type (same order on every rank)
    counts = torch.zeros(3, len(types), dtype=torch.float64)
    mine = samples[rank() :: world_size()]
    for start in range(0, len(mine), batch_size):
        batch = mine[start : start + batch_size]
        correct = _score_batch(model, tokenizer, transform, batch, device)
        for sample, hit in zip(batch, correct.tolist(), strict=True):
            column = types.index(sample.type)
            counts[:, column] += torch.tensor(
                [1.0, float(hit), 1 / (1 + len(sample.foils))], dtype=torch.float64
            )
    counts = all_reduce_sum(counts)
    metrics = {}
    for column, kind in enumerate(types):
        total, hits, chance = counts[:, column].tolist()
        metrics[kind] = hits / total
        metrics[f"{kind}_chance"] = chance / total
        metrics[f"{kind}_num_samples"] = int(total)
    total, hits, chance = counts.sum(dim=1).tolist()
    metrics.update(overall=hits / total, overall_chance=chance / total, num_samples=int(total))
    return metrics
