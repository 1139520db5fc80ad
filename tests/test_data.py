"""Embedded data, local MNIST/CIFAR-10 files in their real formats, and the data adapters."""

import gzip
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from relucap_plugin.data import (
    as_dataset,
    as_loader,
    as_tensors,
    load_cifar10,
    load_digits_dataset,
    load_mnist,
    load_mnist5k,
    numbered_batches,
    unpack_batch,
)

# --------------------------------------------------------------------------- embedded data


def test_mnist5k_split_is_stratified_seeded_and_disjoint():
    train, test = load_mnist5k()
    x, y = train.tensors
    assert x.shape == (4000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 1
    assert torch.bincount(test.tensors[1], minlength=10).tolist() == [100] * 10
    rows = {bytes(r.numpy()) for r in (torch.cat([x, test.tensors[0]]) * 255).to(torch.uint8)}
    assert len(rows) == 5000  # every digit lands in exactly one split
    again = load_mnist5k()
    assert torch.equal(again[1].tensors[0], test.tensors[0])
    assert not torch.equal(load_mnist5k(seed=1)[1].tensors[1], test.tensors[1])
    assert len(load_mnist5k(n_test=500)[1]) == 500
    with pytest.raises(ValueError, match="n_test must be between 10 and 4990"):
        load_mnist5k(n_test=5)


def test_digits_fallback_is_8x8_in_unit_range_and_stratified():
    train, test = load_digits_dataset(n_test=100, seed=2)
    assert train.tensors[0].shape == (1697, 1, 8, 8) and test.tensors[0].shape == (100, 1, 8, 8)
    assert train.tensors[0].min() == 0 and train.tensors[0].max() == 1
    assert torch.bincount(test.tensors[1], minlength=10).tolist() == [10] * 10
    assert torch.equal(load_digits_dataset(n_test=100, seed=2)[0].tensors[1], train.tensors[1])


def test_digits_without_sklearn_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits_dataset()


# --------------------------------------------------------------------------- MNIST IDX files


def _write_idx(path, array, compress):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_mnist(folder, compress=False, sep="-"):
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for stem, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        gz = ".gz" if compress else ""
        _write_idx(os.path.join(folder, f"{stem}-images{sep}idx3-ubyte{gz}"), images, compress)
        _write_idx(os.path.join(folder, f"{stem}-labels{sep}idx1-ubyte{gz}"), labels, compress)
        arrays[stem] = (images, labels)
    return arrays


@pytest.mark.parametrize(
    "layout, compress, sep",
    [("", False, "-"), ("", True, "-"), ("MNIST/raw", True, "-"), ("raw", False, ".")],
)
def test_load_mnist_reads_idx_files_in_every_layout(tmp_path, layout, compress, sep):
    arrays = _fake_mnist(tmp_path / layout, compress, sep)
    train, test = load_mnist(tmp_path)
    for ds, (images, labels) in ((train, arrays["train"]), (test, arrays["t10k"])):
        x, y = ds.tensors
        assert x.shape == (len(images), 1, 28, 28) and x.dtype == torch.float32
        assert torch.equal(x, torch.from_numpy(images).float().unsqueeze(1) / 255)
        assert y.dtype == torch.int64 and y.tolist() == labels.tolist()


def test_load_mnist_missing_files_are_named(tmp_path):
    _fake_mnist(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert "missing t10k-labels-idx1-ubyte[.gz]" in message and "train-images" not in message
    assert "MNIST/raw" in message and "nothing is downloaded" in message
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path / "empty")


def test_load_mnist_rejects_corrupt_files(tmp_path):
    _fake_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_mnist(tmp_path)
    path.write_bytes(b"\x00\x00\x0d\x01" + raw[4:])
    with pytest.raises(ValueError, match="bad magic number 00000d01"):
        load_mnist(tmp_path)
    _write_idx(path, np.zeros(3, np.uint8), False)
    with pytest.raises(ValueError, match="disagree"):
        load_mnist(tmp_path)


# --------------------------------------------------------------------------- CIFAR-10 batches


def _fake_cifar(folder, n=3):
    rng = np.random.default_rng(1)
    os.makedirs(folder, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f, protocol=2)
        batches[name] = (data, labels)
    return batches


@pytest.mark.parametrize("inner", [True, False])
def test_load_cifar10_reads_python_batches(tmp_path, inner):
    batches = _fake_cifar(tmp_path / "cifar-10-batches-py" if inner else tmp_path)
    train, test = load_cifar10(tmp_path)
    x, y = train.tensors
    assert x.shape == (15, 3, 32, 32) and test.tensors[0].shape == (3, 3, 32, 32)
    data, labels = batches["data_batch_2"]
    # row layout: 1024 red, then green, then blue values, each 32x32 row-major
    assert x[3, 1, 5, 7] == pytest.approx(data[0, 1024 + 5 * 32 + 7] / 255)
    assert y[3:6].tolist() == labels and y.dtype == torch.int64
    assert test.tensors[1].tolist() == batches["test_batch"][1]


def test_load_cifar10_missing_and_malicious_files(tmp_path):
    _fake_cifar(tmp_path / "cifar-10-batches-py")
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_4")
    with pytest.raises(FileNotFoundError, match="missing data_batch_4 .*test_batch"):
        load_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_4", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        load_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_4", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_cifar10(tmp_path)


# --------------------------------------------------------------------------- adapters


class _ListDataset(Dataset):
    """A user data set returning (image, python int) items."""

    def __init__(self, n):
        self.x = torch.rand(n, 1, 4, 4)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 3


def test_as_dataset_accepts_pairs_numpy_datasets_and_loaders():
    x, y = torch.rand(6, 1, 4, 4), torch.arange(6, dtype=torch.int32)
    ds = as_dataset((x, y))
    assert isinstance(ds, TensorDataset) and ds.tensors[1].dtype == torch.int64
    ds_np = as_dataset([x.numpy(), y.numpy()])
    assert torch.equal(ds_np.tensors[0], x)
    user = _ListDataset(5)
    assert as_dataset(user) is user and as_dataset(DataLoader(user)) is user


@pytest.mark.parametrize(
    "data, error, words",
    [
        ((torch.zeros(4, 3, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)), TypeError,
         "x.float() / 255"),
        ((torch.rand(4, 3), torch.rand(4)), TypeError, "integer class labels"),
        ((torch.rand(4, 3), torch.zeros(4, 10, dtype=torch.long)), TypeError, "one-hot"),
        ((torch.rand(4, 3), torch.zeros(5, dtype=torch.long)), ValueError, "same number"),
        ((torch.rand(0, 3), torch.zeros(0, dtype=torch.long)), ValueError, "empty"),
        ((torch.rand(4, 3),), ValueError, "2 entries"),
        (([1, 2], torch.zeros(2, dtype=torch.long)), TypeError, "tensor or numpy array"),
        ("mnist", TypeError, "cannot use str as data"),
    ],
)
def test_as_dataset_bad_input(data, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        as_dataset(data)


def test_as_loader_seeded_shuffle_batches_and_passthrough():
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    order = [b[1].tolist() for b in as_loader((x, y), batch_size=4, shuffle=True, seed=5)]
    assert [len(b) for b in order] == [4, 4, 2]
    assert sorted(sum(order, [])) == list(range(10)) and sum(order, []) != list(range(10))
    assert order == [b[1].tolist() for b in as_loader((x, y), batch_size=4, shuffle=True, seed=5)]
    assert order != [b[1].tolist() for b in as_loader((x, y), batch_size=4, shuffle=True, seed=6)]
    plain = [b[0] for b in as_loader((x, y), batch_size=3)]
    assert torch.equal(torch.cat(plain), x)
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    assert as_loader(loader, batch_size=2) is loader
    xb, yb = next(iter(as_loader(_ListDataset(5), batch_size=2)))
    assert xb.shape == (2, 1, 4, 4) and yb.tolist() == [0, 1]
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        as_loader((x, y), batch_size=0)


def test_as_tensors_from_every_form_with_limit():
    x, y = torch.rand(7, 1, 4, 4), torch.arange(7)
    for data in [(x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=3)]:
        xs, ys = as_tensors(data)
        assert torch.equal(xs, x) and torch.equal(ys, y)
        xs, ys = as_tensors(data, limit=4)
        assert torch.equal(xs, x[:4]) and torch.equal(ys, y[:4])
    xs, ys = as_tensors(_ListDataset(5))
    assert xs.shape == (5, 1, 4, 4) and ys.tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="limit"):
        as_tensors((x, y), limit=0)


def test_unpack_batch_rejects_non_pairs():
    assert unpack_batch([1, 2]) == (1, 2)
    with pytest.raises(TypeError, match=r"\(x, y\) pairs, got dict"):
        unpack_batch({"image": 1, "label": 2})
    with pytest.raises(TypeError, match="of length 3"):
        unpack_batch((1, 2, 3))


@pytest.mark.parametrize("limit", [None, 1, 5, 7, 100])
def test_numbered_batches_index_by_first_sample_and_cut_at_the_limit(limit):
    x, y = torch.rand(10, 1, 2, 2), torch.arange(10) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    got = list(numbered_batches(loader, limit))
    n = 10 if limit is None else min(limit, 10)
    assert [s for s, _, _ in got] == list(range(0, n, 3))
    assert torch.equal(torch.cat([b for _, b, _ in got]), x[:n])
    assert torch.equal(torch.cat([c for _, _, c in got]), y[:n])
    # a rank's batches (2nd and 4th of the run) keep the run's indices
    part = [b for i, b in enumerate(loader) if i in (1, 3)]
    assert [(s, len(b)) for s, b, _ in numbered_batches(part, limit, starts=[3, 9])] == [
        (s, len(x[s:n][:3])) for s in (3, 9) if s < n]
