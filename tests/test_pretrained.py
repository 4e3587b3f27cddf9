"""`model.pretrained`: a clipscale run's checkpoint starts another run with its exact weights (read
by the one checkpoint reader); an open_clip tag goes through open_clip's own loader, an unknown
tag names the valid ones and a tag neither cached nor downloadable names the cache, in one line."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import open_clip
import pytest
import torch

from clipscale.models import build_model
from tests.conftest import run_cli
from tests.eval_fixtures import write_lightning_checkpoint


def test_a_clipscale_checkpoint_as_pretrained_loads_its_exact_weights(tmp_path):
    torch.manual_seed(1)
    trained = build_model("clipscale-tiny")
    checkpoint = write_lightning_checkpoint(tmp_path / "last.ckpt", trained, "clipscale-tiny")
    torch.manual_seed(2)  # another random init, replaced by the checkpoint's weights
    started = build_model("clipscale-tiny", pretrained=str(checkpoint))
    expected = trained.state_dict()
    for name, tensor in started.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_an_unknown_tag_names_the_architectures_tags():
    with pytest.raises(
        ValueError, match=r"model.pretrained='laion9b' is neither .*laion2b_s34b_b79k"
    ):
        build_model("ViT-B-32", pretrained="laion9b")


def test_a_tag_neither_cached_nor_downloadable_names_the_cache_in_one_line(tmp_path):
    cache = tmp_path / "open_clip_cache"
    result = run_cli(
        "model=vit_b_32",
        "model.pretrained=laion2b_s34b_b79k",
        f"model.cache_dir={cache}",
        "trainer.max_steps=1",
        f"paths.output_dir={tmp_path / 'run'}",
        env={"HF_HUB_OFFLINE": "1"},  # nothing is downloaded in tests
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.pretrained=laion2b_s34b_b79k for ViT-B-32 is not in the")
    assert str(cache) in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def hub_cache_file(cache: Path, repo: str, filename: str) -> Path:
    """Where huggingface_hub keeps `filename` of model repo `repo` (its cache layout)."""
    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    path = folder / "snapshots" / commit / filename
    path.parent.mkdir(parents=True)
    return path


def test_a_tag_loads_the_weights_in_the_hub_cache_through_open_clip(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    name, tag = "RN50", "yfcc15m"  # the smallest architecture with an open_clip hub tag
    repo = open_clip.get_pretrained_cfg(name, tag)["hf_hub"].strip("/")
    torch.manual_seed(3)
    weights = {
        k: v.half() for k, v in build_model(name).state_dict().items()
    }  # fp16: half the bytes
    torch.save(weights, hub_cache_file(tmp_path, repo, "open_clip_pytorch_model.bin"))
    torch.manual_seed(4)
    loaded = build_model(name, pretrained=tag, cache_dir=str(tmp_path))
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, weights[key].to(tensor.dtype)), key
