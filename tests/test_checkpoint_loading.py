"""Checkpoint files are data, never code: loading refuses pickled callables with a clear error."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from clipscale.models import build_model, load_clip_from_checkpoint
from tests.conftest import run_cli


class RunsCode:
    """An object whose unpickling calls a function: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_a_checkpoint_carrying_a_callable_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    state = build_model("clipscale-tiny").state_dict()
    path = tmp_path / "crafted.pt"
    torch.save({**state, "payload": RunsCode(marker)}, path)
    with pytest.raises(ValueError, match=r"crafted.pt.*refuses to unpickle"):
        load_clip_from_checkpoint(str(path), model_name="clipscale-tiny")
    assert not marker.exists()


def test_plain_open_clip_state_dicts_still_load(tmp_path):
    model = build_model("clipscale-tiny")
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    loaded, name = load_clip_from_checkpoint(str(path), model_name="clipscale-tiny")
    assert name == "clipscale-tiny"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_evaluate_refuses_a_crafted_checkpoint_in_one_line(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "crafted.pt"
    torch.save({**build_model("clipscale-tiny").state_dict(), "x": RunsCode(marker)}, path)
    for name in ("cat", "dog"):  # an ImageFolder dataset, one image a class
        (tmp_path / "classes" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), name == "cat" and "red" or "blue").save(
            tmp_path / "classes" / name / "0.png"
        )
    result = run_cli(
        f"checkpoint={path}", "model_name=clipscale-tiny", f"zeroshot=[{tmp_path / 'classes'}]",
        f"paths.output_dir={tmp_path / 'out'}", module="clipscale.evaluate",
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ") and "refuses to unpickle" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()
