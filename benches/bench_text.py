"""Text-to-image attribution on the demo pipeline (mucs-fast demo --text): scoring throughput,
per-target time, K = 8 vs K = 1, LoRA vs the UNet's weights vs cross-attention k/v as the
trainable set (with planted copies), and peak RSS of streamed runs at two N 20× apart.

    python benches/bench_text.py --pipeline DIR --out benches/results/text-<date>   [--part ...]

--pipeline: a demo pipeline folder (the demo caches it as text-demo-pipeline-<key>). Every part
writes <out>/<part>.json. One thread per process (OMP_NUM_THREADS=1), as the CLI is run here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import mucs_fast as mf
from mucs_fast import pipeline as pl
from mucs_fast import text_demo as td
from mucs_fast.denoisers import CROSS_ATTENTION_KV
from mucs_fast.text_cli import TARGET_PROMPTS, _trainable

PROMPTS = TARGET_PROMPTS


def _setup(args, n=None, copies=0, lora=None):
    pipe = pl.load_pipeline(args.pipeline, lora=lora)
    x, caps, _ = td.colored_digits()
    target = None
    if copies:
        z = pl.generate(pipe, [PROMPTS[1]], [1000], steps=25, progress=False)
        img = pl.decode_latents(pipe, z)
        x, caps = torch.cat([x, img.repeat(copies, 1, 1, 1)]), caps + [PROMPTS[1]] * copies
    if n is not None:  # n images: the digits repeated, each copy's color shifted (distinct files)
        reps = -(-n // len(caps))
        x = torch.cat([(x + 0.01 * r).clamp(-1, 1) for r in range(reps)])[:n]
        caps = (caps * reps)[:n]
    folder = td.write_captioned_folder(Path(args.out) / f"data-{len(caps)}-{copies}", x, caps)
    enc = pl.encode_training_set(pipe, folder, Path(args.out) / "cache", progress=False)
    if copies:
        target = enc.latents.read(enc.latents.N - 1, enc.latents.N)
    return pipe, enc, target


def _attribute(prep, cfg):
    """One attribution of the prepared targets, quiet, without the L_t cache (timed cold)."""
    return mf.attribute(
        prep.den,
        prep.train,
        prep.targets,
        cfg,
        target_labels=prep.target_labels,
        progress=False,
        cache_dir=None,
    )


def part_throughput(args):
    """pairs/s of the scoring pass and per-target time, K = 1 vs K = 8 (equal scores)."""
    pipe, enc, _ = _setup(args)
    z = pl.generate(pipe, PROMPTS[:8], list(range(1000, 1008)), steps=25, progress=False)
    prep = pl.prepare(pipe, enc, z, PROMPTS[:8], train_lr=2e-3)
    out = {}
    for K in (1, 8):
        cfg = mf.MUCSConfig(num_noises=50, safety_steps=100, seed=45, targets_per_batch=K)
        t0 = time.perf_counter()
        res = _attribute(prep, cfg)
        wall = time.perf_counter() - t0
        t = res.meta["timings"]
        pairs = sum(res.meta["pairs_evaluated"])
        out[f"K={K}"] = {
            "wall_s": wall,
            "per_target_s": wall / 8,
            "loss_t_s": t["loss_t"],
            "unlearn_s": t["unlearn"],
            "score_s": t["score"],
            "score_pairs_per_s": pairs / t["score"],
            "loss_t_pairs_per_s": res.N * res.meta["M"] / t["loss_t"],
            "steps": [i["steps"] for i in res.meta["targets"]],
            "scores": res.scores,
        }
    a, b = out["K=1"].pop("scores"), out["K=8"].pop("scores")
    out["max_abs_diff_K8_vs_K1"] = (a - b).abs().max().item()
    out["score_scale"] = a.abs().max().item()
    out["N"], out["M"] = enc.latents.N, 50
    return out


def part_trainable(args):
    """Planted copies (2) of a generated target: their ranks and the time per target for each
    trainable set."""
    lora_file = Path(args.out) / "lora" / "pytorch_lora_weights.safetensors"
    if not lora_file.is_file():  # a LoRA fine-tune of the demo pipeline (60 steps)
        pipe = pl.load_pipeline(args.pipeline)
        td.add_lora(pipe, rank=8, seed=0)
        x, caps, _ = td.colored_digits()
        td.train_unet(
            pipe,
            pl.encode_pixels(pipe, x),
            caps,
            steps=60,
            seed=1,
            batch_size=64,
            lr=1e-3,
            progress=False,
        )
        td.save_lora(pipe, lora_file.parent)
    out = {}
    for name, lora, frozen in (
        ("unet (default)", None, None),
        ("cross-attention k/v", None, _trainable(CROSS_ATTENTION_KV)),
        ("lora (default with --lora)", lora_file, None),
    ):
        pipe, enc, target = _setup(args, copies=2, lora=lora)
        prep = pl.prepare(pipe, enc, target, [PROMPTS[1]], train_lr=2e-3)
        cfg = mf.MUCSConfig(num_noises=50, safety_steps=100, seed=45, frozen=frozen)
        t0 = time.perf_counter()
        res = _attribute(prep, cfg)
        order = torch.argsort(res.scores[0], descending=True).tolist()
        N = res.N
        out[name] = {
            "copy_ranks": [order.index(N - 2) + 1, order.index(N - 1) + 1],
            "seconds": time.perf_counter() - t0,
            "trainable_numel": res.meta["resolved"]["trainable_numel"],
            "steps": res.meta["targets"][0]["steps"],
            "stop": res.meta["targets"][0]["stop"],
        }
    return out


def part_rss(args):
    """Peak RSS of a streamed run (one target, M = 8) at N and 20·N, each in a fresh process."""
    out = {}
    for n in (args.rss_n, 20 * args.rss_n):
        cmd = [
            sys.executable,
            __file__,
            "--pipeline",
            args.pipeline,
            "--out",
            args.out,
            "--part",
            "rss_one",
            "--rss-n",
            str(n),
        ]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        out[f"N={n}"] = json.loads((Path(args.out) / f"rss_one-{n}.json").read_text())
    a, b = out[f"N={args.rss_n}"], out[f"N={20 * args.rss_n}"]
    out["growth_MB"] = b["peak_rss_MB_attribute"] - a["peak_rss_MB_attribute"]
    return out


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def part_rss_one(args):
    pipe, enc, _ = _setup(args, n=args.rss_n)  # encoding first: its own peak is not the run's
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    z = pl.generate(pipe, PROMPTS[:1], [1000], steps=10, progress=False)
    prep = pl.prepare(pipe, enc, z, PROMPTS[:1], train_lr=2e-3)
    cfg = mf.MUCSConfig(num_noises=8, safety_steps=10, seed=45)
    samples, done = [], threading.Event()

    def poll():  # the resident set during attribute, every 20 ms (ru_maxrss is the lifetime's)
        while not done.is_set():
            samples.append(_rss_mb())
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    t0 = time.perf_counter()
    th.start()
    _attribute(prep, cfg)
    done.set()
    th.join()
    res = {
        "N": args.rss_n,
        "rss_MB_at_start_of_attribute": samples[0],
        "peak_rss_MB_attribute": max(samples),
        "peak_rss_MB_process_lifetime": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_MB_before_attribute": before,
        "seconds": time.perf_counter() - t0,
    }
    (Path(args.out) / f"rss_one-{args.rss_n}.json").write_text(json.dumps(res))
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pipeline", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--part", nargs="+", default=["throughput", "trainable", "rss"])
    p.add_argument("--rss-n", type=int, default=500)
    args = p.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    for part in args.part:
        res = globals()[f"part_{part}"](args)
        if res is not None:
            res["machine"] = os.uname().nodename
            res["torch"] = torch.__version__
            (Path(args.out) / f"{part}.json").write_text(json.dumps(res, indent=1))
            print(part, json.dumps(res, indent=1), flush=True)


if __name__ == "__main__":
    main()
