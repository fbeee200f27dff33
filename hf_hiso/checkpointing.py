"""Checkpoint files that are complete or absent, and read without unpickling code.

The Trainer writes a checkpoint in this order: model, `optimizer.pt` + `scheduler.pt` (HiSo's seed counter and
preconditioner live in the optimizer state), RNG state, `trainer_state.json`, then it rotates old checkpoints.
`HiSoTrainer` writes its own files (the federated state) right after the optimizer, through a temporary file renamed
into place, so `trainer_state.json` is the last file of a checkpoint: a folder that holds a readable
`trainer_state.json` and every file a resume needs is complete, anything else is a partial write. A manifest
(`hiso_manifest.json`, written last of HiSo's files) holds the size and SHA-256 of every file written before it (model,
optimizer, scheduler, federated state), so a truncated, zeroed or flipped file is found before anything is loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterable
from typing import Any

import torch

TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
FEDERATED_STATE_NAME = "federated_state.pt"
# Files that only a run with the matching callback can resume from.
KNOWN_CHECKPOINT_FILES = (FEDERATED_STATE_NAME,)
MANIFEST_NAME = "hiso_manifest.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or damaged; the message names the file and what to do."""


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """`torch.save` through a temporary file in the same folder, flushed to disk and renamed into place: `path`
    holds either its previous content or the whole new one, never a truncated file. A full disk raises an `OSError`
    naming `path`."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        code = getattr(err, "errno", None) or (errno.ENOSPC if "unexpected pos" in str(err) else None)
        reason = os.strerror(code) if code else str(err)
        raise OSError(code or errno.EIO, f"Could not write {path}: {reason}. Nothing was replaced.") from err


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike[str]) -> None:
    """Records size and SHA-256 of every file now in `folder` (atomically, in `hiso_manifest.json`)."""
    folder = os.fspath(folder)
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and name != MANIFEST_NAME and ".tmp-" not in name:
            files[name] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    tmp = os.path.join(folder, f"{MANIFEST_NAME}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, MANIFEST_NAME))
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(err.errno, f"Could not write {os.path.join(folder, MANIFEST_NAME)}: {err.strerror}") from err


def _manifest_problem(folder: str) -> str | None:
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.exists(path):
        return None  # a checkpoint of an older version: existence checks only
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path} is unreadable ({type(err).__name__})"
    for name, entry in files.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) != entry["size"]:
            return f"{file} has {os.path.getsize(file)} bytes instead of {entry['size']} (truncated or replaced)"
        if _sha256(file) != entry["sha256"]:
            return f"{file} is damaged (its SHA-256 differs from the one recorded when it was written)"
    return None


def safe_torch_load(path: str | os.PathLike[str], what: str) -> Any:
    """`torch.load(path, weights_only=True)`: plain tensors and containers only, never code from a pickle. A
    missing, truncated or foreign file raises a [`CheckpointError`] naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {what}")
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for damaged files
        raise CheckpointError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). It is "
            f"damaged or holds more than plain tensors (refused unread: a checkpoint never runs code). {what}"
        ) from err


def checkpoint_problem(folder: str | os.PathLike[str], required: Iterable[str] = ()) -> str | None:
    """Why `folder` cannot be resumed from (a sentence naming the file), or `None` if it is complete: a readable
    `trainer_state.json`, non-empty `optimizer.pt` and `scheduler.pt` (the Trainer silently skips both when either
    is missing, which would restart HiSo's directions and preconditioner), every file of `required`, and every file
    of the manifest with its recorded size and SHA-256."""
    folder = os.fspath(folder)
    state = os.path.join(folder, TRAINER_STATE_NAME)
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except FileNotFoundError:
        return f"{state} is missing (the checkpoint was cut off while being written)"
    except (OSError, ValueError) as err:
        return f"{state} is unreadable ({type(err).__name__})"
    for name in (OPTIMIZER_NAME, SCHEDULER_NAME, *required):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) == 0:
            return f"{path} is empty"
    return _manifest_problem(folder)


def newest_complete_checkpoint(output_dir: str | os.PathLike[str], required: Iterable[str] = ()) -> tuple[str, list]:
    """The newest complete `checkpoint-N` folder of `output_dir` and the `(folder, reason)` pairs of the newer ones
    it skipped. Raises a `ValueError` when there is none."""
    output_dir = os.fspath(output_dir)
    required = tuple(required)
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = sorted(
        (int(m.group(1)), n)
        for n in names
        if (m := _CHECKPOINT_RE.match(n)) and os.path.isdir(os.path.join(output_dir, n))
    )
    skipped: list[tuple[str, str]] = []
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        problem = checkpoint_problem(folder, required)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    detail = "; ".join(f"{f}: {p}" for f, p in skipped) or "no checkpoint-N folder"
    raise ValueError(f"No complete checkpoint in {output_dir} to resume from ({detail}).")
