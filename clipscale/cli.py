"""What the command-line entry points share: checking the overrides before Hydra reads them,
ending known user errors in one line, the run directory of a resumed run, and secret redaction."""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line, no traceback."""


# A shell brace expansion in an override's value: {000..009} or {a,b}; not Hydra's ${...}.
_BRACE = re.compile(r"(?<!\$)\{(\d+\.\.\d+|[^{}:,$]*,[^{}:$]*)\}")
_SECRET_WORDS = ("key", "token", "secret", "password")
REDACTED = "<redacted>"


def _override_key(argument: str) -> str | None:
    """`data.batch_size` of `data.batch_size=4` (also of `+key=`, `++key=`, `~key`), else None."""
    if "=" not in argument or argument.startswith("-"):
        return None
    return argument.split("=", 1)[0].lstrip("+~")


def check_overrides(arguments: list[str]) -> list[str]:
    """Refuse a key set twice (an unquoted brace pattern the shell expanded), and quote brace
    patterns so Hydra's grammar reads `key=/d/{000..009}.tar` as one string; return the arguments."""
    keys = Counter(key for key in map(_override_key, arguments) if key is not None)
    repeated = [key for key, count in keys.items() if count > 1]
    if repeated:
        key = repeated[0]
        raise UserError(
            f"{key} is set {keys[key]} times on the command line; Hydra would keep only the last. "
            f"A brace pattern the shell expanded does this: quote it, e.g. "
            f'"{key}=/data/{{000..009}}.tar"'
        )
    return [_quote_braces(argument) for argument in arguments]


def _quote_braces(argument: str) -> str:
    key = _override_key(argument)
    if key is None:
        return argument
    name, value = argument.split("=", 1)
    if not _BRACE.search(value) or value[:1] in "[{'\"" or "'" in value:
        return argument
    return f"{name}='{value}'"


def run_dir_for_checkpoint(ckpt_path: str | None, default: str) -> str:
    """Resolver for paths.output_dir: a checkpoint inside `<run>/checkpoints/` continues `<run>`."""
    if ckpt_path:
        checkpoint = Path(ckpt_path)
        run_dir = checkpoint.parent.parent
        if checkpoint.parent.name == "checkpoints" and (run_dir / ".hydra").is_dir():
            return str(run_dir)
    return default


OmegaConf.register_new_resolver("run_dir_for_checkpoint", run_dir_for_checkpoint, replace=True)


CONTINUED = "continued-"  # .hydra/continued-<time>/: the config record of each continue


def launcher_rank() -> int:
    """This process's rank as its launcher set it (torchrun, srun, Lightning's spawned ranks)."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(name, "0") != "0":
            return int(os.environ[name])
    return 0


def continues_run(ckpt_path: str | None, output_dir: str) -> bool:
    """Whether a start with this checkpoint and run directory continues the checkpoint's run."""
    run = run_dir_for_checkpoint(ckpt_path, "")
    return bool(run) and Path(output_dir).resolve() == Path(run).resolve()


def config_record_subdir(ckpt_path: str | None, output_dir: str, stamp: str) -> str | None:
    """Resolver for hydra.output_subdir: a new run (or a fork) records its config in `.hydra`; a
    continue leaves the run's records as they are and adds `.hydra/continued-<stamp>`. Only rank 0
    writes: torchrun and srun start every rank with the same command."""
    if launcher_rank() != 0:
        return None
    return f".hydra/{CONTINUED}{stamp}" if continues_run(ckpt_path, output_dir) else ".hydra"


OmegaConf.register_new_resolver("config_record_subdir", config_record_subdir, replace=True)


def config_record(run: Path, checkpoint: Path) -> Path:
    """The config record a checkpoint of `run` was trained with: the newest one written before
    the checkpoint (records of later continues are newer; the run's first one otherwise)."""
    records = [run / ".hydra", *(run / ".hydra").glob(f"{CONTINUED}*")]
    # Hydra writes a record's overrides.yaml last: its time is when the record was complete
    written = {
        r: (r / "overrides.yaml").stat().st_mtime
        for r in records
        if (r / "config.yaml").is_file() and (r / "overrides.yaml").is_file()
    }
    older = [r for r, time in written.items() if time <= checkpoint.stat().st_mtime]
    return max(older, key=written.get, default=run / ".hydra")


def is_secret_key(key: str) -> bool:
    """True for config keys that name a credential (api_key, token, secret, password)."""
    return any(word in str(key).lower() for word in _SECRET_WORDS)


def redacted(config) -> dict:
    """The resolved config as a container, with every value whose key or interpolation names a
    secret replaced by REDACTED (interpolations such as ${oc.env:WANDB_API_KEY} are read unresolved)."""

    def walk(node):
        if OmegaConf.is_dict(node):
            result = {}
            unresolved = OmegaConf.to_container(node, resolve=False)  # once per dict
            for key in node:
                raw = unresolved[key]
                if is_secret_key(key) or (isinstance(raw, str) and _names_secret(raw)):
                    result[key] = REDACTED
                else:
                    result[key] = walk(node[key]) if _is_container(node, key) else node[key]
            return result
        if OmegaConf.is_list(node):
            return [walk(item) if OmegaConf.is_config(item) else item for item in node]
        return node

    return walk(config)


def _is_container(node, key) -> bool:
    value = node._get_node(key)
    return OmegaConf.is_config(value) and not value._is_none()


def _names_secret(raw: str) -> bool:
    return "${" in raw and any(word in raw.lower() for word in _SECRET_WORDS)


def _fresh_run_dir(path: Path) -> bool:
    """A run directory that holds nothing but what Hydra wrote when the job started."""
    return path.is_dir() and all(
        entry.name == ".hydra" or entry.suffix == ".log" for entry in path.iterdir()
    )


def hydra_run_dir() -> Path | None:
    """The running Hydra job's output directory, or None outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def known_errors(run_dir: Callable[[], Path | None] = hydra_run_dir):
    """Decorate an entry point: a UserError (or a config error) ends in one line on stderr and
    exit status 1, removing a run directory the failed start left empty. HYDRA_FULL_ERROR=1 raises."""
    from clipscale.config import ConfigError

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except (UserError, ConfigError) as error:
                if os.environ.get("HYDRA_FULL_ERROR") == "1":
                    raise
                directory = run_dir()
                if directory is not None and _fresh_run_dir(directory):
                    shutil.rmtree(directory, ignore_errors=True)
                print(f"error: {error}", file=sys.stderr, flush=True)
                sys.exit(1)

        return wrapper

    return decorate
