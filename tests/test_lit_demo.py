"""`+experiment=demo_lit`: from a clipscale run's checkpoint, the image tower stays bit-identical
in the new run's checkpoint while the text tower trains, and the summary shows the held-out
zero-shot top-1 before and after."""

from __future__ import annotations

import json

import torch

from clipscale.models import build_model
from tests.conftest import run_cli
from tests.eval_fixtures import write_lightning_checkpoint


def test_demo_lit_keeps_the_image_tower_and_shows_zeroshot_before_and_after(tmp_path):
    torch.manual_seed(5)
    demo = build_model("clipscale-tiny")  # stands in for the demo's trained weights
    pretrained = write_lightning_checkpoint(tmp_path / "demo.ckpt", demo, "clipscale-tiny")
    run = tmp_path / "lit"
    result = run_cli(
        "+experiment=demo_lit",
        f"model.pretrained={pretrained}",
        "trainer.max_steps=3",
        "data.batch_size=16",
        "data.num_workers=0",
        "data.val_samples=64",
        "eval.every_n_steps=null",
        "logger=csv",
        f"paths.output_dir={run}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "locked towers, not trained: image" in result.stderr + result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["zeroshot_top1_before"] <= 1 and 0 <= summary["zeroshot_top1"] <= 1
    assert "before training, from model.pretrained" in result.stdout

    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name, tensor in demo.state_dict().items():
        if name.startswith("visual."):
            assert torch.equal(saved[f"model.{name}"], tensor), name
    assert not torch.equal(saved["model.text_projection"], demo.text_projection)
