"""Peak resident memory of `mf.attribute` on a streamed .npy training set, for several N.

    python benches/memory/rss.py --n 50000 1000000 [--num-noises 4] [--out JSON]

Each N runs in a fresh process (peak RSS = VmHWM of that process): a .npy of N random uint8 images
1×8×8 is written to a temporary folder, then one target is attributed with a tiny DiT (M noises,
one unlearning step), the training set streamed from the file. What must grow with N: the original
losses L_t [N, M] float32, the scores [K, N], the ids [N] and a retain permutation [N] (int64) —
listed as `expected_n_bytes`; everything else should not.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(n: int, M: int) -> dict:
    import numpy as np
    import torch

    import mucs_fast as mf
    from mucs_fast.models import DiT

    torch.set_num_threads(1)
    folder = tempfile.mkdtemp(prefix="mucs-rss-")
    path = os.path.join(folder, "train.npy")
    rng = np.random.default_rng(0)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 1, 8, 8))
    for a in range(0, n, 100_000):  # written in pieces: the writer must not hold N images either
        b = min(n, a + 100_000)
        mm[a:b] = rng.integers(0, 256, size=(b - a, 1, 8, 8), dtype=np.uint8)
    mm.flush()
    del mm
    torch.manual_seed(0)
    net = DiT((1, 8, 8), label_dim=0, patch_size=4, width=8, depth=1, heads=1, cond_width=8)
    targets = torch.rand(1, 1, 8, 8) * 2 - 1
    cfg = mf.MUCSConfig(
        num_noises=M, batch_size=M, max_steps=1, lr=1e-3, loss_null=1.0, compile=False
    )

    def rss(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return 0

    before = rss("VmRSS:")
    t0 = time.perf_counter()
    res = mf.attribute(mf.EDMDenoiser(net), path, targets, cfg, progress=False, cache_dir=None)
    seconds = time.perf_counter() - t0
    assert res.scores.shape == (1, n) and torch.isfinite(res.scores).all()
    os.unlink(path)
    os.rmdir(folder)
    return {
        "N": n,
        "M": M,
        "rss_before_bytes": before,
        "peak_rss_bytes": rss("VmHWM:"),
        "seconds": seconds,
        "file_bytes": n * 64,
        "expected_n_bytes": n * (4 * M + 4 + 8 + 8),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[50_000, 1_000_000])
    p.add_argument("--num-noises", type=int, default=4)
    p.add_argument("--out", default=None)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(child(a.child, a.num_noises)))
        return
    rows = []
    for n in a.n:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--num-noises", str(a.num_noises)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"N={n:>9,}: peak RSS {r['peak_rss_bytes'] / 2**20:7.1f} MiB (before attribute "
            f"{r['rss_before_bytes'] / 2**20:.1f} MiB; file {r['file_bytes'] / 2**20:.1f} MiB; "
            "[N]-sized "
            f"tensors {r['expected_n_bytes'] / 2**20:.1f} MiB), {r['seconds']:.1f} s",
            flush=True,
        )
    if len(rows) > 1:
        d = rows[-1]["peak_rss_bytes"] - rows[0]["peak_rss_bytes"]
        e = rows[-1]["expected_n_bytes"] - rows[0]["expected_n_bytes"]
        print(
            f"growth {rows[0]['N']:,} → {rows[-1]['N']:,}: {d / 2**20:.1f} MiB, of which the "
            "[N]-sized tensors "
            f"account for {e / 2**20:.1f} MiB; the rest: {(d - e) / 2**20:.1f} MiB"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
