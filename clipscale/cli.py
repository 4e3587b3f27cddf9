"""What the command-line entry points share: checking the overrides before Hydra reads them,
composing the config with its mistakes told in one line, the run directory of a resumed run, the
default output directory of an evaluation, and secret redaction."""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from clipscale.errors import UserError, exit_with_error

# A shell brace expansion in an override's value: {000..009} or {a,b}; not Hydra's ${...}.
_BRACE = re.compile(r"(?<!\$)\{(\d+\.\.\d+|[^{}:,$]*,[^{}:$]*)\}")
_SECRET_WORDS = ("key", "token", "secret", "password", "authorization", "bearer")
REDACTED = "<redacted>"


def _override_key(argument: str) -> str | None:
    """`data.batch_size` of `data.batch_size=4` (also of `+key=`, `++key=`, `~key`), else None."""
    if "=" not in argument or argument.startswith("-"):
        return None
    return argument.split("=", 1)[0].lstrip("+~")


def _looks_like_path(value: str) -> bool:
    return "/" in value or os.sep in value or Path(value).suffix == ".tar"


def check_overrides(arguments: list[str]) -> list[str]:
    """Refuse a key set twice (an unquoted brace pattern the shell expanded), and quote brace
    patterns so Hydra's grammar reads `key=/d/{000..009}.tar` as one string; return the arguments."""
    keys = Counter(key for key in map(_override_key, arguments) if key is not None)
    repeated = [key for key, count in keys.items() if count > 1]
    if repeated:
        key = repeated[0]
        values = [a.split("=", 1)[1] for a in arguments if _override_key(a) == key]
        message = f"{key} is set {keys[key]} times on the command line; Hydra keeps only the last"
        if any(map(_looks_like_path, values)):  # most likely a brace pattern the shell expanded
            quoted = f'"{key}=/data/{{000..009}}.tar"'
            message += f". A brace pattern the shell expanded does this: quote it, e.g. {quoted}"
        raise UserError(message + f". Give {key} once")
    return [_quote_braces(argument) for argument in arguments]


def _quote_braces(argument: str) -> str:
    key = _override_key(argument)
    if key is None:
        return argument
    name, value = argument.split("=", 1)
    if not _BRACE.search(value) or value[:1] in "[{'\"" or "'" in value:
        return argument
    return f"{name}='{value}'"


def compose_or_explain(config_dir: str, config_name: str, overrides: list[str]) -> DictConfig:
    """The config Hydra will compose from `overrides`; a misspelt key, an unknown group option, a
    group given without `+` or an override Hydra cannot parse raises a one-line UserError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    def composed(arguments: list[str]) -> DictConfig:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name, overrides=arguments)

    try:
        return composed(overrides)
    except MissingConfigException as error:  # logger=foo: the group exists, the option does not
        group, _, option = (error.missing_cfg_file or "").rpartition("/")
        if not group or error.options is None:
            raise UserError(_one_line(str(error))) from None
        raise UserError(
            f"{group}={option}: no such option; choose one of {', '.join(error.options)}"
        ) from None
    except HydraException as error:
        message = str(error)
        if isinstance(error.__cause__, ConfigAttributeError | ConfigKeyError):  # not a config key
            key = message.split("'")[1]  # "Could not override 'trainer.max_step'. ..."
            others = [a for a in overrides if _override_key(a) != key]
            raise UserError(_unknown_key_message(key, lambda: composed(others))) from None
        if "No match in the defaults list" in message:  # experiment=demo: the group needs a `+`
            key = message.split("'")[1]
            fix = message.rsplit(" use ", 1)[-1]
            raise UserError(f"{key} is not in the defaults list: select it with {fix}") from None
        raise UserError(_one_line(message)) from None


def check_command_line(config_dir: str, config_name: str) -> DictConfig | None:
    """Check the overrides in sys.argv before Hydra reads them (quoting brace patterns there), and
    compose them: a mistake ends the command in one `error: ` line. Returns the composed config,
    or None when Hydra flags (--multirun, --cfg, ...) are given and Hydra is left to read them."""
    try:
        sys.argv[1:] = check_overrides(sys.argv[1:])
        if any(argument.startswith("-") for argument in sys.argv[1:]):
            return None
        return compose_or_explain(config_dir, config_name, sys.argv[1:])
    except UserError as error:
        exit_with_error(str(error))


def _unknown_key_message(key: str, compose_without) -> str:
    try:
        known = _dotted_keys(OmegaConf.to_container(compose_without(), resolve=False))
    except Exception:  # another mistake among the overrides: suggest nothing
        known = []
    name = key.rsplit(".", 1)[-1]  # `max_steps=3` for trainer.max_steps: the same last part
    close = (
        difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        or [known_key for known_key in known if known_key.rsplit(".", 1)[-1] == name][:1]
    )
    if close:
        return f"{key} is not a config key; did you mean {close[0]}?"
    return f"{key} is not a config key; to add it as a new key write +{key}=..."


def _dotted_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for name, value in node.items() if isinstance(node, dict) else ():
        keys.append(f"{prefix}{name}")
        keys += _dotted_keys(value, f"{prefix}{name}.")
    return keys


def _one_line(message: str) -> str:
    lines = [line.strip() for line in message.split("Config search path")[0].splitlines()]
    return "; ".join(line for line in lines if line)


def run_dir_for_checkpoint(ckpt_path: str | None, default: str) -> str:
    """Resolver for paths.output_dir: a checkpoint inside `<run>/checkpoints/` continues `<run>`."""
    if ckpt_path:
        checkpoint = Path(ckpt_path)
        run_dir = checkpoint.parent.parent
        if checkpoint.parent.name == "checkpoints" and (run_dir / ".hydra").is_dir():
            return str(run_dir)
    return default


def eval_dir_for_checkpoint(checkpoint: str | None, stamp: str) -> str:
    """Resolver for evaluate's paths.output_dir: `eval-<stamp>` in the checkpoint's run (or its
    folder); `runs/eval-<stamp>` when there is no such checkpoint file (the command then stops)."""
    if not checkpoint or not Path(checkpoint).is_file():
        return f"runs/eval-{stamp}"
    folder = run_dir_for_checkpoint(checkpoint, str(Path(checkpoint).parent))
    return str(Path(folder) / f"eval-{stamp}")


OmegaConf.register_new_resolver("run_dir_for_checkpoint", run_dir_for_checkpoint, replace=True)
OmegaConf.register_new_resolver("eval_dir_for_checkpoint", eval_dir_for_checkpoint, replace=True)


# Keys an exact resume needs unchanged: the data stream and its position (data.*, the batch
# size among them), the number of ranks it is split over, and the seeds of every random stream.
RESUME_KEYS = ("seed", "data", "trainer.devices", "trainer.num_nodes")
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


def continue_from_saved_config(config_dir: str, config_name: str) -> None:
    """`ckpt_path=<run>/checkpoints/X.ckpt`: start from the config `<run>` trained X with. The run's
    own overrides (its record's overrides.yaml) go before those in sys.argv, which replace the
    ones of the same key. A continue refuses a change to RESUME_KEYS (a fork, with another
    paths.output_dir, may change anything). Prints what changed; ends in one line on a mistake."""
    arguments = sys.argv[1:]
    given = {_override_key(a): a.split("=", 1)[-1] for a in arguments if _override_key(a)}
    checkpoint = Path(given.get("ckpt_path", "").strip("'\""))
    run = run_dir_for_checkpoint(str(checkpoint), "")
    if not run or not checkpoint.is_file() or any(a.startswith("-") for a in arguments):
        return  # not a run's checkpoint (a missing one is reported by the training start-up)
    run = Path(run)
    record = config_record(run, checkpoint)
    saved = [str(a) for a in OmegaConf.load(record / "overrides.yaml")]
    sys.argv[1:] = [a for a in saved if _override_key(a) not in given] + arguments
    try:
        composed = compose_or_explain(
            config_dir, config_name, [a for a in sys.argv[1:] if not a.startswith("hydra.")]
        )
        changes = config_changes(
            OmegaConf.to_container(OmegaConf.load(record / "config.yaml")),
            OmegaConf.to_container(composed),
        )
        output_dir = given.get("paths.output_dir", str(run)).strip("'\"")
        forked = Path(output_dir).resolve() != run.resolve()
        if not forked:
            refuse_resume_key_changes(changes, run)
    except UserError as error:
        exit_with_error(str(error))
    if launcher_rank() == 0:
        start = f"forking {run} into {output_dir}" if forked else f"continuing {run}"
        changed = ", ".join(
            f"{key} {_shown(key, old)} -> {_shown(key, new)}" for key, old, new in changes
        )
        print(
            f"clipscale: {start} from {record / 'config.yaml'}; "
            + (f"changed: {changed}" if changed else "no key changed"),
            flush=True,
        )


def _shown(key: str, value) -> str:
    if is_secret_key(key):
        return REDACTED
    return "{...}" if isinstance(value, dict) else str(value)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) of every difference; a section only one side has is one
    entry (its value shown as `(none)` on the other side). `ckpt_path` is not counted."""
    changes = []
    for key in [*old, *(key for key in new if key not in old)]:
        name, before, after = f"{prefix}{key}", old.get(key, "(none)"), new.get(key, "(none)")
        if name == "ckpt_path" or before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            changes += config_changes(before, after, f"{name}.")
        else:
            changes.append((name, before, after))
    return changes


def refuse_resume_key_changes(changes: list[tuple[str, object, object]], run: Path) -> None:
    """Raise a UserError naming the first change to a key an exact resume needs unchanged."""
    for key, before, after in changes:
        if any(key == k or key.startswith(f"{k}.") or k.startswith(f"{key}.") for k in RESUME_KEYS):
            raise UserError(
                f"{key} would change from {before} to {after} on a continue of {run}; an exact "
                "resume keeps the run's seed, data (data.batch_size included) and world size "
                "(trainer.devices, trainer.num_nodes): drop that override, or fork the run into "
                "a new directory with paths.output_dir=<new dir>"
            )


def is_secret_key(key: str) -> bool:
    """True for config keys that name a credential (api_key, token, secret, password, ...)."""
    return any(word in str(key).lower() for word in _SECRET_WORDS)


def redacted(config) -> dict:
    """The resolved config as a container, with every value whose key or interpolation names a
    secret replaced by REDACTED, at any depth of dicts and lists (interpolations such as
    ${oc.env:WANDB_API_KEY} are read unresolved)."""

    def walk(node):
        if not OmegaConf.is_config(node):
            return node
        unresolved = OmegaConf.to_container(node, resolve=False)  # once per dict or list
        if OmegaConf.is_dict(node):
            entries = [(key, key, unresolved[key]) for key in node]
        else:
            entries = [(index, None, raw) for index, raw in enumerate(unresolved)]
        result = {key: _redact_entry(node, key, name, raw, walk) for key, name, raw in entries}
        return result if OmegaConf.is_dict(node) else list(result.values())

    return walk(config)


def _redact_entry(node, key, name, raw, walk):
    if (name is not None and is_secret_key(name)) or (isinstance(raw, str) and _names_secret(raw)):
        return REDACTED
    return walk(node[key])  # resolved here; a value that resolves to a dict or list is walked too


def _names_secret(raw: str) -> bool:
    return "${" in raw and any(word in raw.lower() for word in _SECRET_WORDS)


def hydra_run_dir() -> Path | None:
    """The running Hydra job's output directory, or None outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
