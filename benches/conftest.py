"""Shared bench plumbing: the device, timing with warm-up, and what each result records."""

import subprocess

import pytest
import torch

# Peak memory bandwidth (bytes/s) of the machines the benches are reported on (matched as a prefix
# of the device name: "NVIDIA H200", "NVIDIA H200 NVL").
PEAK_BYTES_PER_S = {"NVIDIA H200": 4.8e12}


def peak_bytes_per_s(name: str):
    return next((v for k, v in PEAK_BYTES_PER_S.items() if name.startswith(k)), None)


ACCELERATOR_PROVIDERS = ("triton", "cuda")


def accelerator_kernel(op: str, provider: str, device: str):
    """The Triton or CUDA C++ kernel of op for the triton/cuda providers; skips where absent."""
    from mucs_fast.ops import _backend

    if device == "cpu":
        pytest.skip("accelerator provider")
    fn, why = _backend.accelerator_kernel(op, provider)
    if fn is None:
        pytest.skip(why)
    return fn


def bench_device() -> str:
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return acc.type if acc is not None else "cpu"


def device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    return torch.get_device_module(device).get_device_name()


def _git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@pytest.fixture(scope="session")
def device():
    return bench_device()


@pytest.fixture(scope="session")
def machine(device):
    from mucs_fast import ops

    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "git": _git_sha(),
        "backends": ops.backends(),
    }


@pytest.fixture
def measure(benchmark, device, machine):
    """measure(fn, bytes_moved): benchmark.pedantic with warm-up and a device sync per call;
    records the machine, GB/s and % of peak bandwidth in extra_info."""
    sync = torch.get_device_module(device).synchronize if device != "cpu" else (lambda: None)

    def _measure(fn, bytes_moved, rounds=20, iterations=5):
        def timed():
            fn()
            sync()

        benchmark.extra_info.update(machine)
        benchmark.extra_info["bytes_moved"] = bytes_moved
        benchmark.pedantic(timed, rounds=rounds, iterations=iterations, warmup_rounds=2)
        if benchmark.stats is not None:  # None under --benchmark-disable
            gb_s = bytes_moved / benchmark.stats.stats.median / 1e9
            benchmark.extra_info["GB/s"] = round(gb_s, 2)
            peak = peak_bytes_per_s(machine["device"])
            if peak:
                benchmark.extra_info["pct_of_peak_bandwidth"] = round(100 * gb_s * 1e9 / peak, 1)

    return _measure
