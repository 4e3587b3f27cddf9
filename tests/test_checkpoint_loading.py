"""Checkpoint files are data, never code, and every load reads them through one reader that names
the file and what it holds when it cannot serve; every checkpoint the trainer writes (SigLIP's
included) loads in evaluate and export, and the export in open_clip."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from clipscale.checkpoints import TRAINING, CheckpointError, check_resumable, read_checkpoint
from clipscale.models import build_model, check_pretrained, load_clip_from_checkpoint
from tests.conftest import run_cli
from tests.eval_fixtures import write_classification_dataset, write_lightning_checkpoint


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
    with pytest.raises(CheckpointError, match=r"crafted.pt.*refuses to unpickle"):
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
    check_pretrained(str(path))  # and they are what model.pretrained takes


def write_unreadable_files(folder):
    """name -> (path, what the reader must say it is)."""
    torch.save({"w": torch.ones(50)}, folder / "whole.pt")
    whole = (folder / "whole.pt").read_bytes()
    files = {
        "notes.txt": (b"hello, notes\n", "is a text file"),
        "empty.pt": (b"", "is empty"),
        "cut.pt": (whole[: len(whole) // 2], "is a damaged or truncated torch file"),
        "noise.bin": (bytes(range(256)) * 4, "could not be read as a checkpoint"),
    }
    for name, (content, _) in files.items():
        (folder / name).write_bytes(content)
    return {name: (folder / name, said) for name, (_, said) in files.items()}


def test_the_reader_says_what_an_unreadable_file_is(tmp_path):
    for path, said in write_unreadable_files(tmp_path).values():
        with pytest.raises(CheckpointError) as error:
            read_checkpoint(path, "checkpoint", ("training", "weights"))
        assert str(error.value).startswith(f"checkpoint={path} {said}"), str(error.value)
    with pytest.raises(CheckpointError, match="is a folder"):
        read_checkpoint(tmp_path, "checkpoint", ("weights",))
    with pytest.raises(CheckpointError, match=f"ckpt_path={tmp_path}/nope.ckpt does not exist"):
        check_resumable(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="model.pretrained=.*notes.txt is a text file"):
        check_pretrained(str(tmp_path / "notes.txt"))  # the other doors read through the same


def test_each_door_refuses_the_wrong_kind_and_names_the_fix(tmp_path):
    model = build_model("clipscale-tiny")
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    training = write_lightning_checkpoint(tmp_path / "weights-only.ckpt", model, "clipscale-tiny")
    with pytest.raises(CheckpointError, match=f"use model.pretrained={weights}"):
        check_resumable(weights)
    with pytest.raises(CheckpointError, match="without the optimizer and loop state"):
        check_resumable(training)  # a checkpoint of the model alone cannot be continued
    assert check_pretrained(str(training)) == TRAINING  # a run's weights can start another
    torch.save({"epoch": 3, "note": "x"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"holds a dict with keys \['epoch', 'note'\]"):
        load_clip_from_checkpoint(str(tmp_path / "other.pt"), "clipscale-tiny")
    torch.save({"visual.projection": torch.zeros(2, 2)}, tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match="does not fit clipscale-tiny: it lacks weights"):
        load_clip_from_checkpoint(str(tmp_path / "small.pt"), "clipscale-tiny")


def test_a_siglip_run_evaluates_and_exports_and_open_clip_loads_it(tmp_path):
    """loss=siglip adds the model's logit_bias: evaluate and export build the model the run built
    (its model.kwargs), and the printed load call rebuilds it in open_clip with equal outputs."""
    run = tmp_path / "run"
    trained = run_cli(
        "loss=siglip", "logger=none", "trainer.max_steps=2", "data.batch_size=8",
        "data.num_workers=0", "eval.every_n_steps=null", "eval.demo_zeroshot=false",
        "trainer.enable_progress_bar=false", f"paths.output_dir={run}",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = run / "checkpoints" / "last.ckpt"
    shapes = write_classification_dataset(tmp_path / "shapes", 8, per_shard=8)
    # No paths.output_dir: the metrics land in <run>/eval-<time>/.
    evaluated = run_cli(
        f"checkpoint={checkpoint}", f"zeroshot=[{shapes}]", "device=cpu",
        module="clipscale.evaluate",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (metrics,) = run.glob("eval-*/metrics.json")
    assert 0 <= json.loads(metrics.read_text())["shapes"]["top1"] <= 1

    output = tmp_path / "export" / "siglip.pt"
    exported = run_cli(f"checkpoint={checkpoint}", f"output={output}", module="clipscale.export")
    assert exported.returncode == 0, exported.stderr[-3000:]
    kwargs = {"init_logit_bias": -10, "init_logit_scale": 2.3026}  # loss/siglip.yaml's
    printed = ", ".join(f"{key}={value}" for key, value in kwargs.items())
    assert (
        f"load: open_clip.create_model_and_transforms('clipscale-tiny', pretrained={str(output)!r}, "
        f"{printed})" in exported.stdout
    )
    theirs = open_clip.create_model_and_transforms("clipscale-tiny", str(output), **kwargs)[0]
    ours = load_clip_from_checkpoint(str(checkpoint))[0]
    assert torch.equal(theirs.logit_bias, ours.logit_bias)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        difference = theirs.eval().encode_image(images) - ours.encode_image(images)
    assert difference.abs().max() <= 1e-6
