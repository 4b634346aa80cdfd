"""This CPU's fp32 GEMM rate at a given thread count: the FLOP floor the drop-in's phase table
(benches/dropin/lightning_study.py) holds each phase against. Two kinds of shape: a large square
product (the machine's best case) and the shapes a model actually multiplies (rows = tokens ×
images of one forward), since a width-32 network never sees the large-square rate.

python benches/bench_gemm_rate.py --threads 1 [--shapes 1024x1024x1024 4096x32x128 ...]
pytest benches/bench_gemm_rate.py [--benchmark-enable | --benchmark-disable]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import pytest
import torch

SQUARE = (1024, 1024, 1024)


def gemm_seconds(m: int, k: int, n: int, reps: int = 7, min_seconds: float = 0.05) -> float:
    """Median wall seconds of one fp32 [m, k] @ [k, n] (out= preallocated, warmed up): each
    repeat runs enough products to last ≥ min_seconds, so tiny shapes are not timer noise."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)
    t0 = time.perf_counter()
    inner = 0
    while time.perf_counter() - t0 < min_seconds / 5 or inner < 1:
        torch.mm(a, b, out=out)
        inner += 1
    inner = max(1, int(inner * 5 * min_seconds / max(time.perf_counter() - t0, 1e-9) / 5))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def gemm_gflops(m: int, k: int, n: int, **kw) -> float:
    """Achieved GFLOP/s (2·m·k·n per product) of one shape."""
    return 2 * m * k * n / gemm_seconds(m, k, n, **kw) / 1e9


def rate_over(shapes, **kw) -> float:
    """GFLOP/s of a mix of shapes [(m, k, n, count)]: total FLOPs over total time, i.e. what a
    forward made of exactly these products would reach if nothing else took time."""
    flops = sum(2 * m * k * n * c for m, k, n, c in shapes)
    secs = sum(gemm_seconds(m, k, n, **kw) * c for m, k, n, c in shapes)
    return flops / secs / 1e9


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
    }


@pytest.mark.parametrize("shape", [(64, 32, 128), (256, 256, 256)])
def test_gemm_rate(benchmark, shape):
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    torch.testing.assert_close(a @ b, (a.double() @ b.double()).float(), rtol=1e-4, atol=1e-4)
    assert gemm_gflops(m, k, n, reps=1, min_seconds=1e-3) > 0
    benchmark.pedantic(torch.mm, args=(a, b), rounds=5, warmup_rounds=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", nargs="*", default=[], help="MxKxN (the square is always measured)")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [SQUARE] + [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    rows = [{"m": m, "k": k, "n": n, "gflops": gemm_gflops(m, k, n)} for m, k, n in shapes]
    for r in rows:
        print(
            f"{r['m']:>6} x {r['k']:>5} x {r['n']:>5}: {r['gflops']:8.1f} GFLOP/s "
            f"({args.threads} thread{'s' if args.threads > 1 else ''})"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine(), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
