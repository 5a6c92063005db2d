"""fastshift's ops and the backend choice.

Backends (``backend=`` argument, else the ``FASTSHIFT_BACKEND`` environment variable, else
``auto``):

- ``reference``: plain PyTorch (``fastshift.ops.reference``), always available.
- ``cpu``: the compiled C++ bodies of ``fastshift._C`` (CPU tensors).
- ``cuda``: the compiled CUDA bodies of ``fastshift._C`` (CUDA tensors).
- ``auto``: the compiled body for the tensor's device when it was built, else ``reference``.

An explicitly requested backend that was not built raises with the rebuild command.
"""

from __future__ import annotations

import os

import torch

from . import reference
from ._registry import BUILD_ERROR, HAVE_C, cuda_built

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "channel_split",
           "channel_interleave", "reference", "HAVE_C", "BUILD_ERROR", "cuda_built"]

BACKENDS = ("reference", "cpu", "cuda", "auto")
REBUILD = "pip install --no-build-isolation -e .  (or: bash scripts/install.sh)"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends usable now (for ``device`` when given): built, and with a device to run on."""
    out = ["reference"]
    if HAVE_C:
        out.append("cpu")
        if cuda_built() and torch.cuda.is_available():
            out.append("cuda")
    if device is not None:
        kind = torch.device(device).type
        out = [b for b in out if b == "reference" or b == kind]
    return out


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The concrete backend (reference | cpu | cuda) to run on ``device``."""
    name = (backend or os.environ.get("FASTSHIFT_BACKEND") or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown fastshift backend {name!r}: choose one of {list(BACKENDS)}")
    kind = torch.device(device).type
    if name == "auto":
        if HAVE_C and (kind == "cpu" or (kind == "cuda" and cuda_built())):
            return kind
        return "reference"
    if name == "reference":
        return name
    if not HAVE_C:
        raise RuntimeError(
            f"fastshift backend {name!r} was not built (fastshift._C failed to import: "
            f"{BUILD_ERROR}); rebuild with: {REBUILD}"
        )
    if name == "cuda" and not cuda_built():
        raise RuntimeError(
            "fastshift backend 'cuda' was not built (fastshift._C has no CUDA bodies); rebuild "
            f"on a machine with the CUDA toolkit and FASTSHIFT_FORCE_CUDA=1: {REBUILD}"
        )
    if name != kind:
        raise ValueError(f"fastshift backend {name!r} cannot run tensors on device {kind!r}")
    return name


def channel_split(x: torch.Tensor, backend: str | None = None):
    """``x [B, C, H, W]`` -> ``(x[:, 0::2], x[:, 1::2])``; see ``reference.channel_split``.

    Compiled backends return contiguous copies and are differentiable (the backward is
    ``channel_interleave``); the reference returns strided views.
    """
    if resolve_backend(backend, x.device) == "reference":
        return reference.channel_split(x)
    return torch.ops.fastshift.channel_split(x)


def channel_interleave(even: torch.Tensor, odd: torch.Tensor, backend: str | None = None):
    """``(even, odd)`` -> ``out`` with ``out[:, 0::2] = even``, ``out[:, 1::2] = odd``."""
    if resolve_backend(backend, even.device) == "reference":
        return reference.channel_interleave(even, odd)
    return torch.ops.fastshift.channel_interleave(even, odd)
