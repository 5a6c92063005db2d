"""Checkpoint files: safe loading of supernet weights (ours or the released SPOS / Supernet
Shifting format) and atomic, versioned writes.

This module depends on torch only, so every other module may use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import torch

__all__ = ["load_state_dict", "normalize_state_dict", "check_state_dict", "atomic_save",
           "FORMAT_VERSION"]

FORMAT_VERSION = 1


def normalize_state_dict(obj) -> dict[str, torch.Tensor]:
    """Unwrap ``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"supernet": ...}`` nesting and
    strip a ``module.`` prefix (DataParallel / DDP) from every key."""
    seen = 0
    while isinstance(obj, Mapping) and seen < 4:
        for key in ("state_dict", "supernet", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            break
        seen += 1
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, not a state dict")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ValueError(f"state dict key {key!r} is not a string")
        name = key[len("module."):] if key.startswith("module.") else key
        out[name] = value
    return out


def load_state_dict(path: str | os.PathLike, map_location="cpu") -> dict[str, torch.Tensor]:
    """Read a supernet checkpoint safely (``torch.load(weights_only=True)``) and normalize it
    (nested ``state_dict``, ``module.`` prefix). Raises FileNotFoundError / ValueError with the
    path in the message."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    try:
        return normalize_state_dict(obj)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                     *, what: str = "supernet", strict: bool = True) -> None:
    """Raise ValueError naming the first missing, unexpected or mis-shaped key."""
    for key, value in expected.items():
        if key not in given:
            if strict:
                raise ValueError(f"{what} checkpoint is missing key {key!r} "
                                 f"(expected shape {tuple(value.shape)})")
            continue
        got = given[key]
        if not isinstance(got, torch.Tensor):
            raise ValueError(f"{what} checkpoint key {key!r} holds a {type(got).__name__}")
        if tuple(got.shape) != tuple(value.shape):
            raise ValueError(
                f"{what} checkpoint key {key!r} has shape {tuple(got.shape)}, expected "
                f"{tuple(value.shape)} (a different space, or a different class count: pass "
                "num_classes= to match the checkpoint)"
            )
    if strict:
        for key in given:
            if key not in expected:
                raise ValueError(f"{what} checkpoint has unexpected key {key!r}")


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``: a
    crash leaves either the old file or the new one, never a torn one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
