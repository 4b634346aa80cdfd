"""The counterfactual evaluation (EVALUATION.md's protocol) on the text demo family, one seed:

1. pre: the demo pipeline (mucs-fast demo --text): VAE, text encoder, UNet trained on the
   captioned digits.
2. generate T targets + T controls from prompts with fixed seeds (DDIM, 25 steps, latents).
3. attribute the targets with each method (mucs, pixel: nearest training images in pixel space,
   random); k = round(2 % of N) per target; the union over the targets is removed.
4. post: the UNet retrained from scratch on the rest, same seed and steps (the VAE and the text
   encoder are kept: they are the pipeline's fixed encoders, as fine-tuning scripts keep them).
5. regenerate with the same prompts, seeds and sampler; 6. metrics pre vs post on the decoded
   images (mucs_fast.evaluate.metrics), AUC / ratio against random (mucs_fast.evaluate.stats).

    python benches/eval_text.py --pipeline DIR --out benches/results/text-eval-<date>
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import mucs_fast as mf
from mucs_fast import pipeline as pl
from mucs_fast import text_demo as td
from mucs_fast.evaluate import stats
from mucs_fast.evaluate.metrics import neg_euclidean, neg_mae, pixel_cosine, ssim
from mucs_fast.text_cli import TARGET_PROMPTS

METRICS = {"ssim": ssim, "cosine": pixel_cosine, "neg_mae": neg_mae, "neg_euclidean": neg_euclidean}


def regenerate(pipe, unet, prompts, seeds):
    view = pl.Pipeline(pipe.path, unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    return pl.decode_latents(view, pl.generate(view, prompts, seeds, steps=25, progress=False))


def retrain(pipe, latents, captions, keep, args):
    """The UNet trained from scratch (same init seed, steps) on the kept images."""
    fresh = td.build_pipeline(args.seed, Path(args.out) / "tok", td.caption_words(captions))
    fresh.vae, fresh.text_encoder, fresh.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
    td.train_unet(
        fresh,
        latents[keep],
        [c for c, k in zip(captions, keep.tolist()) if k],
        args.unet_steps,
        args.seed,
        batch_size=128,
        lr=2e-3,
        ema_decay=0.999,
        progress=False,
    )
    return fresh.unet


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pipeline", required=True, help="the demo's pipeline folder")
    p.add_argument("--out", required=True)
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--unet-steps", type=int, default=1500, help="as the demo pipeline's UNet")
    p.add_argument("--seed", type=int, default=45)
    p.add_argument("--num-noises", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    pipe = pl.load_pipeline(args.pipeline)
    x, caps, _ = td.colored_digits()
    folder = td.write_captioned_folder(Path(args.out) / "train", x, caps)
    enc = pl.encode_training_set(pipe, folder, Path(args.out) / "cache", progress=False)
    T = args.targets
    prompts_t = TARGET_PROMPTS[:T]
    prompts_c = TARGET_PROMPTS[T : 2 * T] if len(TARGET_PROMPTS) >= 2 * T else TARGET_PROMPTS[:T]
    seeds_t, seeds_c = list(range(2000, 2000 + T)), list(range(3000, 3000 + T))
    z = pl.generate(pipe, prompts_t, seeds_t, steps=25, progress=False)
    pre_t = pl.decode_latents(pipe, z)
    pre_c = regenerate(pipe, pipe.unet, prompts_c, seeds_c)
    N = enc.latents.N
    k = round(0.02 * N)
    prep = pl.prepare(pipe, enc, z, prompts_t, train_lr=2e-3)
    cfg = mf.MUCSConfig(
        num_noises=args.num_noises, safety_steps=200, seed=args.seed, targets_per_batch=T
    )
    t0 = time.perf_counter()
    res = mf.attribute(
        prep.den,
        prep.train,
        prep.targets,
        cfg,
        target_labels=prep.target_labels,
        progress=False,
        cache_dir=None,
    )
    mucs_s = time.perf_counter() - t0
    d = torch.cdist(pre_t.flatten(1), x.flatten(1))
    g = torch.Generator().manual_seed(args.seed)
    scores = {"mucs": res.scores, "pixel": -d, "random": torch.rand(T, N, generator=g)}
    latents = enc.latents.read(0, N)
    out = {"N": N, "k": k, "targets": T, "mucs_seconds": mucs_s, "methods": {}}
    sims = {}
    for name, s in scores.items():
        top = torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]
        removed = stats.union(top)
        keep = torch.ones(N, dtype=torch.bool)
        keep[removed] = False
        t0 = time.perf_counter()
        unet = retrain(pipe, latents, caps, keep, args)
        post_t = regenerate(pipe, unet, prompts_t, seeds_t)
        post_c = regenerate(pipe, unet, prompts_c, seeds_c)
        sims[name] = {
            "targets": {m: f(pre_t, post_t) for m, f in METRICS.items()},
            "controls": {m: f(pre_c, post_c) for m, f in METRICS.items()},
        }
        caption_match = [
            sum(caps[j] == prompts_t[t] for j in top[t].tolist()) / k for t in range(T)
        ]
        out["methods"][name] = {
            "removed": int(removed.numel()),
            "retrain_seconds": time.perf_counter() - t0,
            "top_k_caption_match": sum(caption_match) / T,
        }
        print(name, out["methods"][name], flush=True)
    for name in ("mucs", "pixel"):
        for group in ("targets", "controls"):
            for m in METRICS:
                a, r = sims[name][group][m], sims["random"][group][m]
                out["methods"][name][f"{group}_auc_{m}"] = stats.auc(a, r)
                out["methods"][name][f"{group}_ratio_{m}"] = stats.ratio(
                    a, r, distance=m.startswith("neg_")
                )[0]
    out["seconds"] = time.perf_counter() - t_start
    (Path(args.out) / "results.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
