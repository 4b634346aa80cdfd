"""Data loading: sklearn digits, tensor files, image folders, and their error messages."""

import numpy as np
import pytest
import torch
from PIL import Image

from mucs_fast.data import (
    load_digits,
    load_image_folder,
    load_images,
    load_labels,
    load_tensor_file,
)


@pytest.mark.parametrize("mode", ["resize", "pad"])
def test_load_digits(mode):
    x, y = load_digits(16, mode)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert x.min() == -1 and x.max() == 1
    from sklearn.datasets import load_digits as sk

    raw = torch.as_tensor(sk().images[0], dtype=torch.float32) / 8 - 1
    if mode == "pad":
        torch.testing.assert_close(x[0, 0, 4:12, 4:12], raw)
        assert (x[:, :, :4] == -1).all() and (x[:, :, :, 12:] == -1).all()
    x8, _ = load_digits(8, mode)
    torch.testing.assert_close(x8[0, 0], raw)


def test_load_digits_bad_args():
    with pytest.raises(ValueError, match="mode"):
        load_digits(16, "crop")
    with pytest.raises(ValueError, match=">= 8"):
        load_digits(6, "pad")


def test_tensor_files_roundtrip(tmp_path):
    from safetensors.torch import save_file

    x = torch.rand(5, 1, 4, 4) * 2 - 1
    torch.save(x, tmp_path / "a.pt")
    np.save(tmp_path / "a.npy", x.numpy())
    save_file({"images": x}, str(tmp_path / "one.safetensors"))
    save_file({"images": x, "labels": torch.arange(5)}, str(tmp_path / "two.safetensors"))
    torch.save({"x": x, "y": torch.arange(5)}, tmp_path / "d.pt")
    for p in ["a.pt", "a.npy", "one.safetensors", "two.safetensors:images", "d.pt:x"]:
        torch.testing.assert_close(
            load_tensor_file(tmp_path / p if ":" not in p else f"{tmp_path}/{p}"), x
        )
    imgs, ids = load_images(tmp_path / "one.safetensors")
    torch.testing.assert_close(imgs, x)
    assert ids.tolist() == [0, 1, 2, 3, 4]
    assert load_labels(f"{tmp_path}/two.safetensors:labels", n=5).dtype == torch.int64
    u8 = (torch.arange(4 * 3 * 2 * 2) % 256).to(torch.uint8).reshape(4, 3, 2, 2)
    torch.save(u8, tmp_path / "u8.pt")
    torch.testing.assert_close(load_images(tmp_path / "u8.pt")[0], u8.float() / 127.5 - 1)


def test_tensor_file_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_tensor_file(tmp_path / "nope.pt")
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=r"x\.txt.*extension"):
        load_tensor_file(tmp_path / "x.txt")
    (tmp_path / "bad.pt").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"bad\.pt.*cannot read"):
        load_tensor_file(tmp_path / "bad.pt")
    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match=r"two\.safetensors.*exactly one.*\['a', 'b'\]"):
        load_tensor_file(tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="no tensor named 'c'"):
        load_tensor_file(f"{tmp_path}/two.safetensors:c")
    torch.save(torch.zeros(3, 4, 4, dtype=torch.int32), tmp_path / "i.pt")
    with pytest.raises(ValueError, match=r"i\.pt.*\[N, C, H, W\].*\(3, 4, 4\)"):
        load_images(tmp_path / "i.pt")
    torch.save(torch.zeros(3, 1, 4, 4, dtype=torch.int32), tmp_path / "i4.pt")
    with pytest.raises(ValueError, match=r"i4\.pt.*float.*torch\.int32"):
        load_images(tmp_path / "i4.pt")
    torch.save(torch.zeros(3), tmp_path / "yf.pt")
    with pytest.raises(ValueError, match=r"yf\.pt.*integer class ids.*float32"):
        load_labels(tmp_path / "yf.pt")
    torch.save(torch.zeros(3, dtype=torch.long), tmp_path / "y3.pt")
    with pytest.raises(ValueError, match=r"y3\.pt.*expected 4 labels.*found 3"):
        load_labels(tmp_path / "y3.pt", n=4)
    assert load_labels(tmp_path / "y3.pt").shape == (3,)


def _write(folder, name, mode, size, value):
    folder.mkdir(exist_ok=True)
    Image.new(mode, size, value).save(folder / name)


def test_image_folder(tmp_path):
    d = tmp_path / "imgs"
    _write(d, "10.png", "RGB", (6, 4), (255, 0, 128))
    _write(d, "2.png", "RGB", (6, 4), (0, 0, 0))
    (d / "notes.txt").write_text("ignored")
    x, ids = load_image_folder(d)
    assert x.shape == (2, 3, 4, 6) and x.dtype == torch.float32
    assert ids.tolist() == [10, 2]  # sorted names: "10.png" < "2.png"; ids from the stems
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]))
    assert (x[1] == -1).all()
    xi, idi = load_images(d)
    assert torch.equal(xi, x) and torch.equal(idi, ids)

    g = tmp_path / "gray"
    _write(g, "b.png", "L", (4, 4), 255)
    _write(g, "a.png", "L", (4, 4), 0)
    x, ids = load_image_folder(g)
    assert x.shape == (2, 1, 4, 4) and ids.tolist() == [0, 1] and (x[0] == -1).all()


def test_image_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(ValueError, match=r"empty.*found none"):
        load_image_folder(empty)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing")
    d = tmp_path / "mixed"
    _write(d, "0.png", "L", (4, 4), 0)
    _write(d, "1.png", "L", (4, 4), 0)
    _write(d, "2.png", "L", (5, 4), 0)
    _write(d, "3.png", "RGB", (4, 4), 0)
    with pytest.raises(ValueError, match=r"2\.png: expected 4×4 L like 0\.png, found 5×4 L"):
        load_image_folder(d)
    m = tmp_path / "mode"
    _write(m, "0.png", "L", (4, 4), 0)
    _write(m, "1.png", "RGB", (4, 4), 0)
    with pytest.raises(ValueError, match=r"1\.png.*found 4×4 RGB"):
        load_image_folder(m)
    c = tmp_path / "corrupt"
    _write(c, "0.png", "L", (4, 4), 0)
    (c / "1.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"1\.png: cannot read it as an image"):
        load_image_folder(c)
