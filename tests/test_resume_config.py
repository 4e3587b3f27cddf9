"""Continuing a run starts from the config its checkpoint was trained with, changed only where the
command line says; the run's own records stay as they were; a continue refuses what would break an
exact resume, and a fork (another paths.output_dir) may change anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import run_cli

QUIET = (
    "eval.every_n_steps=null",
    "eval.demo_zeroshot=false",
    "trainer.enable_progress_bar=false",
)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """Two steps of the demo with a non-default batch size and logger, as the issue's user ran it."""
    run = tmp_path_factory.mktemp("first") / "run"
    result = run_cli(
        "trainer.max_steps=2", "data.batch_size=8", "logger=csv", *QUIET, f"paths.output_dir={run}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def config(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


def contents(folder: Path) -> list[tuple[Path, int]]:
    return sorted((path.relative_to(folder), path.stat().st_mtime_ns) for path in folder.rglob("*"))


def test_continue_keeps_the_runs_config_and_records_the_change_beside_it(first_run):
    original = (first_run / ".hydra" / "config.yaml").read_text()
    checkpoint = first_run / "checkpoints" / "last.ckpt"
    result = run_cli(f"ckpt_path={checkpoint}", "trainer.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "changed: trainer.max_steps 2 -> 3" in result.stdout
    assert (first_run / ".hydra" / "config.yaml").read_text() == original  # not overwritten
    (record,) = (first_run / ".hydra").glob("continued-*")
    expected = config(first_run / ".hydra" / "config.yaml")  # the reference: the run's own config
    expected["trainer"]["max_steps"], expected["ckpt_path"] = 3, str(checkpoint)
    assert config(record / "config.yaml") == expected
    summary = json.loads((first_run / "summary.json").read_text())
    assert (summary["steps"], summary["global_batch"]) == (3, 8)  # the run's batch, not the default

    # A second continue starts from the first continue's config, the one its checkpoint came from.
    result = run_cli(f"ckpt_path={checkpoint}", "trainer.max_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from {record / 'config.yaml'}; changed: trainer.max_steps 3 -> 4" in result.stdout


@pytest.mark.parametrize("change", ["data.batch_size=16", "trainer.devices=2"])
def test_continue_refuses_a_key_an_exact_resume_needs_and_points_to_a_fork(first_run, change):
    before = contents(first_run)
    result = run_cli(f"ckpt_path={first_run / 'checkpoints' / 'last.ckpt'}", change)
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    assert result.returncode == 1 and line.startswith(f"error: {change.split('=')[0]} ")
    assert "paths.output_dir=" in line  # the fork that may change it
    assert contents(first_run) == before


def test_fork_starts_from_the_runs_config_and_may_change_anything(first_run, tmp_path):
    fork, before = tmp_path / "fork", contents(first_run)
    result = run_cli(
        f"ckpt_path={first_run / 'checkpoints' / 'last.ckpt'}",
        "data.batch_size=4",
        "trainer.max_steps=6",  # past the checkpoint's step, whichever test ran first
        f"paths.output_dir={fork}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    forked = config(fork / ".hydra" / "config.yaml")
    assert forked["data"]["batch_size"] == 4 and "csv" in forked["logger"]  # changed; inherited
    assert json.loads((fork / "summary.json").read_text())["steps"] == 6
    assert contents(first_run) == before  # the fork wrote nothing into the run it started from
