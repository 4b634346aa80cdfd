"""Streamed training sets (mucs_fast/data/): every Source reads, gathers and fingerprints as the
in-memory tensor of its float32 values; `pack` round-trips every input format; damaged folders fail
in check(); prefetch matches direct reads, re-raises, stops its thread; memory stays bounded."""

import ctypes
import json
import os
import pickle
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mucs_fast import data as sources
from mucs_fast._io import tensor_digest
from mucs_fast.cli import main
from mucs_fast.compat.reference_files import load_dataset, save_dataset
from mucs_fast.data import (
    NpySource,
    SafetensorsSource,
    ShardSource,
    Source,
    TensorSource,
    as_images,
    load_image_folder,
    open_source,
    pack,
    prefetch,
    source_digest,
)

N, CHW = 23, (3, 5, 4)


def _u8(n=N, chw=CHW, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *chw), generator=g, dtype=torch.uint8)


def _f32(n=N, chw=CHW, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *chw), generator=g) * 2 - 1


def _make(kind, tmp_path):
    """(source, the float32 tensor it must read as)."""
    x8, xf = _u8(), _f32()
    v8 = x8.float() / 127.5 - 1
    if kind == "tensor-f32":
        return TensorSource(xf), xf
    if kind == "tensor-u8":
        return TensorSource(x8), v8
    if kind == "tensor-f16":
        return TensorSource(xf.half()), xf.half().float()
    if kind == "tensor-noncontiguous":
        x = xf.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # same values, other strides
        return TensorSource(x), xf
    if kind.startswith("npy-"):
        arrays = {
            "npy-u8": (x8.numpy(), v8),
            "npy-f16": (xf.half().numpy(), xf.half().float()),
            "npy-f32": (xf.numpy(), xf),
            "npy-f64": (xf.double().numpy(), xf.double().float()),
            "npy-fortran": (np.asfortranarray(xf.numpy()), xf),
            "npy-bigendian": (xf.numpy().astype(">f4"), xf),
        }
        a, want = arrays[kind]
        np.save(tmp_path / "x.npy", a)
        return NpySource(tmp_path / "x.npy"), want
    if kind.startswith("safetensors-"):
        t = {
            "safetensors-u8": (x8, v8),
            "safetensors-f32": (xf, xf),
            "safetensors-bf16": (xf.bfloat16(), xf.bfloat16().float()),
        }[kind]
        save_file({"images": t[0], "other": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
        return SafetensorsSource(f"{tmp_path}/x.safetensors:images"), t[1]
    if kind == "shard-u8":
        pack(x8, tmp_path / "packed", shard_images=5, progress=False)
        return ShardSource(tmp_path / "packed"), v8
    if kind == "shard-f32":
        pack(xf, tmp_path / "packed", shard_images=7, progress=False)
        return ShardSource(tmp_path / "packed"), xf
    raise AssertionError(kind)


KINDS = [
    "tensor-f32",
    "tensor-u8",
    "tensor-f16",
    "tensor-noncontiguous",
    "npy-u8",
    "npy-f16",
    "npy-f32",
    "npy-f64",
    "npy-fortran",
    "npy-bigendian",
    "safetensors-u8",
    "safetensors-f32",
    "safetensors-bf16",
    "shard-u8",
    "shard-f32",
]


def _same(a, b):
    """Bitwise: same shape, dtype and bytes."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.mark.parametrize("kind", KINDS)
def test_read_gather_fingerprint_equal_tensor_source(kind, tmp_path):
    src, want = _make(kind, tmp_path)
    src.check()
    assert (src.N, src.chw) == (N, CHW) and src.shape == (N, *CHW) and len(src) == N
    for a, b in [(0, N), (3, 17), (5, 5), (N - 1, N), (4, 11)]:  # 4..11 crosses shards of 5 and 7
        x = src.read(a, b)
        assert x.device.type == "cpu" and x.is_contiguous()
        _same(x, want[a:b])
    idx = torch.tensor([22, 0, 7, 7, 13, 6, 5, 21])  # unsorted, repeated, across shards
    _same(src.gather(idx), want[idx])
    _same(src.gather(torch.arange(4, 9)), want[4:9])
    assert src.gather(torch.tensor([], dtype=torch.int64)).shape == (0, *CHW)
    ref = TensorSource(want).fingerprint()
    assert ref == tensor_digest(want)
    assert src.fingerprint() == ref
    assert (
        type(src)(*_reopen_args(src)).fingerprint(chunk_images=4) == ref
    )  # several chunks, no cache
    _same(pickle.loads(pickle.dumps(src)).read(2, 9), want[2:9])  # to another process: paths only


def _reopen_args(src):
    if isinstance(src, TensorSource):
        return (src.x,)
    if isinstance(src, SafetensorsSource):
        return (src.path, src.key)
    return (src.path,)


def test_uint8_values_are_data_as_images():
    x8 = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    _same(TensorSource(x8).read(0, 4), as_images(x8, "x"))


def test_bad_reads_and_gathers(tmp_path):
    src, _ = _make("npy-u8", tmp_path)
    for a, b in [(-1, 3), (3, 2), (0, N + 1)]:
        with pytest.raises(ValueError, match="outside"):
            src.read(a, b)
    with pytest.raises(ValueError, match="outside"):
        src.gather(torch.tensor([0, N]))
    with pytest.raises(ValueError, match="integer positions"):
        src.gather(torch.tensor([0.0, 1.0]))


def test_source_digest_is_tensor_digest_of_the_values(tmp_path):
    src, want = _make("shard-u8", tmp_path)
    y = torch.arange(N) % 3
    assert source_digest({"x": src, "y": y, "ids": src.ids}) == tensor_digest(
        {"x": want, "y": y, "ids": src.ids}
    )
    assert source_digest(src) == tensor_digest(want)


def test_check_finite_names_the_image(tmp_path):
    x = _f32()
    x[9, 1, 2, 3] = float("nan")
    np.save(tmp_path / "x.npy", x.numpy())
    src = NpySource(tmp_path / "x.npy")
    assert src.fingerprint() == tensor_digest(x)  # the digest does not refuse; check_finite does
    with pytest.raises(ValueError, match="image 9 "):
        src.check_finite()
    TensorSource(_f32()).check_finite()
    with pytest.raises(ValueError, match="NaN or Inf"):
        pack(tmp_path / "x.npy", tmp_path / "p", progress=False)
    assert not (tmp_path / "p" / "index.json").exists()


# ------------------------------------------------------------------------------------------------
# pack round trips
# ------------------------------------------------------------------------------------------------
def test_pack_image_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    x8 = _u8(7, (3, 6, 5))
    for i in range(7):
        Image.fromarray(x8[i].permute(1, 2, 0).numpy(), "RGB").save(
            folder / f"{10 + 3 * i:04d}.png"
        )
    y = torch.arange(7) % 4
    torch.save(y, tmp_path / "y.pt")
    index = pack(folder, tmp_path / "p", shard_images=3, progress=False, labels=tmp_path / "y.pt")
    assert [s["count"] for s in index["shards"]] == [3, 3, 1] and index["dtype"] == "uint8"
    src = ShardSource(tmp_path / "p")
    src.check()
    src.verify()
    want, ids = load_image_folder(folder)
    _same(src.read(0, 7), want)
    _same(src.read(0, 7), x8.float() / 127.5 - 1)
    assert torch.equal(src.ids, ids) and src.ids.tolist() == [10 + 3 * i for i in range(7)]
    assert torch.equal(src.labels, y) and src.labels.dtype == torch.int64
    assert src.fingerprint() == tensor_digest(want) == index["fingerprint"]


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "pt"])
def test_pack_tensor_files(fmt, tmp_path):
    x8, xf = _u8(), _f32()
    y = torch.nn.functional.one_hot(torch.arange(N) % 5, 5).float()
    if fmt == "npy":  # uint8 stays uint8
        np.save(tmp_path / "x.npy", x8.numpy())
        np.save(tmp_path / "y.npy", y.numpy())
        path, labels, want = tmp_path / "x.npy", tmp_path / "y.npy", x8.float() / 127.5 - 1
    elif fmt == "safetensors":
        save_file({"x": xf, "y": y}, str(tmp_path / "d.safetensors"))
        path, labels, want = f"{tmp_path}/d.safetensors:x", f"{tmp_path}/d.safetensors:y", xf
    else:
        torch.save(xf, tmp_path / "x.pt")
        torch.save(y, tmp_path / "y.pt")
        path, labels, want = tmp_path / "x.pt", tmp_path / "y.pt", xf
    index = pack(path, tmp_path / "p", shard_images=10, progress=False, labels=labels)
    assert index["dtype"] == ("uint8" if fmt == "npy" else "float32")
    src = open_source(tmp_path / "p")
    src.check()
    _same(src.read(0, N), want)
    assert torch.equal(src.ids, torch.arange(N))
    _same(src.labels, y)


def test_pack_reference_folder(tmp_path):
    ds = tmp_path / "ref"
    x8 = _u8(9, (3, 6, 4))  # not square: the reference center-crops to 4×4
    y = torch.arange(9) % 3
    ids = torch.tensor([5, 17, 3, 42, 8, 11, 2, 30, 9])
    save_dataset(ds, x8, y, ids=ids, splits={"train": range(6), "test": [8, 6, 7]}, threads=2)
    for split in ["train", "test"]:
        out = tmp_path / f"p-{split}"
        index = pack(
            ds, out, shard_images=4, progress=False, split=None if split == "train" else split
        )
        assert index["source"]["split"] == split and index["labels"] == "labels.npy"
        src = ShardSource(out)
        src.check()
        ref = load_dataset(ds, split, threads=2)
        assert src.chw == (3, 4, 4)
        _same(src.read(0, src.N), ref.x)
        assert torch.equal(src.ids, ref.ids)
        _same(src.labels, ref.y)
    with pytest.raises(ValueError, match="carries its labels"):
        pack(ds, tmp_path / "q", progress=False, labels=tmp_path / "y.pt")
    with pytest.raises(ValueError, match="split"):
        pack(ds, tmp_path / "q", progress=False, split="nope")


def test_repack_and_out_folder_rules(tmp_path):
    x8 = _u8()
    pack(x8, tmp_path / "a", shard_images=4, progress=False)
    assert len(ShardSource(tmp_path / "a").shards) == 6
    pack(tmp_path / "a", tmp_path / "b", shard_images=50, progress=False)  # reshard
    _same(ShardSource(tmp_path / "b").read(0, N), x8.float() / 127.5 - 1)
    pack(
        x8[:5], tmp_path / "a", shard_images=2, progress=False
    )  # over a previous pack: stale shards go
    assert sorted(os.listdir(tmp_path / "a")) == [
        "ids.npy",
        "index.json",
        "shard-00000.npy",
        "shard-00001.npy",
        "shard-00002.npy",
    ]
    with pytest.raises(ValueError, match="onto itself"):
        pack(tmp_path / "a", tmp_path / "a", progress=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not a packed folder"):
        pack(x8, tmp_path / "c", progress=False)
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------
# damaged folders and interrupted packs
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def packed(tmp_path):
    pack(_u8(), tmp_path / "p", shard_images=5, progress=False)
    return tmp_path / "p"


def test_missing_shard(packed):
    os.unlink(packed / "shard-00002.npy")
    src = ShardSource(packed)  # the index alone opens; check() looks at the files
    with pytest.raises(
        FileNotFoundError, match=r"shard-00002\.npy: missing shard 3 of 5 \(images 10\.\.14\)"
    ):
        src.check()


def test_truncated_shard(packed):
    f = packed / "shard-00004.npy"
    os.truncate(f, os.path.getsize(f) - 7)
    with pytest.raises(ValueError, match=r"shard-00004\.npy: truncated: \d+ bytes, expected \d+"):
        ShardSource(packed).check()


def test_shard_of_another_shape(packed):
    np.save(packed / "shard-00001.npy", np.zeros((5, 3, 4, 5), np.uint8))
    with pytest.raises(
        ValueError, match=r"shard-00001\.npy: holds uint8 \(5, 3, 4, 5\), the index says"
    ):
        ShardSource(packed).check()


def test_verify_and_trusted_fingerprint(packed):
    index = json.loads((packed / "index.json").read_text())
    assert ShardSource(packed, trust_index=True).fingerprint() == index["fingerprint"]
    f = packed / "shard-00003.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size: check() cannot see it, verify() and an untrusted digest do
    f.write_bytes(bytes(data))
    src = ShardSource(packed)
    src.check()
    assert src.fingerprint() != index["fingerprint"]
    with pytest.raises(ValueError, match=r"shard-00003\.npy: sha256 differs from index\.json"):
        src.verify()


def test_corrupted_index(packed):
    text = (packed / "index.json").read_text()
    (packed / "index.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"index\.json: corrupted index \(not valid JSON"):
        open_source(packed)
    idx = json.loads(text)
    idx["N"] = 24
    (packed / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="corrupted index .the shards hold 23 images, N = 24"):
        open_source(packed)
    idx["N"], idx["shards"][1]["file"] = 23, "../elsewhere.npy"
    (packed / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="expected shard-<n>.npy"):
        open_source(packed)


def test_interrupted_pack_is_never_complete(tmp_path, monkeypatch):
    out = tmp_path / "p"
    pack(_u8(), out, shard_images=5, progress=False)
    calls = []
    real = NpySource.read_raw

    def failing(self, a, b):
        calls.append(a)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, a, b)

    np.save(tmp_path / "x.npy", _u8(seed=3).numpy())
    monkeypatch.setattr(NpySource, "read_raw", failing)
    with pytest.raises(KeyboardInterrupt):
        pack(tmp_path / "x.npy", out, shard_images=5, progress=False)
    assert os.listdir(out) == []  # the old index went first, every shard after the failure
    with pytest.raises(ValueError, match="a folder without index.json is not a packed folder"):
        open_source(out)
    with pytest.raises(
        FileNotFoundError, match="no index.json: not a packed folder .or an interrupted"
    ):
        ShardSource(out)
    monkeypatch.undo()
    pack(tmp_path / "x.npy", out, shard_images=5, progress=False)
    _same(open_source(out).read(0, N), _u8(seed=3).float() / 127.5 - 1)


def test_truncated_npy_and_safetensors(tmp_path):
    np.save(tmp_path / "x.npy", _u8().numpy())
    src = NpySource(tmp_path / "x.npy")
    os.truncate(tmp_path / "x.npy", os.path.getsize(tmp_path / "x.npy") - 3)
    with pytest.raises(ValueError, match=r"x\.npy: truncated"):
        src.check()
    save_file({"x": _u8()}, str(tmp_path / "x.safetensors"))
    os.truncate(tmp_path / "x.safetensors", os.path.getsize(tmp_path / "x.safetensors") - 3)
    with pytest.raises(ValueError, match=r"x\.safetensors: not a readable \.safetensors file"):
        SafetensorsSource(tmp_path / "x.safetensors")


# ------------------------------------------------------------------------------------------------
# prefetch
# ------------------------------------------------------------------------------------------------
def _prefetch_threads():
    return [
        t for t in threading.enumerate() if t.name.startswith("mucs_fast-prefetch") and t.is_alive()
    ]


def test_prefetch_equals_direct_reads(tmp_path):
    src, _ = _make("shard-u8", tmp_path)
    ranges = [(0, 4), (4, 13), (13, 13), (13, N), (2, 6)]
    got = list(prefetch(src, ranges, "cpu", depth=2))
    assert [(a, b) for a, b, _ in got] == ranges
    for a, b, x in got:
        _same(x, src.read(a, b))
    assert not _prefetch_threads()


class _Failing(TensorSource):
    def read(self, start, stop):
        if start >= 10:
            raise OSError(f"disk gone at {start}")
        return super().read(start, stop)


def test_prefetch_reraises_reader_error():
    src = _Failing(_f32())
    seen = []
    with pytest.raises(OSError, match="disk gone at 10"):
        for a, _, _ in prefetch(src, [(0, 5), (5, 10), (10, 15), (15, 20)], "cpu"):
            seen.append(a)
    assert seen == [0, 5]
    assert not _prefetch_threads()


def test_prefetch_stops_its_thread_when_the_consumer_breaks():
    src = TensorSource(_f32(200))
    ranges = [(i, i + 1) for i in range(200)]
    it = prefetch(src, ranges, "cpu", depth=3)
    for _a, _b, _x in it:
        assert _prefetch_threads()
        break
    it.close()
    assert not _prefetch_threads()
    it = prefetch(src, ranges, "cpu")
    next(it)
    del it  # garbage collection closes it too
    assert not _prefetch_threads()
    with pytest.raises(ValueError, match="outside"):  # bad ranges fail before a thread starts
        prefetch(src, [(0, 5), (190, 201)], "cpu")
    with pytest.raises(ValueError, match="depth"):
        prefetch(src, ranges, "cpu", depth=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetch_to_cuda_pinned(tmp_path):
    src, want = _make("shard-u8", tmp_path)
    dev = torch.device("cuda")
    for a, b, x in prefetch(src, [(0, 9), (9, N)], dev):
        assert x.device.type == "cuda"
        _same(x.cpu(), want[a:b])


# ------------------------------------------------------------------------------------------------
# open_source
# ------------------------------------------------------------------------------------------------
def test_open_source_dispatch_and_errors(tmp_path, packed):
    x = _f32()
    s = TensorSource(x)
    assert open_source(s) is s
    assert isinstance(open_source(x), TensorSource)
    np.save(tmp_path / "x.npy", x.numpy())
    assert isinstance(open_source(tmp_path / "x.npy"), NpySource)
    assert isinstance(open_source(str(tmp_path / "x.npy")), NpySource)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    assert isinstance(open_source(tmp_path / "x.safetensors"), SafetensorsSource)
    assert isinstance(open_source(packed), ShardSource)
    torch.save(x, tmp_path / "x.pt")
    with pytest.raises(
        ValueError,
        match=r"x\.pt: cannot stream a \.pt file; expected a \.npy file, a "
        r"\.safetensors file",
    ):
        open_source(tmp_path / "x.pt")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(
        ValueError, match=r"imgs: a folder without index\.json is not a packed folder"
    ):
        open_source(tmp_path / "imgs")
    with pytest.raises(FileNotFoundError, match="nope.npy: no such file"):
        open_source(tmp_path / "nope.npy")
    with pytest.raises(ValueError, match="cannot stream a list"):
        open_source([1, 2])
    save_file({"x": x, "y": x.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="expected exactly one tensor"):
        open_source(tmp_path / "two.safetensors")
    np.save(tmp_path / "i.npy", np.zeros((3, 1, 2, 2), np.int32))
    with pytest.raises(ValueError, match="expected uint8, float16, float32 or float64 images"):
        open_source(tmp_path / "i.npy")


# ------------------------------------------------------------------------------------------------
# memory: a memory-mapped source streams without holding the file
# ------------------------------------------------------------------------------------------------
def _rss() -> tuple[int, int]:
    """(VmRSS, RssFile) in bytes, after returning the allocator's free memory to the system: glibc
    keeps freed chunks of the reader thread's arena mapped (bounded, but it hides what is live)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssFile"):
                got[key] = int(value.split()[0]) * 1024
    return got["VmRSS"], got.get("RssFile", 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("kind", ["npy", "shard"])
def test_streaming_memory(kind, tmp_path, monkeypatch):
    n, chunk, depth = 200_000, 4096, 2
    chunk_bytes = chunk * 64 * 4  # float32
    rng = np.random.default_rng(0)
    np.save(tmp_path / "big.npy", rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8))  # 12.8 MB
    expected_sum = float(np.load(tmp_path / "big.npy", mmap_mode="r").astype(np.float64).sum())
    if kind == "shard":  # pack streams too: reads of at most a chunk, memory flat between them
        monkeypatch.setattr(sources.source, "CHUNK_BYTES", chunk_bytes)
        reads, real = [], NpySource.read_raw

        def sampled(self, a, b):
            reads.append((b - a, _rss()[0]))
            return real(self, a, b)

        monkeypatch.setattr(NpySource, "read_raw", sampled)
        base = _rss()[0]
        pack(tmp_path / "big.npy", tmp_path / "p", shard_images=65536, progress=False)
        monkeypatch.undo()
        assert max(r for r, _ in reads) <= chunk and sum(r for r, _ in reads) == n
        pack_growth = max(m for _, m in reads) - base
        print(f"pack: RSS growth {pack_growth / 1e6:.1f} MB over {len(reads)} reads")
        assert pack_growth < 2 * chunk_bytes + (4 << 20), (
            f"pack grew RSS by {pack_growth / 1e6:.1f} MB"
        )
        src = ShardSource(tmp_path / "p")
    else:
        src = NpySource(tmp_path / "big.npy")
    ranges = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]

    def consume(ranges):
        total, peak, peak_file = 0.0, 0, 0
        for _a, _b, x in prefetch(src, ranges, "cpu", depth=depth):
            total += float(x.add_(1).mul_(127.5).round_().sum(dtype=torch.float64))  # v, exactly
            rss, rss_file = _rss()
            peak, peak_file = max(peak, rss), max(peak_file, rss_file)
        return total, peak, peak_file

    consume(ranges[:3])  # warm up: allocator, imports, the kernels' code pages (file-backed)
    base, base_file = _rss()
    total, peak, peak_file = consume(ranges)
    growth, growth_file = peak - base, peak_file - base_file
    print(
        f"{kind}: RSS growth {growth / 1e6:.1f} MB, file-backed {growth_file / 1e6:.1f} MB "
        f"(chunk {chunk_bytes / 1e6:.1f} MB float32, depth {depth})"
    )
    assert total == expected_sum
    # the file's pages are not kept mapped (that would be +12.8 MB file-backed)
    assert growth_file < 1 << 20, f"file-backed RSS grew by {growth_file / 1e6:.1f} MB"
    # live: the chunk in hand, `depth` queued, one being read, temporaries and allocator slack;
    # holding the file would add 12.8 MB, loading it whole 51 MB
    assert growth < (depth + 2) * chunk_bytes + (6 << 20), f"RSS grew by {growth / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------
def test_cli_pack(tmp_path, capsys):
    x8 = _u8()
    np.save(tmp_path / "x.npy", x8.numpy())
    np.save(tmp_path / "y.npy", (np.arange(N) % 3).astype(np.int64))
    rc = main(
        [
            "pack",
            str(tmp_path / "x.npy"),
            str(tmp_path / "p"),
            "--labels",
            str(tmp_path / "y.npy"),
            "--shard-images",
            "10",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert (
        rc == 0
        and "wrote" in err
        and "23 images 3×5×4 uint8 in 3 shard(s)" in err
        and "labels.npy" in err
    )
    src = ShardSource(tmp_path / "p")
    _same(src.read(0, N), x8.float() / 127.5 - 1)
    assert src.labels.tolist() == (np.arange(N) % 3).tolist()
    for argv, msg in [
        (["pack", str(tmp_path / "nope"), str(tmp_path / "q")], "nope: no such file"),
        (
            ["pack", str(tmp_path / "x.npy"), str(tmp_path / "q"), "--shard-images", "0"],
            "--shard-images must be >= 1",
        ),
        (
            ["pack", str(tmp_path / "x.npy"), str(tmp_path / "q"), "--split", "test"],
            "a split applies only to a reference dataset folder",
        ),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("[mucs-fast] error:") and msg in err[0], err


def test_every_source_is_a_source():
    assert all(
        issubclass(c, Source) for c in (TensorSource, NpySource, SafetensorsSource, ShardSource)
    )
