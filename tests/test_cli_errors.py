"""The command line as a new user meets it: mistakes end in one clear line and leave nothing behind,
documented options work as written, a resumed run continues its own directory, secrets stay out."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

from clipscale.cli import REDACTED, UserError, check_overrides, compose_or_explain, redacted
from clipscale.config import ConfigError, validate_config
from clipscale.data.shards import write_shards
from clipscale.train import CONFIG_DIR
from tests.conftest import run_cli

SMALL = (
    "data.batch_size=8",
    "data.num_workers=0",
    "eval.every_n_steps=null",
    "eval.demo_zeroshot=false",
    "trainer.enable_progress_bar=false",
)
QUICK = ("trainer.max_steps=2", *SMALL)


def compose_train(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def write_jpeg_shards(folder: Path, count: int, per_shard: int) -> Path:
    """`count` captioned JPEGs in shards of `per_shard`, written by clipscale's own writer."""
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir(parents=True)
    pairs = []
    for index in range(count):
        path = images / f"{index:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        pairs.append((str(path), f"picture number {index}"))
    write_shards(pairs, folder / "shards", per_shard, resize=None, workers=1)
    return folder / "shards"


# --- the same key twice (an unquoted brace pattern the shell expanded) ----------------------------
def test_a_key_set_twice_mentions_brace_patterns_only_for_paths():
    with pytest.raises(UserError, match="seed is set 2 times") as error:
        check_overrides(["seed=1", "seed=2"])
    assert "{" not in str(error.value)
    with pytest.raises(UserError, match=r'"data.train_shards=/data/\{000..009\}.tar"'):
        check_overrides(["data.train_shards=/d/000.tar", "data.train_shards=/d/001.tar"])


def test_brace_patterns_reach_hydra_as_one_string():
    overrides = check_overrides(["data=webdataset", "data.train_shards=/d/{000..009}.tar"])
    assert compose_train(overrides).data.train_shards == "/d/{000..009}.tar"
    listed = check_overrides(["data.train_shards=/a/{0..1}.tar::/b/{a,b}.tar", "seed=3"])
    assert compose_train(["data=webdataset", *listed]).data.train_shards == (
        "/a/{0..1}.tar::/b/{a,b}.tar"
    )
    # Hydra's own syntax is left alone.
    assert check_overrides(["model.kwargs={a: 1}", "x=${oc.env:HOME}"]) == [
        "model.kwargs={a: 1}",
        "x=${oc.env:HOME}",
    ]
    with pytest.raises(UserError, match="seed is set 2 times"):
        check_overrides(["seed=1", "+seed=2"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_step=3"], "trainer.max_step is not a config key; did you mean trainer.max_steps?"),
        (["max_steps=3"], "did you mean trainer.max_steps?"),
        (["trainer=ddp", "trainer.devics=2"], "did you mean trainer.devices?"),
        (["model.kwargs.init_bias=1"], "to add it as a new key write +model.kwargs.init_bias=..."),
        (["loss=sigmoid"], "loss=sigmoid: no such option; choose one of clip, siglip"),
        (["experiment=demo"], "experiment is not in the defaults list: select it with +experiment=demo"),
        (["seed=1,2"], "Ambiguous value for argument 'seed=1,2'; 1. To use it as a list"),
    ],
)  # fmt: skip
def test_composition_mistakes_are_one_line_with_the_fix(overrides, message):
    with pytest.raises(UserError) as error:
        compose_or_explain(CONFIG_DIR, "train", overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


# --- errors after start-up (the one-line cases are in test_bad_inputs.py) -------------------------
def test_full_error_shows_the_traceback(tmp_path):
    args = ("data=webdataset", f"data.train_shards={tmp_path}/{{0..3}}.tar")
    full = run_cli(*args, f"paths.output_dir={tmp_path / 'run'}", env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr


# --- documented options ----------------------------------------------------------------------------
def test_logger_none_trains(tmp_path):
    result = run_cli("logger=none", *QUICK, f"paths.output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_loss_siglip_works_by_itself_and_the_error_suggestion_works(tmp_path):
    result = run_cli("loss=siglip", "logger=none", *QUICK, f"paths.output_dir={tmp_path / 'a'}")
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "model.logit_bias" in state["state_dict"]

    broken = ["loss=siglip", "~model.kwargs.init_logit_bias", "~model.kwargs.init_logit_scale"]
    with pytest.raises(ConfigError) as error:
        validate_config(compose_train(broken))
    suggestion = re.search(r"add (.*)$", str(error.value)).group(1).split()
    validate_config(compose_train(broken + suggestion))  # the printed fix composes and validates
    fixed = run_cli(
        *broken, *suggestion, "logger=none", *QUICK, f"paths.output_dir={tmp_path / 'b'}"
    )
    assert fixed.returncode == 0, fixed.stderr[-3000:]


def test_an_epoch_smaller_than_one_batch_warns_with_the_numbers(tmp_path):
    shards = write_jpeg_shards(tmp_path, count=6, per_shard=3)
    result = run_cli(
        "data=webdataset", f"data.train_shards={shards}/shard-{{000000..000001}}.tar", "logger=none",
        *QUICK, f"paths.output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "has 6 samples per epoch, fewer than one global batch of 8" in result.stderr


# --- resume ----------------------------------------------------------------------------------------
def test_resuming_a_runs_checkpoint_continues_that_run(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(*QUICK, f"paths.output_dir={run_dir}")  # the default (offline wandb) logger
    assert first.returncode == 0, first.stderr[-3000:]
    wandb_id = (run_dir / "wandb_run_id.txt").read_text()
    checkpoint = f"ckpt_path={run_dir}/checkpoints/last.ckpt"
    resumed = run_cli(checkpoint, *SMALL, "trainer.max_steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["output_dir"] == str(run_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no second run directory
    assert (run_dir / "wandb_run_id.txt").read_text() == wandb_id
    assert {p.name.split("-")[-1] for p in run_dir.glob("wandb/offline-run-*")} == {wandb_id}
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (curves,) = [v for k, v in state["callbacks"].items() if k.startswith("CurvesCallback")]
    assert [step for step, _ in curves["series"]["train/loss"]] == [1, 2, 3, 4]

    fork = tmp_path / "fork"
    forked = run_cli(
        checkpoint, "logger=none", *SMALL, "trainer.max_steps=5", f"paths.output_dir={fork}"
    )
    assert forked.returncode == 0, forked.stderr[-3000:]
    assert json.loads((fork / "summary.json").read_text())["steps"] == 5
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4


# --- secrets ---------------------------------------------------------------------------------------
def test_redaction_reaches_every_list_and_dict_value(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "s3cr3t")
    curl = "pipe:curl -H 'Authorization: Bearer ${oc.env:HF_TOKEN}' https://host/{0..9}.tar"
    config = OmegaConf.create(
        {"data": {"val_shards": [curl, "/d/0.tar", {"api_key": "k", "urls": [[curl]]}]}}
    )
    assert redacted(config) == {
        "data": {"val_shards": [REDACTED, "/d/0.tar", {"api_key": REDACTED, "urls": [[REDACTED]]}]}
    }


def test_interpolated_secrets_reach_no_logger_and_no_file(tmp_path):
    secret = "s3cr3t-value-0123456789"
    curl = "pipe:curl -H 'Authorization: Bearer ${oc.env:CLIPSCALE_TEST_TOKEN}' https://h/0.tar"
    result = run_cli(
        "+extras.wandb_api_key=${oc.env:CLIPSCALE_TEST_SECRET}",
        "+extras.auth_header=${oc.env:CLIPSCALE_TEST_TOKEN}",
        f'+extras.val_shards=["{curl}", {{header: "${{oc.env:CLIPSCALE_TEST_TOKEN}}"}}]',
        "logger=[csv,tensorboard]", *QUICK, f"paths.output_dir={tmp_path}",
        env={"CLIPSCALE_TEST_SECRET": secret, "CLIPSCALE_TEST_TOKEN": secret},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    hparams = next(tmp_path.glob("csv/**/hparams.yaml")).read_text()
    assert "wandb_api_key: <redacted>" in hparams and "auth_header: <redacted>" in hparams
    assert "- <redacted>" in hparams and "header: <redacted>" in hparams  # inside the list
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


# --- a normal run's output -------------------------------------------------------------------------
NOISE = (
    "Epoch 0/-2",
    "but have no `validation_step`",
    "No pretrained weights loaded",
    "`weights_only` was not set",
    "Total FLOPs",
    "litlogger",
    "v_num",
    ": {}",
    "`srun` command is available",
)


def test_a_normal_run_prints_none_of_the_known_noise(tmp_path):
    srun = tmp_path / "srun"  # an `srun` on the PATH, as on a login node, outside any job
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(0o755)
    result = run_cli(
        "logger=csv", "trainer.max_steps=2", "eval.every_n_steps=2", "data.val_samples=64",
        "data.batch_size=8", "data.num_workers=0", f"paths.output_dir={tmp_path}",
        env={"PATH": f"{tmp_path}:{os.environ['PATH']}"},
        fresh=True,  # a new interpreter: what importing torch, Lightning and open_clip prints too
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "step" in output and "clipscale run finished" in output
    for text in NOISE:
        assert text not in output, text
