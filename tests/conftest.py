"""Shared fixtures: composing configs from configs/ and running the CLI in a subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from clipscale.train import CONFIG_DIR
from tests.cli_process import run_module
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
    *args: str,
    module: str = "clipscale.train",
    timeout: int = 600,
    env=None,
    cwd=REPO_ROOT,
    fresh: bool = False,
):
    """Run `python -m <module> args...` in `cwd` (the repo root); returns the CompletedProcess.
    A fork of a warm interpreter unless `fresh` (a new interpreter: tests of what it prints while
    importing) or `env` sets a variable read at import time (tests/cli_process.py)."""
    full_env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    return run_module(module, args, cwd=cwd, env=full_env, timeout=timeout, fresh=fresh)
