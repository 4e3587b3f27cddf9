"""A tiny model trained through the real CLI, then evaluated, exported and checked against
clip_benchmark's own evaluation code and open_clip's own loader."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from sklearn.metrics import balanced_accuracy_score

from clipscale.checkpoints import CheckpointError
from clipscale.eval.datasets import read_dataset_info
from clipscale.eval.retrieval import evaluate_retrieval
from clipscale.eval.zeroshot import evaluate_zeroshot
from clipscale.export import main as export_main
from clipscale.models import build_tokenizer, build_transforms, load_clip_from_checkpoint
from tests.eval_fixtures import write_classification_dataset, write_retrieval_dataset

REPO = Path(__file__).resolve().parent.parent
MODEL = "clipscale-tiny"


def _run(module: str, *overrides: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", module, *overrides], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """6 training steps with validation every 3 steps, on drawn shapes; the datasets it used."""
    root = tmp_path_factory.mktemp("eval_cli")
    shapes = write_classification_dataset(root / "shapes", 60, per_shard=25)
    captions = write_retrieval_dataset(root / "captions", 30, captions_per_image=2)
    output_dir = root / "run"
    _run(
        "clipscale.train",
        "trainer.max_steps=6",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.val_samples=32",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"paths.output_dir={output_dir}",
        "++callbacks.validation={_target_: clipscale.eval.callback.ValidationCallback, "
        f"every_n_steps: 3, batch_size: 32, zeroshot: [{shapes}]}}",
        "++callbacks.curves={_target_: clipscale.eval.curves.CurvesCallback, "
        f"output_dir: {output_dir}}}",
        cwd=root,
    )
    return {"root": root, "output_dir": output_dir, "shapes": shapes, "captions": captions}


def test_training_logs_validation_metrics_and_writes_curves(run):
    assert (run["output_dir"] / "curves.png").stat().st_size > 10_000
    with open(run["output_dir"] / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    validated = {int(r["step"]) for r in rows if r.get("val/zeroshot/shapes/top1")}
    assert validated == {3, 6}
    losses = [float(r["val/contrastive_loss"]) for r in rows if r.get("val/contrastive_loss")]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)


def test_evaluate_cli_writes_metrics_json_and_table(run):
    out = run["root"] / "evaluation"
    stdout = _run(
        "clipscale.evaluate",
        f"checkpoint={run['output_dir'] / 'checkpoints' / 'last.ckpt'}",
        f"zeroshot=[{run['shapes']}]",
        f"retrieval=[{run['captions']}]",
        f"paths.output_dir={out}",
        "device=cpu",
        "coder.k=8",
        "coder.shots=1",
        cwd=run["root"],
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"shapes", "captions"}
    assert 0 <= metrics["shapes"]["top1"] <= metrics["shapes"]["top5"] <= 1
    assert {"coder_top1", "coder_fewshot_top1", "per_class_top1"} <= set(metrics["shapes"])
    for key in ("image_to_text_R@1", "text_to_image_R@10", "modality_gap", "matched_cosine"):
        assert key in metrics["captions"]
    assert "shapes" in stdout and "captions" in stdout and "top1" in stdout


@pytest.fixture(scope="module")
def exported(run) -> tuple[Path, Path]:
    checkpoint = run["output_dir"] / "checkpoints" / "last.ckpt"
    output = run["root"] / "export" / "tiny.pt"
    export_main([f"checkpoint={checkpoint}", f"output={output}"])
    return checkpoint, output


def test_export_loads_in_open_clip_with_identical_embeddings(exported, run):
    checkpoint, output = exported
    ours, _ = load_clip_from_checkpoint(str(checkpoint))
    theirs, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(output))
    theirs.eval()
    images = torch.randn(4, 3, 32, 32)
    texts = open_clip.get_tokenizer(MODEL)(["a red circle", "a blue cross", "x", ""])
    with torch.no_grad():
        assert (ours.encode_image(images) - theirs.encode_image(images)).abs().max() <= 1e-6
        assert (ours.encode_text(texts) - theirs.encode_text(texts)).abs().max() <= 1e-6
    assert (output.parent / f"{MODEL}.json").is_file()  # the config a user registers


def test_zeroshot_and_retrieval_agree_with_clip_benchmark(exported, run):
    checkpoint, output = exported
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(output))
    model.eval()
    tokenizer = open_clip.get_tokenizer(MODEL)
    dataset = build_dataset(
        "wds/shapes", root=str(run["shapes"]), transform=preprocess, split="test"
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=16)
    # clip_benchmark's own classifier and classification loop; its `accuracy()` helper fails
    # under NumPy 2 (float() of a 1-element array), so its top-1 is taken from its logits here
    classifier = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, dataset.classes, dataset.templates, "cpu", amp=False
    )
    logits, target = zeroshot_classification.run_classification(
        model, classifier, loader, "cpu", amp=False
    )
    theirs = {
        "acc1": (logits.argmax(dim=1) == target).float().mean().item(),
        "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(dim=1)),
    }
    ours_model, _ = load_clip_from_checkpoint(str(checkpoint))
    transform, our_tokenizer = build_transforms(MODEL, False), build_tokenizer(MODEL)
    info = read_dataset_info(run["shapes"])
    ours = evaluate_zeroshot(ours_model, our_tokenizer, transform, info, 16)
    assert abs(ours["top1"] - theirs["acc1"]) <= 1 / ours["num_samples"] + 1e-6  # one sample
    # balanced accuracy: one sample moves at most one class's recall by 1/its size
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=0.05)

    captions = build_dataset(
        "wds/captions",
        root=str(run["captions"]),
        transform=preprocess,
        split="test",
        task="zeroshot_retrieval",
    )
    loader = torch.utils.data.DataLoader(
        captions, batch_size=16, collate_fn=image_captions_collate_fn
    )
    theirs = zeroshot_retrieval.evaluate(
        model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5]
    )
    shards = read_dataset_info(run["captions"]).shards
    ours = evaluate_retrieval(ours_model, our_tokenizer, transform, shards, 16, "cpu")
    for k in (1, 5):
        # 30 images, 60 unique captions: equal within one query (float noise can flip a near-tie)
        assert (
            abs(ours[f"image_to_text_R@{k}"] - theirs[f"text_retrieval_recall@{k}"])
            <= 1 / 30 + 1e-6
        )
        assert (
            abs(ours[f"text_to_image_R@{k}"] - theirs[f"image_retrieval_recall@{k}"])
            <= 1 / 60 + 1e-6
        )


def test_evaluation_errors_name_the_bad_value(tmp_path):
    with pytest.raises(FileNotFoundError, match="nshards.txt"):
        read_dataset_info(tmp_path)
    plain = tmp_path / "weights.pt"
    torch.save({"logit_scale": torch.tensor(1.0)}, plain)
    with pytest.raises(CheckpointError, match="model_name"):
        load_clip_from_checkpoint(str(plain))
