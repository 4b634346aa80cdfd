"""The command line of text-to-image pipelines: `mucs-fast attribute --pipeline DIR [--lora FILE]
--train-folder DIR --targets ...` and `mucs-fast demo --text` (cli.py adds these flags and calls
here). Every flag and every file is checked before a weight is read; the captioned training set
is encoded once into the cache (pipeline.encode_training_set) and streamed from there.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import time
from pathlib import Path

import torch

from . import _io
from . import pipeline as pl
from . import text_demo as td
from .cli_common import (
    attribute_config,
    cache_dir,
    check_device,
    check_out,
    check_top_k,
    print_summary,
    say,
)
from .config import MUCSConfig
from .data import read_captioned_folder, read_prompts, to_model_range
from .data.captions import stack_images
from .data.emoji import emoji_folder
from .engine import attribute
from .parallel import rank_world
from .report import write_report

# diffusers' scripts: train_text_to_image_lora.py defaults to 1e-4; full fine-tunes of Stable
# Diffusion are run at 1e-5 in its README. Unlearning uses train lr / lr_factor (MUCS.md).
TRAIN_LR = {"lora": 1e-4, "full": 1e-5}


def add_text_arguments(a) -> None:
    """The text-to-image flags of `mucs-fast attribute`."""
    g = a.add_argument_group("text-to-image pipelines (diffusers)")
    g.add_argument(
        "--pipeline",
        default=None,
        help="a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, "
        "tokenizer/, scheduler/)",
    )
    g.add_argument("--lora", default=None, help="pytorch_lora_weights.safetensors of the UNet")
    g.add_argument(
        "--train-folder",
        default=None,
        help="the captioned training folder (images + metadata.jsonl), as the scripts read it",
    )
    g.add_argument(
        "--prompts", default=None, help="prompts of --targets (a .json list or one per line)"
    )
    g.add_argument("--image-column", default="image", help="default: image (file_name)")
    g.add_argument("--caption-column", default="text", help="default: text")
    g.add_argument(
        "--resolution", type=int, default=None, help="resize + center-crop images to R×R"
    )
    g.add_argument(
        "--flips",
        action="store_true",
        help="for models trained with random flips: score each image and its mirror image, keep "
        "the larger (the training set is encoded and scored twice)",
    )
    g.add_argument(
        "--snr-gamma", type=float, default=None, help="Min-SNR γ, if the model trained with it"
    )
    g.add_argument(
        "--trainable",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="glob patterns of the parameters unlearning trains (default: the LoRA weights; "
        "without a LoRA every non-bias, non-normalization UNet weight). Attribute-by-Unlearning's "
        "smaller set: '*attn2.to_k.weight' '*attn2.to_v.weight'",
    )
    g.add_argument(
        "--train-lr",
        type=float,
        default=None,
        help="the model's training learning rate (default 1e-4 with --lora, 1e-5 without)",
    )
    g.add_argument(
        "--cache-dir", default=None, help="encoded-latents cache (default $MUCS_FAST_CACHE)"
    )


def _trainable(patterns):
    """MUCSConfig.frozen for --trainable: frozen unless the name matches a pattern."""

    def not_in_trainable_patterns(name, p):
        return not any(fnmatch.fnmatchcase(name, pat) for pat in patterns)

    return not_in_trainable_patterns


def _targets_latents(pipe, kind, x, latent_chw, where):
    z = pl.encode_pixels(pipe, x) if kind == "images" else x
    if tuple(z.shape[1:]) != tuple(latent_chw):
        raise ValueError(
            f"--targets {where}: latents are {tuple(z.shape[1:])}, the training set's are "
            f"{tuple(latent_chw)}"
        )
    return z


def _finish(res, args, pipe, prep, train_pixels=None, title=None) -> None:
    """attribution.json gains each target's prompt and its top images' file names and
    captions; report.png shows prompts and captions."""
    k = min(args.top_k or 100, res.N)
    res.meta["text"] = {
        "pipeline": os.path.abspath(pipe.path) if pipe.path else None,
        "lora": pipe.lora,
        "train_folder": os.fspath(prep.encoded.folder.folder),
        "targets": pl.describe_top(res, prep.encoded, prep.prompts, k),
    }
    res.save(args.out, top_k=k)
    cf = prep.encoded.folder
    pixels = train_pixels if train_pixels is not None else pl.PixelsOf(cf, args.resolution)
    write_report(
        os.path.join(args.out, "report.png"),
        pl.decode_latents(pipe, prep.targets),
        pixels,
        res,
        top=min(8, res.N),
        title=title,
        target_titles=prep.prompts,
        train_captions=cf.captions,
    )


def cmd_attribute_text(args) -> int:
    if not (args.train_folder and args.targets):
        raise ValueError("--pipeline needs --train-folder and --targets")
    cfg = attribute_config(args)  # --out, --device, --loss-null, --top-k before anything is read
    folder = read_captioned_folder(
        args.train_folder, args.image_column, args.caption_column, args.resolution
    )
    check_top_k(args.top_k, len(folder))
    if args.flips and args.adaptive:
        raise ValueError("--flips and --adaptive: not together (adaptive keeps one row's top-k)")
    prompts = read_prompts(args.prompts) if args.prompts else None
    kind, tx, tprompts, _ = pl.read_targets(args.targets, prompts, args.resolution)
    if args.adaptive:
        cfg = dataclasses.replace(cfg, adaptive_top_k=min(args.top_k or 100, len(folder)))
    if args.trainable:
        cfg = dataclasses.replace(cfg, frozen=_trainable(args.trainable))
    pipe = pl.load_pipeline(args.pipeline, lora=args.lora, trust_pickle=args.trust_pickle)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.to(device)
    t0 = time.perf_counter()
    enc = pl.encode_training_set(
        pipe,
        folder,
        cache_dir(args.cache_dir),
        args.resolution,
        progress=not args.quiet,
        flips=args.flips,
    )
    z = _targets_latents(pipe, kind, tx, enc.latents.chw, args.targets)
    train_lr = args.train_lr or TRAIN_LR["lora" if args.lora else "full"]
    prep = pl.prepare(pipe, enc, z, tprompts, snr_gamma=args.snr_gamma, train_lr=train_lr)
    if args.lr is None and not args.quiet:
        say(
            f"lr: {train_lr:g} / {cfg.lr_factor:g} (--train-lr "
            f"{'given' if args.train_lr else 'default'}; --lr sets it directly)"
        )
    res = attribute(
        prep.den,
        prep.train,
        prep.targets,
        cfg,
        target_labels=prep.target_labels,
        device=device,
        progress=not args.quiet,
        run_dir=args.out,
        resume=args.resume,
        top_k=args.top_k or 100,
    )
    if args.flips:  # the run directory keeps the 2N rows; the result folds them to N
        res = pl.fold_flips(res, len(folder))
    if rank_world()[0] == 0:
        _finish(res, args, pipe, prep)
        print_summary(res, args.out, time.perf_counter() - t0)
    return 0


# -- the demo -----------------------------------------------------------------------------------
TEXT_DEMO = {
    "default": {
        "vae_steps": 400,
        "unet_steps": 1500,
        "targets": 4,
        "num_noises": 50,
        "safety_steps": 200,
        "targets_per_batch": 4,
    },
    "quick": {
        "vae_steps": 200,
        "unet_steps": 500,
        "targets": 2,
        "num_noises": 20,
        "safety_steps": 100,
        "targets_per_batch": 2,
    },
}
DEMO_TOKENS = {"digits": td.MAX_TOKENS, "emoji": 24}  # the text encoder's positions
TARGET_PROMPTS = [
    f"a {c} handwritten {w}"
    for c, w in zip(
        ["red", "green", "blue"] * 4, ["three", "seven", "one", "zero", "five", "eight"] * 2
    )
]


def demo_pipeline(args, cache: str, images, captions):
    """The demo's pipeline folder (trained, or found in the cache) and the captioned folder."""
    data_key = _io.key_digest(_io.tensor_digest(images), list(captions))[:16]
    data_dir = td.write_captioned_folder(
        Path(cache) / f"text-demo-data-{data_key}", images, captions
    )
    key = td.cache_key(
        data=data_key,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        seed=args.seed,
        tokens=DEMO_TOKENS[args.data],
    )
    pipe_dir = Path(cache) / f"text-demo-pipeline-{key}"
    seconds = 0.0
    if (pipe_dir / "model_index.json").is_file() and not args.no_cache:
        say(f"pipeline: cached {pipe_dir}")
    else:
        say(
            f"pipeline: training a tiny latent text-to-image pipeline (VAE {args.vae_steps} "
            f"steps, UNet {args.unet_steps} steps; cached afterwards at {pipe_dir})"
        )
        t0 = time.perf_counter()
        td.make_demo_pipeline(
            pipe_dir,
            images,
            captions,
            args.vae_steps,
            args.unet_steps,
            args.seed,
            max_tokens=DEMO_TOKENS[args.data],
        )
        seconds = time.perf_counter() - t0
    return data_dir, pipe_dir, seconds


def cmd_demo_text(args) -> int:
    preset = TEXT_DEMO["quick" if args.quick else "default"]
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    check_out(args.out)
    check_device(args.device)
    if args.data not in DEMO_TOKENS:
        raise ValueError(f"--data {args.data}: with --text, expected digits or emoji")
    if not 1 <= args.targets <= len(TARGET_PROMPTS):
        raise ValueError(f"--targets must lie in [1, {len(TARGET_PROMPTS)}] with --text")
    t_all = time.perf_counter()
    cache = cache_dir(args.cache_dir)
    if args.data == "emoji":  # Noto emoji (npm emoji-datasource-google), 64×64 → 8×8
        folder = read_captioned_folder(emoji_folder(Path(cache) / "emoji-folder"))
        images = to_model_range(stack_images(folder.files, 8))
        captions = list(folder.captions)
        prompts = [captions[i * len(captions) // args.targets] for i in range(args.targets)]
        what = (
            "Noto emoji (emoji-datasource-google) 64×64 resized to 3×8×8, captions from emoji.json"
        )
    else:
        images, captions, _ = td.colored_digits()
        prompts = TARGET_PROMPTS[: args.targets]
        what = "sklearn digits, 3×8×8, colored and captioned"
    say(
        f"data: {len(captions)} images, {what} ({len(set(captions))} distinct captions, "
        f"e.g. {captions[0]!r})"
    )
    data_dir, pipe_dir, train_s = demo_pipeline(args, cache, images, captions)
    pipe = pl.load_pipeline(pipe_dir)  # the user's path: a saved pipeline folder
    seeds = list(range(1000, 1000 + args.targets))
    say(f"targets: {len(prompts)} latents generated (DDIM, 25 steps) for {prompts}")
    t0 = time.perf_counter()
    z = pl.generate(pipe, prompts, seeds, steps=25)
    sample_s = time.perf_counter() - t0
    enc = pl.encode_training_set(pipe, data_dir, cache)
    prep = pl.prepare(pipe, enc, z, prompts, train_lr=2e-3)  # the UNet trained at 2e-3
    cfg = MUCSConfig(
        num_noises=args.num_noises,
        safety_steps=args.safety_steps,
        seed=args.seed,
        targets_per_batch=args.targets_per_batch,
    )
    res = attribute(
        prep.den,
        prep.train,
        prep.targets,
        cfg,
        target_labels=prep.target_labels,
        device=args.device,
        progress=True,
        run_dir=args.out,
        resume=args.resume,
        top_k=100,
        meta={
            "demo": {
                "text": True,
                "quick": bool(args.quick),
                "pipeline": os.fspath(pipe_dir),
                "target_seeds": seeds,
                "train_seconds": train_s,
                "sample_seconds": sample_s,
            }
        },
    )
    args.top_k, args.resolution = 100, None
    _finish(
        res,
        args,
        pipe,
        prep,
        train_pixels=images,
        title=f"mucs-fast demo --text{' --quick' if args.quick else ''}: M={cfg.num_noises}",
    )
    match = [
        sum(e["caption"] == t["prompt"] for e in t["top"][:10]) / 10
        for t in res.meta["text"]["targets"]
    ]
    say(f"top-10 training images whose caption is the target's prompt: {match}")
    _io.atomic_write_json(
        os.path.join(args.out, "demo_text.json"), {"top10_caption_match": match, "prompts": prompts}
    )
    print_summary(res, args.out, time.perf_counter() - t_all)
    return 0
