"""The run directory: per-target results persisted as they finish, so a crash loses at most the
targets in flight, and `resume=True` continues where a run stopped.

Layout: `run.json` (the run's key and digest), `targets/NNNNNN.safetensors` (one finished target:
its scores [N], exact mask [N] and unlearning info), `run.lock` (held while a run uses the folder),
and, once the run ends, the result files (scores.safetensors, attribution.json).

One run at a time: opening a RunDir takes an exclusive `flock` on run.lock (the holder's PID is
written into it) and `close()` releases it. The kernel drops the lock when its process dies, so a
crashed run never blocks the next one. Opening also removes the temporary files a crash can leave
(`.<name>.<random>.tmp`, see mucs_fast/_io.py), and a damaged target file found on resume is
recomputed, with a warning.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from typing import Optional

import torch

from ._io import atomic_write, atomic_write_json, is_temp_name, key_digest, tensor_digest
from ._version import __version__

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
TARGETS_DIR = "targets"
LOSS_T_DIR = "loss_t"  # the original model's losses, one file per shard (large runs: hours of work)

try:
    import fcntl
except ImportError:  # not POSIX: no locking (documented limitation)
    fcntl = None


def _foreign_entries(path: str) -> list:
    """Entries of `path` that a run directory's bookkeeping does not explain (lock, crash
    leftovers)."""
    return [e for e in os.listdir(path) if e != LOCK_FILE and not is_temp_name(e)]


def _read_pid(lock_file: str) -> int | None:
    try:
        with open(lock_file) as f:
            return int(f.read().strip() or "x")
    except (OSError, ValueError):
        return None


def _busy_message(path: str, lock_file: str) -> str:
    pid = _read_pid(lock_file)
    who = (
        "another process"
        if pid is None
        else f"process {pid}" + (" (this process)" if pid == os.getpid() else "")
    )
    return (
        f"run_dir {path} is in use by {who} (lock {lock_file}); wait for that run to finish or "
        "use another folder"
    )


def check_run_dir(path) -> None:
    """Raise ValueError unless `path` could be opened as a run directory now: a new or empty folder,
    or one holding run.json that no running process has locked. Creates nothing (the CLI calls it
    before loading the model; RunDir checks again when it opens)."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"run_dir {path} is a file, not a folder; give a new folder or a previous run's"
        )
    if not os.path.isdir(path):
        return
    if _foreign_entries(path) and not os.path.isfile(os.path.join(path, RUN_FILE)):
        raise ValueError(
            f"run_dir {path} is not empty and holds no {RUN_FILE}: it is not a mucs_fast run "
            "directory; choose an empty or new folder"
        )
    lock_file = os.path.join(path, LOCK_FILE)
    if fcntl is None or not os.path.isfile(lock_file):
        return
    try:
        fd = os.open(lock_file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            raise ValueError(_busy_message(path, lock_file)) from None
    finally:
        os.close(fd)  # closing drops the probe lock


class RunDir:
    """Per-target results persisted as they finish, so a crash loses at most the target in flight.

    Holds the folder's lock from construction until `close()` (also a context manager)."""

    def __init__(self, path, key: dict, resume: bool):
        self._lock_fd: int | None = None
        self.path = os.fspath(path)
        self.key = key
        self.digest = key_digest(key)
        check_run_dir(self.path)
        os.makedirs(self.path, exist_ok=True)
        self._acquire()
        try:
            self._open(resume)
        except BaseException:
            self.close()
            raise

    def _acquire(self) -> None:
        if fcntl is None:
            return
        lock_file = os.path.join(self.path, LOCK_FILE)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ValueError(_busy_message(self.path, lock_file)) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _open(self, resume: bool) -> None:
        run_file = os.path.join(self.path, RUN_FILE)
        targets = os.path.join(self.path, TARGETS_DIR)
        if os.path.isfile(run_file):
            try:
                with open(run_file) as f:
                    old = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"run_dir {self.path}: cannot read {RUN_FILE}: {e}") from e
            if old.get("digest") != self.digest:
                diff = sorted(
                    k
                    for k in set(old.get("key", {})) | set(self.key)
                    if old.get("key", {}).get(k) != self.key.get(k)
                )
                raise ValueError(
                    f"run_dir {self.path} holds a different run (differs in: "
                    f"{', '.join(diff) or 'format'}); use another folder or delete it"
                )
            if not resume:  # same run, fresh start: drop finished targets
                shutil.rmtree(targets, ignore_errors=True)
        self._remove_stale_temp_files()
        os.makedirs(targets, exist_ok=True)
        atomic_write_json(
            run_file, {"digest": self.digest, "key": self.key, "mucs_fast": __version__}
        )

    def _remove_stale_temp_files(self) -> None:
        """Temporary files of a crashed write (we hold the lock: no live run is writing them)."""
        for folder in (
            self.path,
            os.path.join(self.path, TARGETS_DIR),
            os.path.join(self.path, LOSS_T_DIR),
        ):
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                p = os.path.join(folder, name)
                if is_temp_name(name) and os.path.isfile(p):
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass

    def _target_file(self, k: int) -> str:
        return os.path.join(self.path, TARGETS_DIR, f"{k:06d}.safetensors")

    def load_target(self, k: int):
        """(scores [N] float32, info dict, exact [N] bool) of a finished target k of this run, or
        None: not there, another run's, or damaged (then with a warning; the engine recomputes
        it)."""
        from safetensors import safe_open

        p = self._target_file(k)
        if not os.path.isfile(p):
            return None
        try:
            with safe_open(p, "pt") as f:
                meta = f.metadata() or {}
                if meta.get("run") != self.digest:
                    return None
                scores = f.get_tensor("scores")
                exact = (
                    f.get_tensor("exact")
                    if "exact" in f.keys()
                    else torch.ones(scores.shape, dtype=torch.bool)
                )
                info = json.loads(meta["info"])
            if (
                scores.dim() != 1
                or scores.dtype != torch.float32
                or not isinstance(info, dict)
                or exact.shape != scores.shape
                or exact.dtype != torch.bool
            ):
                raise ValueError(
                    f"unexpected contents (scores {scores.dtype} {tuple(scores.shape)}, "
                    f"exact {exact.dtype} {tuple(exact.shape)})"
                )
            if "sha256" in meta and meta["sha256"] != tensor_digest(
                {"scores": scores, "exact": exact}
            ):
                raise ValueError("scores do not match their recorded digest")
        except Exception as e:  # noqa: BLE001 (safetensors' own errors too: any failure = damaged)
            warnings.warn(
                f"run_dir {self.path}: {p} is damaged ({type(e).__name__}: {e}); "
                f"target {k} is recomputed",
                stacklevel=2,
            )
            return None
        return scores, info, exact

    def save_target(
        self, k: int, scores: torch.Tensor, info: dict, exact: Optional[torch.Tensor] = None
    ) -> None:
        """Target k's scores [N], info and exact mask [N] (None: every score exact)."""
        from safetensors.torch import save_file

        exact = torch.ones(scores.shape, dtype=torch.bool) if exact is None else exact
        t = {
            "scores": scores.detach().float().cpu().contiguous(),
            "exact": exact.detach().bool().cpu().contiguous(),
        }
        meta = {"run": self.digest, "info": json.dumps(info), "sha256": tensor_digest(t)}
        atomic_write(self._target_file(k), lambda tmp: save_file(t, tmp, metadata=meta))

    def close(self) -> None:
        """Release the run directory (the engine calls it when the run ends, however it ends).
        Idempotent. The lock file stays (removing it could let two runs lock different files)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


# -- L_t shards: written by the rank that computed them (one file per shard, never shared)
# ----------


def _shard_file(path, i: int) -> str:
    return os.path.join(os.fspath(path), LOSS_T_DIR, f"shard-{i:06d}.safetensors")


def save_loss_t_shard(path, i: int, key: str, loss_t: torch.Tensor) -> None:
    """Persist the original model's losses [n, M] of shard i (key: what they were computed from)."""
    from safetensors.torch import save_file

    t = {"loss_t": loss_t.detach().float().cpu().contiguous()}
    meta = {"key": key, "sha256": tensor_digest(t["loss_t"])}
    atomic_write(_shard_file(path, i), lambda tmp: save_file(t, tmp, metadata=meta))


def load_loss_t_shard(path, i: int, key: str, shape: tuple):
    """Shard i's losses when a valid file for exactly `key` and `shape` is there, else None (a
    damaged file is recomputed, with a warning)."""
    from safetensors import safe_open

    p = _shard_file(path, i)
    if not os.path.isfile(p):
        return None
    try:
        with safe_open(p, "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            t = f.get_tensor("loss_t")
        if tuple(t.shape) != tuple(shape) or meta.get("sha256") != tensor_digest(t):
            raise ValueError(f"unexpected contents ({tuple(t.shape)}, expected {tuple(shape)})")
    except Exception as e:  # noqa: BLE001 (any failure = damaged)
        warnings.warn(
            f"run_dir {path}: {p} is damaged ({type(e).__name__}: {e}); shard {i} is recomputed",
            stacklevel=2,
        )
        return None
    return t
