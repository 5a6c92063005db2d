"""Data for search and training: persistent, resumable batch streams; a fixed, class-balanced
evaluation subset decoded once and kept on the device; the built-in digits data; ImageFolder.

Data given to fastshift is either a pair ``(images, labels)`` of tensors / arrays
(``images [N, C, H, W]`` float, ``labels [N]`` int) or a ``torch.utils.data.Dataset`` whose items
are ``(image [C, H, W], label)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["TensorData", "as_dataset", "BatchStream", "EvalSet", "digits", "image_folder",
           "dataset_labels"]


class TensorData(Dataset):
    """An in-memory dataset: ``images [N, C, H, W]`` float, ``labels [N]`` int64."""

    def __init__(self, images, labels):
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            images = images.float()
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be [N] with N = {images.shape[0]} images, got shape "
                f"{tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
        self.images = images
        self.labels = labels.long()

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0


def as_dataset(data, what: str = "data") -> Dataset:
    """``(images, labels)`` -> TensorData; a Dataset is returned as is; anything else errors."""
    if data is None:
        raise ValueError(f"{what} is missing")
    if isinstance(data, Dataset):
        if len(data) == 0:
            raise ValueError(f"{what} is empty")
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        ds = TensorData(*data)
        if len(ds) == 0:
            raise ValueError(f"{what} is empty")
        return ds
    raise ValueError(
        f"{what} must be a (images, labels) pair or a torch Dataset, got {type(data).__name__}"
    )


def dataset_labels(ds: Dataset) -> torch.Tensor:
    """All labels of a dataset, read cheaply where the dataset keeps them (``labels`` /
    ``targets``), else by iterating it once."""
    for attr in ("labels", "targets"):
        if hasattr(ds, attr):
            return torch.as_tensor(getattr(ds, attr)).long()
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)


def _collate(ds: Dataset, idx: torch.Tensor):
    if isinstance(ds, TensorData):
        return ds.images[idx], ds.labels[idx]
    items = [ds[int(i)] for i in idx]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor(
        [int(y) for _, y in items], dtype=torch.long
    )


class BatchStream:
    """An endless stream of shuffled training batches that never restarts its workers.

    Batch ``k`` is a pure function of ``(seed, k)``: the data are walked epoch after epoch,
    each epoch in its own permutation drawn from ``seed`` and the epoch number, batches running
    across epoch boundaries. ``state_dict()`` is just the number of batches taken, so a resumed
    stream continues exactly.

    Args:
        data: see the module docstring.
        batch_size: images per batch.
        seed: permutation seed.
        device: where batches are delivered.
        dtype: images are cast to this float dtype.
    """

    def __init__(self, data, batch_size: int, *, seed: int = 0, device="cpu",
                 dtype=torch.float32):
        self.dataset = as_dataset(data, "training data")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.dtype = dtype
        self.n = len(self.dataset)
        self.taken = 0
        self._perm_epoch = -1
        self._perm = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, k: int) -> torch.Tensor:
        """Dataset indices of batch ``k``."""
        start = k * self.batch_size
        parts = []
        while start < (k + 1) * self.batch_size:
            epoch, pos = divmod(start, self.n)
            take = min(self.n - pos, (k + 1) * self.batch_size - start)
            parts.append(self._permutation(epoch)[pos:pos + take])
            start += take
        return torch.cat(parts)

    def next(self):
        """The next ``(images [B, C, H, W], labels [B])`` on ``device``."""
        x, y = _collate(self.dataset, self.indices(self.taken))
        self.taken += 1
        non_blocking = self.device.type == "cuda"
        return (x.to(self.device, self.dtype, non_blocking=non_blocking),
                y.to(self.device, non_blocking=non_blocking))

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "taken": self.taken, "n": self.n}

    def load_state_dict(self, state: dict):
        for key in ("seed", "batch_size", "n"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"training stream mismatch on resume: {key} was {state[key]}, now "
                    f"{getattr(self, key)} (same data and batch size are needed to resume)"
                )
        self.taken = int(state["taken"])


@dataclass
class EvalSet:
    """A fixed evaluation subset, decoded once, stored as batches on ``device``.

    Built by :meth:`balanced`: up to ``num_batches * batch_size`` images chosen class-balanced
    (round-robin over the classes, each class in a seeded random order), unlike the released
    code's class-ordered prefix of the validation folder.
    """

    batches: list
    num_images: int
    num_classes_seen: int

    @classmethod
    def balanced(cls, data, num_batches: int, batch_size: int, *, seed: int = 0, device="cpu",
                 dtype=torch.float32) -> EvalSet:
        ds = as_dataset(data, "validation data")
        if num_batches < 1 or batch_size < 1:
            raise ValueError(
                f"val_batches and val_batch_size must be positive, got {num_batches}, "
                f"{batch_size}"
            )
        labels = dataset_labels(ds)
        want = min(num_batches * batch_size, len(ds))
        g = torch.Generator().manual_seed(int(seed) + 7919)
        per_class = []
        for c in torch.unique(labels).tolist():
            members = torch.nonzero(labels == c).flatten()
            per_class.append(members[torch.randperm(len(members), generator=g)])
        order = []
        depth = 0
        while len(order) < want:
            for members in per_class:
                if depth < len(members) and len(order) < want:
                    order.append(int(members[depth]))
            depth += 1
        idx = torch.tensor(sorted(order), dtype=torch.long)
        batches = []
        for start in range(0, want, batch_size):
            x, y = _collate(ds, idx[start:start + batch_size])
            batches.append((x.to(device, dtype), y.to(device)))
        return cls(batches, want, len(per_class))

    def max_label(self) -> int:
        return max(int(y.max()) for _, y in self.batches)


def digits(*, seed: int = 0, classes=None, val_fraction: float = 0.2,
           test_fraction: float = 0.2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The 8x8 grayscale digits of scikit-learn (1,797 images), split per class into fixed,
    seeded train / val / test parts.

    Returns ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` with ``x [N, 1, 8, 8]`` float32
    scaled to [0, 1] and ``y [N]`` int64. ``classes`` (e.g. ``range(5, 10)``) keeps only those
    digits and relabels them 0..len(classes)-1, for transfer experiments.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    if classes is not None:
        classes = [int(c) for c in classes]
        if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(range(10)):
            raise ValueError(f"classes must be distinct digits 0..9, got {classes}")
        keep = torch.isin(labels, torch.tensor(classes))
        images, labels = images[keep], labels[keep]
        remap = torch.full((10,), -1, dtype=torch.long)
        remap[torch.tensor(classes)] = torch.arange(len(classes))
        labels = remap[labels]
    if not (0 < val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in torch.unique(labels).tolist():
        members = np.flatnonzero(labels.numpy() == c)
        members = members[rng.permutation(len(members))]
        n_val = int(round(val_fraction * len(members)))
        n_test = int(round(test_fraction * len(members)))
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val:n_val + n_test])
        parts["train"].append(members[n_val + n_test:])
    out = {}
    for name, chunks in parts.items():
        idx = torch.from_numpy(np.sort(np.concatenate(chunks))).long()
        out[name] = (images[idx], labels[idx])
    return out


def image_folder(root: str | os.PathLike, *, input_size: int = 224, train: bool = True,
                 convention: str = "spos"):
    """A torchvision ImageFolder (ImageNet layout: ``root/<class>/<image>``).

    ``convention="spos"``: BGR channel order, values 0-255, no normalisation: the input of the
    released SPOS / Supernet Shifting checkpoints. ``convention="imagenet"``: RGB in [0, 1]
    normalised with the ImageNet mean/std. Training images get a random resized crop and flip,
    evaluation images a resize to 8/7 of the size and a center crop.
    """
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise ImportError(
            "image folders need torchvision: pip install 'fastshift[vision]'"
        ) from exc
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    if convention not in ("spos", "imagenet"):
        raise ValueError(f"convention must be 'spos' or 'imagenet', got {convention!r}")
    if train:
        geometry = [transforms.RandomResizedCrop(input_size), transforms.RandomHorizontalFlip()]
    else:
        geometry = [transforms.Resize(int(round(input_size * 8 / 7))),
                    transforms.CenterCrop(input_size)]
    if convention == "spos":
        tail = [transforms.PILToTensor(),
                transforms.Lambda(lambda t: t.flip(0).float())]  # RGB -> BGR, 0-255
    else:
        tail = [transforms.ToTensor(),
                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    return datasets.ImageFolder(root, transform=transforms.Compose(geometry + tail))
