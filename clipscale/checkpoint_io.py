"""Atomic checkpoint files: a kill during a save leaves the previous checkpoint loadable.

Lightning's TorchCheckpointIO writes through an fsspec transaction whose temporary file lives in the
system temp directory; when that is another filesystem than the run directory (a node-local /tmp
and a shared /checkpoints), the final move is a copy over `last.ckpt`, and a kill during it leaves a
truncated file: the one checkpoint a restarted job needs. Nothing is fsynced either, so a node that
loses power can leave a renamed but empty file.

AtomicCheckpointIO writes the new checkpoint next to its destination (same directory, so the same
filesystem), flushes and fsyncs it, renames it over the old file with os.replace (atomic on POSIX:
readers see the old file or the new one, never a mix), then fsyncs the directory so the rename
itself survives a crash. Remote paths (s3://, gs://, ...) keep Lightning's behaviour, since object
stores publish an upload only once it is complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

TEMP_SUFFIX = ".partial"  # `.last.ckpt.partial` while last.ckpt is being written


def temp_path(path: Path) -> Path:
    """Where the checkpoint for `path` is written before it is renamed into place."""
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> None:
    """torch.save(payload, path) such that `path` always holds a complete file: old or new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temp_path(path)  # a leftover from a killed save is simply overwritten
    try:
        with open(temporary, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself is durable
    finally:
        os.close(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose local saves are atomic and durable (see the module docstring)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        """Write `checkpoint` to `path` atomically; remote paths go through Lightning's writer."""
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
