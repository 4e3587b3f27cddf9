"""Reading checkpoint files: resume (ckpt_path), evaluate, export and model.pretrained all read
through read_checkpoint. It unpickles tensors and plain containers only (a third party's file cannot
run code), and turns a file that is not a checkpoint, a truncated one, or one of the wrong kind into
a one-line CheckpointError naming the file and what it holds. No Lightning import: the commands
that only read a checkpoint start quickly."""

from __future__ import annotations

import codecs
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from clipscale.errors import UserError

TRAINING, WEIGHTS = "training", "weights"  # the two kinds of checkpoint clipscale reads
KIND_NAMES = {TRAINING: "a clipscale training checkpoint", WEIGHTS: "open_clip weights"}


class CheckpointError(UserError):
    """A file given as a checkpoint that cannot serve: the message names it and what it holds."""


def read_checkpoint(
    path: str | os.PathLike, key: str, accept: tuple[str, ...], fixes: dict[str, str] | None = None
) -> tuple[str, Any]:
    """(kind, payload) of the checkpoint file given as config key `key`, its kind one of `accept`
    (TRAINING, WEIGHTS); otherwise a CheckpointError naming the file, what it holds, and the fix
    for that kind from `fixes`. Zip-format files are memory-mapped: checking one reads little."""
    payload = _load(Path(path), key)
    kind = checkpoint_kind(payload)
    if kind not in accept:
        wanted = " or ".join(KIND_NAMES[k] for k in accept)
        fix = (fixes or {}).get(kind, "")
        raise CheckpointError(
            f"{key}={path} holds {describe(kind, payload)}, not {wanted}{'; ' + fix if fix else ''}"
        )
    return kind, payload


def checkpoint_kind(payload: Any) -> str | None:
    """TRAINING for a checkpoint clipscale's trainer wrote, WEIGHTS for a dict of tensors (an
    open_clip state dict, possibly under `state_dict`), None for anything else."""
    if not isinstance(payload, dict):
        return None
    hyper_parameters = payload.get("hyper_parameters")
    model = hyper_parameters.get("model") if isinstance(hyper_parameters, dict) else None
    if isinstance(payload.get("state_dict"), dict) and isinstance(model, dict) and "name" in model:
        return TRAINING
    weights = payload.get("state_dict", payload)
    if isinstance(weights, dict) and weights and all(map(torch.is_tensor, weights.values())):
        return WEIGHTS
    return None


def describe(kind: str | None, payload: Any) -> str:
    """What a loaded checkpoint file holds, in a few words."""
    if kind == TRAINING:
        name = payload["hyper_parameters"]["model"]["name"]
        return f"a clipscale training checkpoint ({name}, step {payload.get('global_step', '?')})"
    if kind == WEIGHTS:
        count = len(payload.get("state_dict", payload))
        return f"open_clip weights ({count} tensor{'s' if count > 1 else ''})"
    if isinstance(payload, dict) and "pytorch-lightning_version" in payload:
        return "a Lightning checkpoint of another model (no hyper_parameters.model)"
    if isinstance(payload, dict):
        return f"a dict with keys {sorted(map(str, payload))[:5]} and no model weights"
    return f"a {type(payload).__name__}, not a dict of model weights"


def _load(path: Path, key: str) -> Any:
    if not path.exists():
        raise CheckpointError(f"{key}={path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{key}={path} is a folder, not a checkpoint file")
    try:
        if path.suffix == ".safetensors":  # open_clip reads these for model.pretrained
            from safetensors.torch import load_file

            return load_file(path)
        mmap = zipfile.is_zipfile(path)  # torch's own format; legacy pickles cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many kinds for a file that is not what it expects
        raise CheckpointError(f"{key}={path} {_unreadable(path, error)}") from error


def _unreadable(path: Path, error: Exception) -> str:
    """Why `path` could not be read, judged from its first bytes and the loader's error."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        return "is empty"
    if head.startswith(b"\x93NUMPY"):
        return "is a NumPy array file, not a checkpoint"
    try:  # incremental: a character cut at byte 512 is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:  # a binary file (a pickle of protocol 2 or later is one)
        text = None
    if text is not None and "\x00" not in text:
        return f"is a text file, not a checkpoint (it starts {text[:40]!r})"
    code = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if isinstance(error, pickle.UnpicklingError) and code:
        return (
            f"holds Python objects ({code.group(1)}) beyond tensors and plain containers, which "
            "clipscale refuses to unpickle (they can run code)"
        )
    if head.startswith(b"PK\x03\x04"):
        return (
            "is a damaged or truncated torch file (an interrupted copy or save?) and cannot be read"
        )
    first_line = str(error).partition("\n")[0][:120]
    return f"could not be read as a checkpoint ({type(error).__name__}: {first_line})"


def check_resumable(path: str | os.PathLike) -> None:
    """Refuse, in one line, a ckpt_path that is not a training checkpoint Lightning can continue."""
    fixes = {WEIGHTS: f"to start a new run from these weights use model.pretrained={path}"}
    _, payload = read_checkpoint(path, "ckpt_path", (TRAINING,), fixes)
    if "loops" not in payload or "optimizer_states" not in payload:
        raise CheckpointError(
            f"ckpt_path={path} holds model weights without the optimizer and loop state a run "
            "continues from; evaluate or export it, or give a checkpoint the trainer wrote"
        )
