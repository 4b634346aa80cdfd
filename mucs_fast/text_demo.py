"""The embedded text-to-image demo's model and data: sklearn's digits, colored and captioned
("a red handwritten seven"), and a tiny latent text-to-image pipeline trained on them on the CPU
— an AutoencoderKL, a CLIP text model whose tokenizer files are written here (a BPE vocabulary
of the captions' words over the 256 byte symbols), a UNet2DConditionModel — saved with
`save_pretrained` as a pipeline folder that diffusers' StableDiffusionPipeline loads. Nothing is
downloaded. `mucs-fast demo --text` (cli.py) attributes images this pipeline generates; tests
build their pipelines here too.

The text encoder is randomly initialized and frozen (fine-tuning scripts freeze it too): distinct
captions still map to distinct hidden states, which the UNet learns to read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from . import _io
from .data import TensorSource, distinct_captions, load_digits
from .denoisers import LatentTextDenoiser, is_lora
from .pipeline import Pipeline, encode_pixels, encode_prompts
from .train import train

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLORS = {"red": (1.0, 0.25, 0.2), "green": (0.25, 0.9, 0.3), "blue": (0.3, 0.45, 1.0)}
MAX_TOKENS = 8  # <start> a red handwritten seven <end>, padded (the emoji's captions: 24)

# the pipeline: 8×8 RGB images → 4×4×4 latents; every width the smallest that trains in minutes
VAE = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
}
UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
# Stable Diffusion's training schedule
SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


# -- data -------------------------------------------------------------------------------------
def colored_digits(n: int | None = None, colors=tuple(COLORS)):
    """(images float32 [n, 3, 8, 8] in [-1, 1], captions [n], digit labels [n]): digit i drawn
    in colors[i % len(colors)] on black."""
    x, y = load_digits(8)
    if n is not None:
        x, y = x[:n], y[:n]
    ink = (x + 1) / 2  # [n, 1, 8, 8] in [0, 1]
    rgb = torch.tensor([COLORS[c] for c in colors])[torch.arange(len(x)) % len(colors)]
    images = (ink * rgb[:, :, None, None]) * 2 - 1
    captions = [
        f"a {colors[i % len(colors)]} handwritten {DIGIT_WORDS[int(d)]}" for i, d in enumerate(y)
    ]
    return images.contiguous(), captions, y


def write_captioned_folder(folder, images: torch.Tensor, captions) -> Path:
    """images [n, 3, H, W] in [-1, 1] as PNG files with a metadata.jsonl (file_name, text): the
    imagefolder layout diffusers' scripts train on. Written to a temporary folder, then moved."""
    from PIL import Image

    folder = Path(folder)
    if (folder / "metadata.jsonl").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    lines = []
    for i, (a, c) in enumerate(zip(u8, captions)):
        name = f"{i:05d}.png"
        Image.fromarray(np.ascontiguousarray(a), "RGB").save(tmp / name)
        lines.append(json.dumps({"file_name": name, "text": c}))
    (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    os.replace(tmp, folder)
    return folder


# -- the tokenizer ----------------------------------------------------------------------------
def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE (GPT-2, CLIP) writes bytes as, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _bpe(word: str, ranks: dict) -> list[str]:
    """CLIP's BPE of one lowercase word: symbols with "</w>" on the last, merged greedily by
    rank."""
    toks = list(word[:-1]) + [word[-1] + "</w>"]
    while len(toks) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(toks, toks[1:]))]
        r, i = min(pairs)
        if r == 1 << 30:
            break
        toks[i : i + 2] = [toks[i] + toks[i + 1]]
    return toks


def write_tokenizer(folder, words) -> list[str]:
    """vocab.json and merges.txt of a CLIP BPE tokenizer that keeps `words` one token each
    (any other text still tokenizes, into byte symbols). Each word's merges are added after the
    earlier words' ones, joining what those leave of it left to right, so that greedy BPE rebuilds
    it whole; returns the words that a later word's merges split again."""
    sym = _byte_symbols()
    vocab = sym + [s + "</w>" for s in sym]
    ranks: dict = {}
    for w in words:
        toks = _bpe(w, ranks)
        while len(toks) > 1:
            ranks.setdefault((toks[0], toks[1]), len(ranks))
            toks = [toks[0] + toks[1], *toks[2:]]
            if toks[0] not in vocab:
                vocab.append(toks[0])
    # a later word's merges can split an earlier word again (rare: 1 of the emoji captions'
    # 1,900 words); such a word still tokenizes, in pieces (the digits' words stay whole: tested)
    split = [w for w in words if _bpe(w, ranks) != [w + "</w>"]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    merges = sorted(ranks, key=ranks.get)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return split


# -- the pipeline -----------------------------------------------------------------------------
def caption_words(captions) -> list[str]:
    """The distinct lowercase words of captions (what the demo tokenizer keeps whole)."""
    return sorted({w for c in captions for w in re.findall(r"[a-z]+", c.lower())})


def build_pipeline(seed: int, tokenizer_dir, words, max_tokens: int = MAX_TOKENS) -> Pipeline:
    """Freshly initialized components (seeded); the UNet takes 4×4 latents of 8×8 images."""
    import diffusers
    import transformers

    write_tokenizer(tokenizer_dir, words)
    tok = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=max_tokens)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=8,
            **VAE,
        )
        text = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=len(tok.get_vocab()),
                max_position_embeddings=max_tokens,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                **TEXT,
            )
        )
        unet = diffusers.UNet2DConditionModel(
            sample_size=4,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            **UNET,
        )
    text.eval().requires_grad_(False)
    return Pipeline("", unet, vae, text, tok, diffusers.DDPMScheduler(**SCHEDULER))


def train_vae(vae, images: torch.Tensor, steps: int, seed: int, batch: int = 128, lr=2e-3):
    """Reconstruction + a small KL term (β = 1e-6), AdamW; then scaling_factor = 1/std of the
    latents' modes, as Stable Diffusion sets it. Deterministic for a seed."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    N = images.shape[0]
    for _ in range(steps):
        xb = images[torch.randint(0, N, (min(batch, N),), generator=gen)]
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = (rec - xb).pow(2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1 / z.std()))


def train_unet(pipe: Pipeline, latents, captions, steps: int, seed: int, **kw):
    """The UNet (or only its LoRA, when one is attached) trained on latents [n, ...] and their
    captions with the scripts' loss — the LatentTextDenoiser's, the same one attribution uses —
    through mucs_fast.train (EMA weights returned into pipe.unet)."""
    prompts, caption_ids = distinct_captions(captions)
    table = TensorSource(encode_prompts(pipe, prompts).unsqueeze(1))
    den = LatentTextDenoiser(pipe.unet, pipe.scheduler, table)
    lora = any(is_lora(n) for n, _ in pipe.unet.named_parameters())
    for n, p in pipe.unet.named_parameters():
        p.requires_grad_(is_lora(n) or not lora)
    trained, info = train(den, latents, caption_ids, steps=steps, seed=seed, **kw)
    pipe.unet = trained.net.eval().requires_grad_(False)
    return info


def save_pipeline(pipe: Pipeline, folder) -> Path:
    """A StableDiffusionPipeline folder (safetensors), written to a temporary folder, then
    moved into place."""
    import diffusers

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    sd = diffusers.StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# the LoRA's layers: attention projections, as train_text_to_image_lora.py adapts them, plus the
# feed-forward and the resnets' convolutions (the demo UNet has only 3 attention blocks)
LORA_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def add_lora(pipe: Pipeline, rank: int = 4, seed: int = 0) -> None:
    """A fresh LoRA (peft, adapter "default") on the UNet's LORA_MODULES."""
    from peft import LoraConfig

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        pipe.unet.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=rank,
                init_lora_weights="gaussian",
                target_modules=LORA_MODULES,
            )
        )


def save_lora(pipe: Pipeline, folder) -> Path:
    """The UNet's LoRA as diffusers writes it (pytorch_lora_weights.safetensors, "unet." keys):
    what train_text_to_image_lora.py saves."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    os.makedirs(folder, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    diffusers.StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=layers, safe_serialization=True
    )
    return Path(folder) / "pytorch_lora_weights.safetensors"


def make_demo_pipeline(
    folder,
    images,
    captions,
    vae_steps: int,
    unet_steps: int,
    seed: int,
    progress: bool = True,
    batch_size: int = 128,
    lr: float = 2e-3,
    max_tokens: int = MAX_TOKENS,
) -> dict:
    """Build, train and save the demo pipeline into `folder`; returns what was done (seconds,
    losses' last values)."""
    import time

    t0 = time.perf_counter()
    tok_dir = Path(folder).with_name(Path(folder).name + ".tokenizer")
    pipe = build_pipeline(seed, tok_dir, caption_words(captions), max_tokens)
    train_vae(pipe.vae, images, vae_steps, seed)
    t_vae = time.perf_counter() - t0
    latents = encode_pixels(pipe, images)
    info = train_unet(
        pipe,
        latents,
        captions,
        unet_steps,
        seed,
        batch_size=batch_size,
        lr=lr,
        ema_decay=0.999,
        progress=progress,
    )
    save_pipeline(pipe, folder)
    shutil.rmtree(Path(folder).with_name(Path(folder).name + ".tokenizer"), ignore_errors=True)
    return {
        "vae_seconds": t_vae,
        "unet_seconds": info["time_s"],
        "unet_loss_last100": float(np.mean(info["loss"][-100:])) if info["loss"] else None,
        "params": {
            "unet": sum(p.numel() for p in pipe.unet.parameters()),
            "vae": sum(p.numel() for p in pipe.vae.parameters()),
            "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters()),
        },
    }


def cache_key(**spec) -> str:
    """The demo cache's key of a pipeline spec (its data digest, steps, seed, architecture)."""
    return _io.key_digest(
        {"vae": VAE, "unet": UNET, "text": TEXT, "scheduler": SCHEDULER, "format": 1, **spec}
    )[:16]
