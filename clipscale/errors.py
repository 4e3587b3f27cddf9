"""The error types every layer may raise, and how a user's mistake ends a command: one line on
stderr starting with `error: `, exit status 1, no traceback, nothing left behind."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, no traceback."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


def exit_with_error(message: str) -> None:
    """Print `error: message` as the one line on stderr and exit with status 1."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def _fresh_run_dir(path: Path) -> bool:
    """A run directory that holds nothing but what Hydra wrote when the job started."""
    return path.is_dir() and all(
        entry.name == ".hydra" or entry.suffix == ".log" for entry in path.iterdir()
    )


def remove_fresh_dir(path: Path) -> None:
    """Remove `path` if it holds only what a starting job wrote, then its emptied parents below
    the working directory (a first run's `runs/`); nothing of a directory used before is touched."""
    if not _fresh_run_dir(path):
        return
    shutil.rmtree(path, ignore_errors=True)
    cwd = Path.cwd().resolve()
    parent = path.resolve().parent
    while parent != cwd and cwd in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def known_errors(
    run_dir: Callable[[], Path | None] = lambda: None, also: tuple[type[Exception], ...] = ()
):
    """Decorate an entry point: a UserError, a ConfigError or one of `also` ends in one line on
    stderr and exit status 1, removing the run directory the failed start left empty.
    HYDRA_FULL_ERROR=1 raises instead, with the traceback."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except (UserError, ConfigError, *also) as error:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                directory = run_dir()
                if directory is not None:
                    remove_fresh_dir(directory)
                exit_with_error(str(error))

        return wrapper

    return decorate


@contextlib.contextmanager
def removed_on_error(path: Path):
    """Remove `path` (a command's output folder) if it did not exist before and the block fails."""
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(path, ignore_errors=True)
        raise


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors take clipscale's form: one `error: ` line, exit status 1."""

    def error(self, message: str):
        """Report a bad argument in one line that points to --help for the usage."""
        exit_with_error(f"{message} (usage: {self.prog} --help)")
