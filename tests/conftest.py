"""Shared fixtures: composing configs from configs/ and running the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from clipscale.train import CONFIG_DIR
from tests.slurm_cluster import job_dir, slurm  # noqa: F401 (SLURM cluster, job folders)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def compose_config():
    """compose(overrides) -> DictConfig from configs/train.yaml, with hydra's own config attached."""

    def _compose(overrides: list[str], config_name: str = "train"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name, overrides=overrides, return_hydra_config=True)

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(
    *args: str, module: str = "clipscale.train", timeout: int = 600, env=None, cwd=REPO_ROOT
):
    """Run `python -m <module> args...` in `cwd` (the repo root); returns the CompletedProcess."""
    full_env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
