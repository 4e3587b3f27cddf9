"""Shard specs: every form `data.val_shards` accepts (pattern, `a::b`, list) works in validation."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from clipscale.data.sources import shard_urls
from clipscale.eval.callback import ValidationCallback
from clipscale.models import build_model
from tests.eval_fixtures import write_retrieval_dataset

MODEL = "clipscale-tiny"


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    write_retrieval_dataset(root / "val", 13, captions_per_image=1, per_shard=5)  # 3 shards
    return root / "val" / "test"


def test_shard_urls_accepts_patterns_joined_and_listed(val_folder):
    expected = [str(val_folder / f"{i}.tar") for i in range(3)]
    brace = f"{val_folder}/{{0..2}}.tar"
    joined = f"{val_folder}/0.tar::{val_folder}/{{1..2}}.tar"
    listed = OmegaConf.create({"s": [f"{val_folder}/{{0..1}}.tar", f"{val_folder}/2.tar"]}).s
    for spec in (brace, joined, listed, list(listed), tuple(listed)):
        assert shard_urls(spec, "data.val_shards") == expected
    # remote commands are passed on untouched (after brace expansion, as webdataset does)
    assert shard_urls(["pipe:cat /x/{0..1}.tar"], "k") == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar"]


@pytest.mark.parametrize("spec", [[], 7, [3], ["a.tar", None], {"a": 1}, ""])
def test_shard_urls_refuses_other_values_naming_the_key(spec):
    with pytest.raises(ValueError, match=r"data\.val_shards"):
        shard_urls(spec, "data.val_shards")


def test_shard_urls_missing_files_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.val_shards"):
        shard_urls([str(tmp_path / "none-{0..3}.tar")], "data.val_shards")


def test_validation_callback_takes_every_spec_form(val_folder):
    torch.manual_seed(0)
    model = build_model(MODEL)
    results = []
    specs = [
        f"{val_folder}/{{0..2}}.tar",
        f"{val_folder}/0.tar::{val_folder}/{{1..2}}.tar",
        OmegaConf.create({"s": [f"{val_folder}/0.tar", f"{val_folder}/{{1..2}}.tar"]}).s,
    ]
    for spec in specs:
        callback = ValidationCallback(every_n_steps=1, val_shards=spec, batch_size=4)
        assert callback.val_shards == [str(val_folder / f"{i}.tar") for i in range(3)]
        results.append(callback.compute(model, MODEL))
    assert "val/image_to_text_R@1" in results[0]
    assert results[0] == results[1] == results[2]
    first_only = ValidationCallback(every_n_steps=1, val_shards=f"{val_folder}/0.tar", batch_size=4)
    # 5 of 13 images: the rank-based numbers differ, so the list really read all three shards
    assert first_only.compute(model, MODEL) != results[0]
