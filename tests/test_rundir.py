"""The run directory (mucs_fast/rundir.py) and atomic writes (mucs_fast/_io.py): one run at a time,
damaged or half-written files never stop a resume, result files follow the umask. No model needed:
the run key is a tiny dict."""

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from mucs_fast._io import atomic_path, atomic_write
from mucs_fast.rundir import LOCK_FILE, TARGETS_DIR, RunDir, check_run_dir

KEY = {"config": {"num_noises": 4}, "model": "m0", "train": "t0", "targets": ["a", "b"], "lr": 1e-4}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="run-directory locking is POSIX (fcntl.flock)"
)


# -- (a) one run at a time -------------------------------------------------------------------------
def test_a_second_rundir_in_the_same_process_is_refused_with_the_holders_pid(tmp_path):
    run = RunDir(tmp_path / "run", KEY, resume=False)
    with pytest.raises(ValueError, match=rf"in use by process {os.getpid()} \(this process\)"):
        RunDir(tmp_path / "run", KEY, resume=True)
    with pytest.raises(ValueError, match="in use"):
        check_run_dir(tmp_path / "run")  # the CLI's early check sees it too
    run.close()
    run.close()  # idempotent
    with RunDir(tmp_path / "run", KEY, resume=True) as again:  # released: usable again
        assert again.load_target(0) is None


def test_a_failed_open_releases_the_lock(tmp_path):
    RunDir(tmp_path / "run", KEY, resume=False).close()
    with pytest.raises(ValueError, match="different run"):
        RunDir(tmp_path / "run", {**KEY, "lr": 2e-4}, resume=True)
    RunDir(tmp_path / "run", KEY, resume=True).close()  # not left locked by the refused open


_HOLDER = textwrap.dedent("""
    import sys
    from mucs_fast.rundir import RunDir
    run = RunDir(sys.argv[1], {key!r}, resume=False)
    print("locked", flush=True)
    if sys.argv[2] == "wait":
        sys.stdin.readline()
        run.close()
    else:
        import os
        os._exit(0)  # dies holding the lock, without close()
""").format(key=KEY)


def _holder(path, mode):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_another_process_holding_the_run_dir_blocks_it_until_it_ends(tmp_path):
    path = tmp_path / "run"
    p = _holder(path, "wait")
    try:
        with pytest.raises(ValueError, match=rf"in use by process {p.pid}\b"):
            RunDir(path, KEY, resume=True)
    finally:
        p.communicate("\n", timeout=60)
    assert p.returncode == 0
    RunDir(path, KEY, resume=True).close()


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
    path = tmp_path / "run"
    p = _holder(path, "die")
    p.communicate(timeout=60)
    assert os.path.isfile(path / LOCK_FILE)  # its lock file (with its PID) is still there
    run = RunDir(path, KEY, resume=True)
    with open(path / LOCK_FILE) as f:
        assert f.read().strip() == str(os.getpid())
    run.close()


# -- (b) damaged target files are recomputed ------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped"])
def test_a_damaged_target_file_is_recomputed_with_a_warning(tmp_path, damage):
    path = tmp_path / "run"
    with RunDir(path, KEY, resume=False) as run:
        run.save_target(0, torch.arange(6.0), {"steps": 3, "stop": "rule"})
        run.save_target(1, torch.ones(6), {"steps": 2, "stop": "rule"})
    f = path / TARGETS_DIR / "000000.safetensors"
    data = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(data[: len(data) - 7])
    elif damage == "garbage":
        f.write_bytes(b"\x00not a safetensors file at all" * 3)
    else:  # a changed score byte: the header still parses, the digest does not match
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 0x40]))
    with RunDir(path, KEY, resume=True) as run:
        with pytest.warns(
            UserWarning, match=r"000000\.safetensors is damaged.*target 0 is recomputed"
        ):
            assert run.load_target(0) is None
        scores, info, exact = run.load_target(1)  # the intact one still loads
        assert exact.all()
        assert torch.equal(scores, torch.ones(6)) and info == {"steps": 2, "stop": "rule"}


def test_a_target_file_of_another_run_is_ignored_silently(tmp_path, recwarn):
    with RunDir(tmp_path / "a", KEY, resume=False) as run:
        run.save_target(0, torch.zeros(3), {"steps": 1})
    other = {**KEY, "model": "m1"}
    with RunDir(tmp_path / "b", other, resume=False) as run:
        os.replace(
            tmp_path / "a" / TARGETS_DIR / "000000.safetensors",
            tmp_path / "b" / TARGETS_DIR / "000000.safetensors",
        )
        assert run.load_target(0) is None
    assert not [w for w in recwarn if "damaged" in str(w.message)]


# -- (c) crash leftovers are cleaned --------------------------------------------------------------
def test_stale_temporary_files_are_removed_when_the_run_dir_opens(tmp_path):
    path = tmp_path / "run"
    with RunDir(path, KEY, resume=False) as run:
        run.save_target(0, torch.zeros(3), {"steps": 1})
    stale = [
        path / ".scores.safetensors.1a2b3c4d.tmp",
        path / TARGETS_DIR / ".000001.safetensors.ab12cd34.tmp",
    ]
    for p in stale:
        p.write_bytes(b"half a file")
    (path / "notes.txt").write_text("the user's own file stays")
    with RunDir(path, KEY, resume=True) as run:
        assert not any(p.exists() for p in stale)
        assert (path / "notes.txt").exists() and run.load_target(0) is not None


def test_a_folder_holding_only_crash_leftovers_is_still_a_fresh_run_dir(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / ".run.json.deadbeef.tmp").write_text("{")  # a crash during the very first write
    RunDir(path, KEY, resume=False).close()
    assert not (path / ".run.json.deadbeef.tmp").exists()


def test_a_foreign_folder_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"png")
    with pytest.raises(ValueError, match="not a mucs_fast run directory"):
        RunDir(tmp_path / "photos", KEY, resume=False)
    assert not (tmp_path / "photos" / LOCK_FILE).exists()  # nothing written into it
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        RunDir(tmp_path / "file", KEY, resume=False)


# -- (d) file modes follow the umask --------------------------------------------------------------
@pytest.fixture
def umask():
    old = os.umask(0o022)
    try:
        yield lambda m: os.umask(m)
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write(tmp_path / "a.json", "{}")
    with atomic_path(tmp_path / "b.bin") as tmp:  # a writer that opens the path itself
        torch.save(torch.zeros(2), tmp)
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~mask
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.bin"]  # no temporary left


def test_run_dir_files_follow_the_umask(tmp_path, umask):
    umask(0o022)
    with RunDir(tmp_path / "run", KEY, resume=False) as run:
        run.save_target(0, torch.zeros(3), {"steps": 1})
    for p in ("run.json", LOCK_FILE, f"{TARGETS_DIR}/000000.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / "run" / p).st_mode) == 0o644, p


@pytest.mark.parametrize(
    "field, value",
    [
        ("mucs_fast", "9.9.9"),
        ("backend", {"edm_loss": {"cpu": "triton"}}),
        ("device", "cuda"),
        ("precision", "bf16"),
    ],
)
def test_a_resume_under_another_version_backend_device_or_precision_is_refused(
    tmp_path, field, value
):
    """The engine's run key holds what a row depends on beyond the config: resuming a CPU fp32 run
    on CUDA bf16 (or another version or op backend) would mix rows computed two ways."""
    import json
    import unittest.mock

    from nets import TinyEDMNet

    import mucs_fast as mf
    from mucs_fast import engine

    torch.manual_seed(0)
    den = mf.EDMDenoiser(TinyEDMNet(C=1, width=8))
    x = torch.rand(8, 1, 4, 4) * 2 - 1
    cfg = mf.MUCSConfig(num_noises=4, lr=1e-2, max_steps=1, loss_null=5.0)
    mf.attribute(den, x, x[:1], cfg, progress=False, cache_dir=None, run_dir=tmp_path / "run")
    key = json.loads((tmp_path / "run" / "run.json").read_text())["key"]
    assert {"mucs_fast", "backend", "device", "precision"} <= set(key) and key["device"] == "cpu"
    assert key["precision"] == "fp32"
    real = RunDir.__init__

    def changed(self, path, key, resume):
        real(self, path, {**key, field: value}, resume)

    with (
        unittest.mock.patch.object(engine.RunDir, "__init__", changed),
        pytest.raises(ValueError, match=rf"holds a different run \(differs in: {field}\)"),
    ):
        mf.attribute(
            den,
            x,
            x[:1],
            cfg,
            progress=False,
            cache_dir=None,
            run_dir=tmp_path / "run",
            resume=True,
        )
