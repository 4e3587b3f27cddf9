"""What one training step sends between ranks, by formula, checked against 4 real gloo ranks, and
the table of docs/scaling.md recomputed from the same formulas.

Per rank and step, with P ranks of B samples (N = P·B), embedding width D and n parameters:
- the loss all-gathers image and text features: each rank receives the other ranks' rows,
  2 · (P−1) · B · D values, and the backward sends as many back (NCCL's reduce-scatter);
- the gradient all-reduce moves n values; a ring all-reduce sends 2 · (P−1)/P · n per rank.
The counting wrapper records the payload of every collective the project's code makes (the real
collective still runs) while each rank takes the grad-cache path's step: gathered loss, backward,
`all_reduce_gradients`.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from clipscale.distributed import all_reduce_gradients
from clipscale.losses import ClipLoss
from clipscale.models import build_model
from tests.distributed_utils import run_distributed

REPO_ROOT = Path(__file__).resolve().parents[1]
RANKS, PER_RANK_BATCH = 4, 3
FP32 = 4
# n parameters and embedding width D of open_clip's configs (counted by building them on the meta
# device: open_clip.model.CLIP(**open_clip.factory.get_model_config(name)))
MODELS = {"ViT-B/32": (151_277_313, 512), "ViT-L/14": (427_616_513, 768)}
GLOBAL_BATCHES = {"32k": 32_768, "1M": 1_048_576}
GPUS = (8, 64, 512)


def feature_gather_bytes(per_rank_batch: int, ranks: int, dim: int, value_bytes: int) -> int:
    """Bytes of image + text features one rank receives from the others in a step's all-gather."""
    return 2 * (ranks - 1) * per_rank_batch * dim * value_bytes


def gradient_allreduce_bytes(parameters: int, ranks: int, value_bytes: int) -> float:
    """Bytes one rank sends in a ring all-reduce of every parameter's gradient."""
    return 2 * (ranks - 1) / ranks * parameters * value_bytes


def loss_logits_bytes(per_rank_batch: int, global_batch: int, tile: int | None = None) -> int:
    """fp32 logits one rank holds at once: its [B, N] rows in both directions, or one tile each."""
    rows, columns = (per_rank_batch, global_batch) if tile is None else (tile, tile)
    return 2 * rows * columns * FP32


def crossover_global_batch(parameters: int, dim: int) -> float:
    """N at which feature traffic (gather + its backward, 4·(P−1)·B·D) equals the gradient
    all-reduce (2·(P−1)/P·n), with both in the same precision: N = n / (2·D), for any P."""
    return parameters / (2 * dim)


def _count_payloads(rank: int, world_size: int, folder: str) -> None:
    """One gathered-loss step and gradient all-reduce, recording every collective's payload."""
    counts: dict[str, list[int]] = {}

    def counting(name, collective):
        @functools.wraps(collective)
        def wrapper(tensor, *args, **kwargs):
            # all_gather_into_tensor/all_gather_single(output, input): the input is this rank's
            payload = args[0] if name.startswith("all_gather") else tensor
            counts.setdefault(name, []).append(payload.numel() * payload.element_size())
            return collective(tensor, *args, **kwargs)

        return wrapper

    for name in (
        "all_gather_into_tensor",
        "all_gather_single",
        "all_reduce",
        "reduce_scatter_tensor",
    ):
        if hasattr(dist, name):
            setattr(dist, name, counting(name, getattr(dist, name)))
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build_model("clipscale-tiny")
    torch.manual_seed(1 + rank)  # each rank its own samples
    images = torch.randn(PER_RANK_BATCH, 3, 32, 32)
    texts = torch.randint(1, 49407, (PER_RANK_BATCH, 32))
    image_features, text_features, logit_scale = model(images, texts)
    loss = ClipLoss(gather=True)(image_features, text_features, logit_scale)
    after_loss = {name: list(values) for name, values in counts.items()}
    loss.backward()
    all_reduce_gradients(model.parameters())
    result = {
        "dim": image_features.shape[1],
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss": after_loss,
        "step": counts,
    }
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))


def test_a_four_rank_step_sends_what_the_formulas_say(tmp_path):
    run_distributed(_count_payloads, RANKS, str(tmp_path))
    for rank in range(RANKS):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        dim, parameters = result["dim"], result["parameters"]
        # Forward: two all-gathers (image, text) of this rank's [B, D] fp32 rows each, and the
        # global loss value (one fp32 scalar).
        gathers = [v for k, v in result["loss"].items() if k.startswith("all_gather")][0]
        assert gathers == [PER_RANK_BATCH * dim * FP32] * 2
        assert result["loss"]["all_reduce"] == [FP32]
        received = sum(gathers) * (RANKS - 1)  # every other rank's rows of both modalities
        assert received == feature_gather_bytes(PER_RANK_BATCH, RANKS, dim, FP32)
        # Backward on gloo: each feature gradient [N, D] all-reduced (NCCL: a reduce-scatter of
        # the same [N, D]); then the gradients, every parameter once, in fp32.
        step_reduces = result["step"]["all_reduce"][1:]
        global_rows = RANKS * PER_RANK_BATCH * dim * FP32
        assert step_reduces[:2] == [global_rows, global_rows]
        assert sum(step_reduces[2:]) == parameters * FP32
        wire = gradient_allreduce_bytes(parameters, RANKS, FP32)
        assert wire == pytest.approx(2 * (RANKS - 1) / RANKS * sum(step_reduces[2:]))


def scaling_rows() -> list[tuple[str, str, int, str, str, str, str]]:
    """The rows of docs/scaling.md's table, computed: model, batch, GPUs, per-rank batch, gather
    (GB), gradient all-reduce (GB), dense-loss logits per rank (GB)."""
    rows = []
    for model, (parameters, dim) in MODELS.items():
        for batch_name, global_batch in GLOBAL_BATCHES.items():
            for gpus in GPUS:
                per_rank = global_batch // gpus
                rows.append((
                    model, batch_name, gpus, f"{per_rank:,}",
                    f"{feature_gather_bytes(per_rank, gpus, dim, FP32) / 1e9:.2f}",
                    f"{gradient_allreduce_bytes(parameters, gpus, FP32) / 1e9:.2f}",
                    f"{loss_logits_bytes(per_rank, global_batch) / 1e9:.2f}",
                ))  # fmt: skip
    return rows


def test_the_scaling_doc_table_is_the_formulas():
    text = (REPO_ROOT / "docs" / "scaling.md").read_text()
    table = re.findall(
        r"^\| (ViT-\S+) \| (\S+) \| (\d+) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
        text,
        re.M,
    )
    assert [(m, b, int(g), *rest) for m, b, g, *rest in table] == scaling_rows()
    for model, (parameters, dim) in MODELS.items():
        assert f"{model}: N ≈ {crossover_global_batch(parameters, dim):,.0f}" in text
