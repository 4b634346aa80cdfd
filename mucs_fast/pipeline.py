"""Latent text-to-image pipelines (diffusers' StableDiffusionPipeline folder layout), made ready
to attribute: `load_pipeline` reads a pipeline folder safely (safetensors only, unless the user
trusts pickles) and a LoRA; `encode_training_set` encodes a captioned training folder once —
images → VAE latents (`latent_dist.mode() · scaling_factor`, deterministic), each distinct caption
→ the text encoder's hidden states — into packed folders in a cache keyed by the content and the
encoders' digests, which the engine then streams; `prepare` adds the targets and builds the
`LatentTextDenoiser`.

The loss, noise levels and trainable sets live in denoisers.LatentTextDenoiser; this module only
loads, encodes and caches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import _io
from .data import (
    CaptionedFolder,
    ShardSource,
    Source,
    distinct_captions,
    load_tensor_file,
    pack,
    read_captioned_folder,
    to_model_range,
)
from .data.captions import stack_images
from .denoisers import LatentTextDenoiser, is_lora
from .loading import PICKLE_WARNING, one_line, say

# the folders of a pipeline that attribution reads (model_index.json names their classes)
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED = ("unet", "vae", "text_encoder")
CACHE_FORMAT = 1


@dataclasses.dataclass
class Pipeline:
    """The parts of a text-to-image pipeline that attribution uses (eval mode, CPU)."""

    path: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # DDPMScheduler with the pipeline's training config (as the scripts load it)
    lora: Optional[str] = None

    @property
    def latent_scale(self) -> int:
        """Pixels per latent along a side (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device) -> "Pipeline":
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device)
        return self


def _import(module: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(
            f"text-to-image pipelines need {module}: pip install 'mucs_fast[text]' "
            "(diffusers, transformers, peft)"
        ) from e


def _weights_kind(path: str, name: str, sub: str, trust_pickle: bool) -> bool:
    """True: safetensors; False: pickled weights the user trusts. Raises otherwise."""
    names = os.listdir(sub)
    if any(n.endswith(".safetensors") for n in names):
        return True
    if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names):
        if not trust_pickle:
            raise ValueError(
                f"--pipeline {path}: the {name} weights are pickles (.bin), not safetensors, and "
                "unpickling can run code; re-save the pipeline with save_pretrained("
                "safe_serialization=True), or pass --trust-pickle if you trust them"
            )
        say(PICKLE_WARNING.format(path=sub))
        return False
    raise FileNotFoundError(f"--pipeline {path}: no weights (*.safetensors) in {sub}")


def load_pipeline(path, lora=None, trust_pickle: bool = False) -> Pipeline:
    """A pipeline folder (`model_index.json`, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/), with the LoRA file `lora` (diffusers/peft `pytorch_lora_weights.safetensors`)
    attached to the UNet when given. Every check (layout, weight formats) runs before a weight
    is read."""
    path = os.fspath(path)
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(
            f"--pipeline {path}: no model_index.json (expected a diffusers pipeline folder, "
            "as StableDiffusionPipeline.save_pretrained writes it)"
        )
    try:
        with open(index_file) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--pipeline {path}: cannot read model_index.json ({one_line(e)})") from e
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise FileNotFoundError(
            f"--pipeline {path}: no {', '.join(m + '/' for m in missing)} (a text-to-image "
            f"pipeline has {', '.join(COMPONENTS)})"
        )
    safe = {c: _weights_kind(path, c, os.path.join(path, c), trust_pickle) for c in WEIGHTED}
    if lora is not None:
        _check_lora(lora, trust_pickle)
    diffusers = _import("diffusers")
    transformers = _import("transformers")
    libs = {"diffusers": diffusers, "transformers": transformers}
    parts = {}
    for c in ("unet", "vae", "text_encoder", "tokenizer"):
        lib, cls_name = (index.get(c) or [None, None])[:2]
        cls = getattr(libs.get(lib), cls_name or "", None)
        if cls is None:
            raise ValueError(
                f"--pipeline {path}: model_index.json names {c} as {lib}.{cls_name}, which this "
                "install does not have"
            )
        kw = {} if c == "tokenizer" else {"use_safetensors": safe[c]}
        try:
            parts[c] = cls.from_pretrained(os.path.join(path, c), **kw)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"--pipeline {path}: cannot load {c} ({one_line(e)})") from e
    # the scripts train with DDPMScheduler.from_pretrained(…, subfolder="scheduler")
    scheduler = diffusers.DDPMScheduler.from_pretrained(os.path.join(path, "scheduler"))
    for c in WEIGHTED:
        parts[c].eval().requires_grad_(False)
    pipe = Pipeline(path, scheduler=scheduler, lora=None, **parts)
    if lora is not None:
        attach_lora(pipe, lora)
    return pipe


def _check_lora(lora, trust_pickle: bool) -> None:
    lora = os.fspath(lora)
    if not os.path.isfile(lora):
        raise FileNotFoundError(f"--lora {lora}: no such file")
    if not lora.endswith(".safetensors"):
        raise ValueError(
            f"--lora {lora}: expected a .safetensors file (pytorch_lora_weights.safetensors); "
            "a pickled LoRA can run code when read"
        )


def attach_lora(pipe: Pipeline, lora) -> None:
    """Attach a LoRA file to pipe.unet (peft; adapter "default"), unmerged: the attributed model
    is base + LoRA, and the LoRA weights are what unlearning trains."""
    from safetensors import safe_open

    lora = os.fspath(lora)
    _check_lora(lora, False)
    _import("peft")
    with safe_open(lora, "pt") as f:
        keys = list(f.keys())
    other = sorted({k.split(".")[0] for k in keys if not k.startswith("unet.")})
    if other:
        raise ValueError(
            f"--lora {lora}: holds weights for {', '.join(other)}; only a UNet LoRA is supported "
            "(a text-encoder LoRA would change the captions' encodings)"
        )
    try:
        pipe.unet.load_lora_adapter(lora, prefix="unet", adapter_name="default")
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"--lora {lora}: cannot attach it to the UNet ({one_line(e)})") from e
    if not any(is_lora(n) for n, _ in pipe.unet.named_parameters()):
        raise ValueError(f"--lora {lora}: no LoRA weight matched a UNet layer")
    pipe.unet.requires_grad_(False)
    pipe.lora = lora


# -- encoders ---------------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(pipe: Pipeline, prompts: Sequence[str], device=None) -> torch.Tensor:
    """Hidden states float32 [n, L, D] (CPU) of prompts, tokenized as the scripts do (padding to
    the tokenizer's model_max_length, truncation)."""
    tok = pipe.tokenizer
    ids = tok(
        list(prompts),
        max_length=tok.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids
    device = device or next(pipe.text_encoder.parameters()).device
    return pipe.text_encoder(ids.to(device), return_dict=False)[0].float().cpu()


@torch.no_grad()
def encode_pixels(pipe: Pipeline, x: torch.Tensor, device=None) -> torch.Tensor:
    """VAE latents float32 [n, c, h, w] (CPU) of images x [n, 3, H, W] in [-1, 1]:
    latent_dist.mode() · scaling_factor (the mean, not a sample: deterministic)."""
    device = device or next(pipe.vae.parameters()).device
    dist = pipe.vae.encode(x.to(device, next(pipe.vae.parameters()).dtype)).latent_dist
    z = dist.mode().float()
    shift = getattr(pipe.vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return (z * pipe.vae.config.scaling_factor).cpu()


@torch.no_grad()
def decode_latents(pipe: Pipeline, z: torch.Tensor, device=None) -> torch.Tensor:
    """Images float32 [n, 3, H, W] in [-1, 1] (CPU) of latents z (for reports)."""
    device = device or next(pipe.vae.parameters()).device
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    z = z.to(device) / pipe.vae.config.scaling_factor + shift
    return (
        pipe.vae.decode(z.to(next(pipe.vae.parameters()).dtype)).sample.float().clamp(-1, 1).cpu()
    )


class _LatentsOf(Source):
    """The VAE latents of a captioned folder's images, encoded as they are read (what `pack`
    writes to the cache); labels: each image's caption id. flip: N more rows after the N images,
    their horizontal mirror images (`encode_training_set(flips=True)`)."""

    def __init__(self, pipe, folder: CaptionedFolder, resolution, caption_ids, chw, batch, flip):
        self.pipe, self.folder, self.resolution, self.batch = pipe, folder, resolution, batch
        self.n, self.flip = len(folder), bool(flip)
        labels = caption_ids.repeat(2) if flip else caption_ids
        self._init_meta(self.n * (1 + self.flip), chw, torch.float32, labels, None, "latents")

    def _encode(self, positions) -> torch.Tensor:
        x = stack_images([self.folder.files[p % self.n] for p in positions], self.resolution)
        mirrored = torch.tensor([p >= self.n for p in positions])
        x[mirrored] = x[mirrored].flip(-1)
        return encode_pixels(self.pipe, to_model_range(x))

    def read_raw(self, start, stop):
        start, stop = self.check_range(start, stop)
        out = [
            self._encode(range(a, min(a + self.batch, stop)))
            for a in range(start, stop, self.batch)
        ]
        return torch.cat(out) if out else torch.empty((0, *self.chw))


class PixelsOf(Source):
    """The preprocessed images of a captioned folder (uint8 [N, 3, R, R]), read on demand (the
    report reads only the top images)."""

    def __init__(self, folder: CaptionedFolder, resolution=None):
        self.folder, self.resolution = folder, resolution
        first = stack_images(folder.files[:1], resolution)
        self._init_meta(len(folder), first.shape[1:], torch.uint8, where=os.fspath(folder.folder))

    def read_raw(self, start, stop):
        start, stop = self.check_range(start, stop)
        return stack_images(self.folder.files[start:stop], self.resolution)

    def _raw_gather(self, idx):
        return stack_images([self.folder.files[i] for i in idx.tolist()], self.resolution)


class _ConditionsOf(Source):
    """Hidden states [U, 1, L, D] of distinct prompts, encoded as they are read."""

    def __init__(self, pipe, prompts, chw, batch):
        self.pipe, self.prompts, self.batch = pipe, list(prompts), batch
        self._init_meta(len(self.prompts), chw, torch.float32, where="conditions")

    def read_raw(self, start, stop):
        start, stop = self.check_range(start, stop)
        out = [
            encode_prompts(self.pipe, self.prompts[a : min(a + self.batch, stop)]).unsqueeze(1)
            for a in range(start, stop, self.batch)
        ]
        return torch.cat(out) if out else torch.empty((0, *self.chw))


def _cached_pack(cache_dir: Path, name: str, make: Source, progress: bool) -> ShardSource:
    """The packed folder cache_dir/name, written from `make` when absent: into a temporary
    folder first, renamed into place when complete (a crash leaves no half-written entry)."""
    final = cache_dir / name
    if (final / "index.json").is_file():
        return ShardSource(final, trust_index=True)
    tmp = cache_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pack(make, tmp, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished it first: keep theirs
            if not (final / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ShardSource(final, trust_index=True)


def _module_digest(m: torch.nn.Module) -> str:
    return _io.tensor_digest(m.state_dict())


def _tokenizer_digest(tok) -> str:
    vocab = sorted(tok.get_vocab().items())
    return _io.key_digest(type(tok).__name__, vocab, int(tok.model_max_length))


@dataclasses.dataclass
class EncodedSet:
    """A captioned training set, encoded: latents (labels: caption ids), the caption table."""

    latents: ShardSource
    conditions: ShardSource
    folder: CaptionedFolder
    prompts: list  # the distinct captions, in table order (row i of conditions)


def encode_training_set(
    pipe: Pipeline,
    folder,
    cache_dir,
    resolution: Optional[int] = None,
    image_column: str = "image",
    caption_column: str = "text",
    batch: int = 16,
    progress: bool = True,
    flips: bool = False,
) -> EncodedSet:
    """Encode (or find in the cache) a captioned training folder (data.captions): every file is
    checked first, then each image's latents and each distinct caption's hidden states are
    written once to packed folders under cache_dir/text, keyed by the files' bytes, the captions,
    the preprocessing and the encoders' weights.

    flips: the latents hold 2N rows, the N images and then their horizontal mirror images (for
    models trained with random flips; `fold_flips` keeps each image's larger score)."""
    cf = (
        folder
        if isinstance(folder, CaptionedFolder)
        else read_captioned_folder(folder, image_column, caption_column, resolution)
    )
    prompts, caption_ids = distinct_captions(cf.captions)
    cache = Path(cache_dir) / "text"
    cache.mkdir(parents=True, exist_ok=True)
    files = [(n, _io.file_digest(f)) for n, f in zip(cf.names, cf.files)]
    probe = to_model_range(stack_images(cf.files[:1], resolution))
    latent_chw = tuple(encode_pixels(pipe, probe).shape[1:])
    lat_key = _io.key_digest(
        "latents",
        CACHE_FORMAT,
        files,
        cf.captions,
        resolution,
        _module_digest(pipe.vae),
        float(pipe.vae.config.scaling_factor),
        *(["flips"] if flips else []),
    )
    hidden = encode_prompts(pipe, prompts[:1]).shape[1:]
    cond_key = _io.key_digest(
        "conditions",
        CACHE_FORMAT,
        prompts,
        _tokenizer_digest(pipe.tokenizer),
        _module_digest(pipe.text_encoder),
    )
    if progress:
        say(f"text: {len(cf)} images, {len(prompts)} distinct captions (cache {cache})")
    latents = _cached_pack(
        cache,
        f"latents-{lat_key[:16]}",
        _LatentsOf(pipe, cf, resolution, caption_ids, latent_chw, batch, flips),
        progress,
    )
    conditions = _cached_pack(
        cache,
        f"conditions-{cond_key[:16]}",
        _ConditionsOf(pipe, prompts, (1, *hidden), 4 * batch),
        progress,
    )
    return EncodedSet(latents, conditions, cf, prompts)


# -- targets ----------------------------------------------------------------------------------
def read_targets(path, prompts=None, resolution=None, caption_column: str = "text"):
    """Targets as (kind "latents" | "images", tensor, prompts, names): a captioned folder
    (metadata.jsonl: file_name + prompt), or a tensor file (.pt / .safetensors / .npy) of
    latents [K, c, h, w] or images [K, 3, H, W] with `prompts` (a list, one per target)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        cf = read_captioned_folder(p, "image", caption_column, resolution)
        if prompts is not None:
            raise ValueError(
                f"--targets {p}: a captioned folder carries its prompts; drop --prompts"
            )
        x = to_model_range(stack_images(cf.files, resolution))
        return "images", x, list(cf.captions), list(cf.names)
    x = load_tensor_file(p)
    if x.ndim != 4:
        raise ValueError(f"--targets {p}: expected [K, C, H, W], found shape {tuple(x.shape)}")
    if prompts is None:
        raise ValueError(f"--targets {p}: a tensor file needs --prompts (one per target)")
    if len(prompts) != x.shape[0]:
        raise ValueError(
            f"--targets {p}: {x.shape[0]} targets but {len(prompts)} prompts; give one each"
        )
    kind = "images" if x.shape[1] == 3 else "latents"
    x = to_model_range(x) if x.dtype == torch.uint8 else x.float()
    return kind, x, list(prompts), [f"{Path(p).name}[{k}]" for k in range(x.shape[0])]


@torch.no_grad()
def generate(
    pipe: Pipeline,
    prompts,
    seeds,
    steps: int = 50,
    guidance_scale: float = 1.0,
    size=None,
    progress: bool = True,
) -> torch.Tensor:
    """Latents float32 [K, c, h, w] that the pipeline generates for prompts, one seed each
    (StableDiffusionPipeline, DDIM sampling, output_type="latent"): targets as the model made
    them, without a decode/encode round trip."""
    diffusers = _import("diffusers")
    sd = diffusers.StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=diffusers.DDIMScheduler.from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=not progress, leave=False)
    H = size or pipe.unet.config.sample_size * pipe.latent_scale
    out = []
    for prompt, seed in zip(prompts, seeds):
        device = next(pipe.unet.parameters()).device
        g = torch.Generator(device).manual_seed(int(seed))
        z = sd(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=g,
            output_type="latent",
            height=H,
            width=H,
        ).images
        out.append(z.float().cpu())
    return torch.cat(out)


# -- everything attribute needs ---------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
    """What `attribute` takes for a text-to-image model, and what the outputs name."""

    den: LatentTextDenoiser
    train: ShardSource  # latents, labels = caption ids
    targets: torch.Tensor  # latents [K, c, h, w]
    target_labels: torch.Tensor  # condition ids [K]
    prompts: list  # the targets' prompts
    encoded: EncodedSet


def prepare(
    pipe: Pipeline,
    encoded: EncodedSet,
    target_latents: torch.Tensor,
    target_prompts: Sequence[str],
    snr_gamma: Optional[float] = None,
    train_lr: Optional[float] = None,
) -> Prepared:
    """The denoiser over the cached caption table plus the targets' prompts, and the rest of
    attribute's arguments."""
    if len(target_prompts) != target_latents.shape[0]:
        raise ValueError(
            f"{target_latents.shape[0]} targets but {len(target_prompts)} prompts; give one each"
        )
    den = LatentTextDenoiser(
        pipe.unet, pipe.scheduler, encoded.conditions, snr_gamma=snr_gamma, train_lr=train_lr
    )
    den, ids = den.with_prompts(encode_prompts(pipe, target_prompts))
    return Prepared(
        den, encoded.latents, target_latents.float(), ids, list(target_prompts), encoded
    )


def fold_flips(res, N: int):
    """The Attribution over the N images of a run over 2N rows (the images, then their mirror
    images): each image's larger score of the two, exact where both were."""
    if res.N != 2 * N or not torch.equal(res.train_ids[N:], res.train_ids[:N] + N):
        raise ValueError("fold_flips: expected the 2N rows of encode_training_set(flips=True)")
    scores = torch.maximum(res.scores[:, :N], res.scores[:, N:])
    exact = res.exact[:, :N] & res.exact[:, N:]
    meta = {**res.meta, "flips": "each image's score is the larger of it and its mirror image"}
    return type(res)(scores, res.train_ids[:N], meta, exact=exact)


def describe_top(res, encoded: EncodedSet, prompts, k: int) -> list:
    """Per target: its prompt and its top-k training images (id, file_name, caption, score),
    for attribution.json."""
    order = torch.argsort(res.scores, dim=1, descending=True, stable=True)[:, :k]
    cf = encoded.folder
    return [
        {
            "prompt": prompts[t],
            "top": [
                {
                    "id": int(res.train_ids[j]),
                    "file_name": cf.names[int(res.train_ids[j])],
                    "caption": cf.captions[int(res.train_ids[j])],
                    "score": float(res.scores[t, j]),
                }
                for j in order[t].tolist()
            ],
        }
        for t in range(res.K)
    ]
