"""Latent text-to-image pipelines (diffusers layout), captions, LoRA: the encodings and the loss
against hand-written diffusers code, planted copies found, the engine's invariants (K-batching,
streaming, resume) on a tiny trained pipeline, and the input errors."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import mucs_fast as mf  # noqa: E402
from mucs_fast import pipeline as pl  # noqa: E402
from mucs_fast import text_demo as td  # noqa: E402
from mucs_fast.cli import main  # noqa: E402
from mucs_fast.data import TensorSource, read_captioned_folder  # noqa: E402
from mucs_fast.denoisers import LatentTextDenoiser  # noqa: E402
from mucs_fast.rundir import RunDir  # noqa: E402

N_TRAIN = 240
PROMPT = "a green handwritten seven"
CFG = dict(num_noises=8, safety_steps=25, seed=45)  # lr: the train lr 2e-3 / 10


def _png_folder(folder, images, captions):
    return td.write_captioned_folder(folder, images, captions)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny pipeline trained on 240 colored digits, a LoRA trained on top of it, a target it
    generated for PROMPT, and a training folder holding 3 planted copies of that target."""
    root = tmp_path_factory.mktemp("text")
    x, caps, _ = td.colored_digits(N_TRAIN)
    train_dir = _png_folder(root / "train", x, caps)
    td.make_demo_pipeline(root / "pipe", x, caps, 150, 200, seed=0, progress=False)
    pipe = pl.load_pipeline(root / "pipe")
    target = pl.generate(pipe, [PROMPT], [1000], steps=10, progress=False)
    image = pl.decode_latents(pipe, target)
    planted = _png_folder(
        root / "planted", torch.cat([x, image.repeat(3, 1, 1, 1)]), caps + [PROMPT] * 3
    )
    # a LoRA fine-tune of the pipeline, saved as train_text_to_image_lora.py saves it
    td.add_lora(pipe, rank=8, seed=0)
    td.train_unet(
        pipe,
        pl.encode_pixels(pipe, x),
        caps,
        steps=30,
        seed=1,
        batch_size=64,
        lr=1e-3,
        progress=False,
    )
    lora = td.save_lora(pipe, root / "lora")
    return SimpleNamespace(
        root=root,
        x=x,
        caps=caps,
        train=train_dir,
        pipe=root / "pipe",
        planted=planted,
        target=target,
        lora=lora,
        cache=root / "cache",
    )


def _prepared(tiny, folder=None, lora=None, **kw):
    pipe = pl.load_pipeline(tiny.pipe, lora=lora)
    enc = pl.encode_training_set(pipe, folder or tiny.train, tiny.cache, progress=False)
    return pipe, pl.prepare(pipe, enc, tiny.target, [PROMPT], train_lr=2e-3, **kw)


def _attribute(prep, train=None, **cfg):
    return mf.attribute(
        prep.den,
        prep.train if train is None else train,
        prep.targets,
        mf.MUCSConfig(**{**CFG, **cfg}),
        target_labels=prep.target_labels,
        progress=False,
        cache_dir=None,
    )


# -- encodings and the loss against diffusers, by hand ------------------------------------------
def test_latents_and_captions_equal_a_hand_encode(tiny):
    from PIL import Image

    pipe, prep = _prepared(tiny)
    enc = prep.encoded
    files = [tiny.train / f"{i:05d}.png" for i in range(N_TRAIN)]
    px = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        hand = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
    torch.testing.assert_close(enc.latents.read(0, N_TRAIN), hand, rtol=1e-5, atol=1e-6)
    # each distinct caption once; image i's label selects its own caption's hidden states
    assert len(enc.prompts) == len(set(tiny.caps)) < N_TRAIN
    assert [enc.prompts[i] for i in enc.latents.labels.tolist()] == tiny.caps
    ids = pipe.tokenizer(
        enc.prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
    torch.testing.assert_close(enc.conditions.read(0, len(enc.prompts))[:, 0], states)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_the_loss_is_a_diffusers_training_step(tiny, prediction, snr_gamma):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    pipe = pl.load_pipeline(tiny.pipe)
    sched = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 8, 32, generator=g)
    den = LatentTextDenoiser(pipe.unet, sched, TensorSource(rows.unsqueeze(1)), snr_gamma)
    x, eps = torch.randn(6, 4, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    t, y = torch.tensor([0, 3, 250, 500, 900, 999]), torch.tensor([4, 0, 1, 1, 3, 2])
    with torch.no_grad():
        pred = pipe.unet(sched.add_noise(x, eps, t), t, encoder_hidden_states=rows[y]).sample
        target = eps if prediction == "epsilon" else sched.get_velocity(x, eps, t)
        hand = torch.nn.functional.mse_loss(pred, target, reduction="none").mean((1, 2, 3))
        if snr_gamma is not None:  # train_text_to_image.py's Min-SNR weights
            snr = compute_snr(sched, t)
            w = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
            hand = hand * (w / snr if prediction == "epsilon" else w / (snr + 1))
        mine = den.loss(x, eps, t, y)
        # the scoring pass's grid of (noise, image) pairs is the same loss
        grid = den.grid_loss(x[:2], eps[:3], t[:3], y[:2])
        rep = den.loss(
            x[:2].repeat(3, 1, 1, 1),
            eps[:3].repeat_interleave(2, 0),
            t[:3].repeat_interleave(2),
            y[:2].repeat(3),
        )
    torch.testing.assert_close(mine, hand, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(grid.reshape(-1), rep, rtol=2e-5, atol=1e-7)


# -- does it attribute --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("with_lora", [False, True], ids=["cross-attention-kv", "lora"])
def test_planted_copies_of_the_target_rank_in_the_top_3(tiny, with_lora):
    pipe = pl.load_pipeline(tiny.pipe, lora=tiny.lora if with_lora else None)
    enc = pl.encode_training_set(pipe, tiny.planted, tiny.cache, progress=False)
    # the target as a user gives it: the generated image's file, encoded like the training set
    target = enc.latents.read(N_TRAIN, N_TRAIN + 1)
    prep = pl.prepare(pipe, enc, target, [PROMPT], train_lr=2e-3)
    res = _attribute(prep)
    top3 = set(res.topk(3)[0].tolist())
    assert top3 == {N_TRAIN, N_TRAIN + 1, N_TRAIN + 2}, res.topk(6)
    names = res.meta["resolved"]["trainable"]
    if with_lora:
        assert names and all(".lora_" in n for n in names)
    else:
        unet = [n for n, _ in pipe.unet.named_parameters()]
        assert names == [n for n in unet if not n.endswith(".bias") and "norm" not in n]


@pytest.mark.slow
def test_adaptive_scoring_keeps_the_planted_copies_exact_and_on_top(tiny):
    pipe = pl.load_pipeline(tiny.pipe)
    enc = pl.encode_training_set(pipe, tiny.planted, tiny.cache, progress=False)
    prep = pl.prepare(pipe, enc, enc.latents.read(N_TRAIN, N_TRAIN + 1), [PROMPT], train_lr=2e-3)
    res = _attribute(prep, adaptive_top_k=10, num_noises=16)
    copies = torch.tensor([N_TRAIN, N_TRAIN + 1, N_TRAIN + 2])
    assert set(res.topk(3)[0].tolist()) == set(copies.tolist())
    assert res.exact[0, copies].all() and not res.exact.all()


@pytest.mark.slow
def test_lora_unlearning_trains_only_the_lora_weights(tiny, monkeypatch):
    from mucs_fast import engine

    pipe, prep = _prepared(tiny, lora=tiny.lora)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    seen = {}
    real = engine.unlearn_batched

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.update(out[0])
        return out

    monkeypatch.setattr(engine, "unlearn_batched", spy)
    _attribute(prep)
    lora_names = [n for n, _ in pipe.unet.named_parameters() if ".lora_" in n]
    assert sorted(seen) == sorted(lora_names)  # the unlearned copy's trainable set
    assert any(not torch.equal(seen[n][0], before[n]) for n in seen)  # and it moved
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model untouched


# -- the engine's invariants on the text model ---------------------------------------------------
@pytest.mark.slow
def test_four_targets_at_once_equal_one_at_a_time_and_streamed_equals_resident(tiny):
    pipe = pl.load_pipeline(tiny.pipe)
    enc = pl.encode_training_set(pipe, tiny.train, tiny.cache, progress=False)
    prompts = [
        "a red handwritten three",
        PROMPT,
        "a blue handwritten one",
        "a red handwritten zero",
    ]
    z = pl.generate(pipe, prompts, [1, 2, 3, 4], steps=10, progress=False)
    prep = pl.prepare(pipe, enc, z, prompts, train_lr=2e-3)
    one = _attribute(prep, targets_per_batch=1)
    four = _attribute(prep, targets_per_batch=4)
    scale = one.scores.abs().max().item()
    assert (one.scores - four.scores).abs().max().item() <= 1e-5 * scale
    assert [i["steps"] for i in one.meta["targets"]] == [i["steps"] for i in four.meta["targets"]]
    # the latents and the caption table resident in memory instead of streamed from the cache
    table = TensorSource(enc.conditions.read(0, enc.conditions.N))
    resident = pl.prepare(
        pipe, pl.EncodedSet(enc.latents, table, enc.folder, enc.prompts), z, prompts, train_lr=2e-3
    )
    lat = TensorSource(enc.latents.read(0, enc.latents.N), labels=enc.latents.labels)
    res = _attribute(resident, train=lat, targets_per_batch=4)
    assert torch.equal(res.scores, four.scores)


@pytest.mark.slow
def test_resume_equals_the_uninterrupted_run(tiny, tmp_path, monkeypatch):
    pipe = pl.load_pipeline(tiny.pipe)
    enc = pl.encode_training_set(pipe, tiny.train, tiny.cache, progress=False)
    prompts = [PROMPT, "a red handwritten three"]
    z = pl.generate(pipe, prompts, [5, 6], steps=10, progress=False)
    prep = pl.prepare(pipe, enc, z, prompts, train_lr=2e-3)
    cfg = mf.MUCSConfig(**CFG, targets_per_batch=1)
    kw = dict(target_labels=prep.target_labels, progress=False, cache_dir=None)
    whole = mf.attribute(prep.den, prep.train, prep.targets, cfg, **kw)
    save = RunDir.save_target

    def save_then_crash(self, k, *a, **k2):
        save(self, k, *a, **k2)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "save_target", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        mf.attribute(prep.den, prep.train, prep.targets, cfg, run_dir=tmp_path / "r", **kw)
    monkeypatch.setattr(RunDir, "save_target", save)
    res = mf.attribute(
        prep.den, prep.train, prep.targets, cfg, run_dir=tmp_path / "r", resume=True, **kw
    )
    assert torch.equal(res.scores, whole.scores)
    # another prompt for the same target latents is another run, not a resume of this one
    other = pl.prepare(pipe, enc, z, ["a blue handwritten one", prompts[1]], train_lr=2e-3)
    with pytest.raises(ValueError, match="different"):
        mf.attribute(
            other.den,
            other.train,
            other.targets,
            cfg,
            run_dir=tmp_path / "r",
            resume=True,
            **{**kw, "target_labels": other.target_labels},
        )


# -- the command line ---------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_attributes_a_pipeline_with_captions_in_the_outputs(tiny, tmp_path):
    targets = _png_folder(
        tmp_path / "targets", pl.decode_latents(pl.load_pipeline(tiny.pipe), tiny.target), [PROMPT]
    )
    out = tmp_path / "out"
    argv = [
        "attribute",
        "--pipeline",
        str(tiny.pipe),
        "--lora",
        str(tiny.lora),
        "--train-folder",
        str(tiny.train),
        "--targets",
        str(targets),
        "--out",
        str(out),
        "--num-noises",
        "6",
        "--max-steps",
        "3",
        "--lr",
        "1e-3",
        "--top-k",
        "5",
        "--cache-dir",
        str(tiny.cache),
        "--quiet",
    ]
    assert main(argv) == 0
    meta = json.loads((out / "attribution.json").read_text())
    t = meta["text"]["targets"][0]
    assert t["prompt"] == PROMPT and len(t["top"]) == 5
    first = t["top"][0]
    assert first["caption"] == tiny.caps[first["id"]]
    assert first["file_name"] == f"{first['id']:05d}.png"
    assert (out / "report.png").is_file() and meta["text"]["lora"] == str(tiny.lora)
    # latents + a prompts file; the trainable set by pattern
    torch.save(tiny.target, tmp_path / "z.pt")
    (tmp_path / "p.txt").write_text(PROMPT + "\n")
    argv2 = [
        "attribute",
        "--pipeline",
        str(tiny.pipe),
        "--train-folder",
        str(tiny.train),
        "--targets",
        str(tmp_path / "z.pt"),
        "--prompts",
        str(tmp_path / "p.txt"),
        "--out",
        str(tmp_path / "out2"),
        "--num-noises",
        "6",
        "--max-steps",
        "3",
        "--lr",
        "1e-3",
        "--cache-dir",
        str(tiny.cache),
        "--flips",
        "--trainable",
        "*attn2.to_q.weight",
        "--quiet",
    ]
    assert main(argv2) == 0
    meta2 = json.loads((tmp_path / "out2" / "attribution.json").read_text())
    names = meta2["resolved"]["trainable"]
    assert names and all(n.endswith("attn2.to_q.weight") for n in names)
    assert meta2["shape"] == {"K": 1, "N": N_TRAIN} and "flips" in meta2  # 2N rows folded


def test_a_pickled_pipeline_needs_trust_pickle(tiny, tmp_path):
    from safetensors.torch import load_file

    p = tmp_path / "pickled"
    shutil.copytree(tiny.pipe, p)
    st = p / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), p / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(ValueError, match=r"unet weights are pickles .* --trust-pickle"):
        pl.load_pipeline(p)
    assert (
        main(
            [
                "attribute",
                "--pipeline",
                str(p),
                "--train-folder",
                str(tiny.train),
                "--targets",
                str(tiny.train),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    pipe = pl.load_pipeline(p, trust_pickle=True)
    ref = pl.load_pipeline(tiny.pipe)
    assert all(
        torch.equal(a, b)
        for a, b in zip(pipe.unet.state_dict().values(), ref.unet.state_dict().values())
    )


# -- input errors, one line, before any heavy compute ------------------------------------------
def _folder(tmp_path, rows, images=None):
    from PIL import Image

    d = tmp_path / "f"
    d.mkdir(exist_ok=True)
    for name, size in (images or {}).items():
        Image.new("RGB", size, (10, 20, 30)).save(d / name)
    (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_captioned_folder_errors_name_the_file(tmp_path):
    ok = {"a.png": (8, 8), "b.png": (8, 8)}
    d = _folder(
        tmp_path, [{"file_name": "a.png", "text": "x"}, {"file_name": "c.png", "text": "y"}], ok
    )
    with pytest.raises(FileNotFoundError, match=r"c\.png: no such image"):
        read_captioned_folder(d)
    d = _folder(tmp_path, [{"file_name": "a.png", "caption": "x"}], ok)
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: no 'text' \(--caption-column\)"):
        read_captioned_folder(d)
    assert read_captioned_folder(d, caption_column="caption").captions == ("x",)
    (d / "b.png").write_bytes(b"\x89PNG not really")
    d = _folder(tmp_path, [{"file_name": "b.png", "text": "x"}])
    with pytest.raises(ValueError, match=r"b\.png: cannot read it as an image"):
        read_captioned_folder(d)
    d = _folder(
        tmp_path,
        [{"file_name": "a.png", "text": "x"}, {"file_name": "m.png", "text": "y"}],
        {"a.png": (8, 8), "m.png": (12, 8)},
    )
    with pytest.raises(ValueError, match=r"m\.png: 12×8, but a\.png is 8×8; .*--resolution"):
        read_captioned_folder(d)
    cf = read_captioned_folder(d, resolution=8)
    assert pl.PixelsOf(cf, 8).read_raw(0, 2).shape == (2, 3, 8, 8)
    d = _folder(
        tmp_path, [{"file_name": "a.png", "text": "x"}, {"file_name": "a.png", "text": "y"}]
    )
    with pytest.raises(ValueError, match="listed twice"):
        read_captioned_folder(d)
    (d / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"metadata.jsonl:1: not a JSON object"):
        read_captioned_folder(d)


def test_pipeline_folder_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        pl.load_pipeline(tmp_path)
    p = tmp_path / "p"
    shutil.copytree(tiny.pipe, p)
    shutil.rmtree(p / "vae")
    with pytest.raises(FileNotFoundError, match=r"no vae/"):
        pl.load_pipeline(p)
    pickled_lora = tmp_path / "pytorch_lora_weights.bin"
    pickled_lora.write_bytes(b"")
    with pytest.raises(ValueError, match="expected a .safetensors file"):
        pl.load_pipeline(tiny.pipe, lora=pickled_lora)
    with pytest.raises(FileNotFoundError, match="--lora .*: no such file"):
        pl.load_pipeline(tiny.pipe, lora=tmp_path / "none.safetensors")


def test_the_tokenizer_keeps_the_demo_words_whole(tmp_path):
    from transformers import CLIPTokenizer

    words = ["a", "handwritten", *td.DIGIT_WORDS, *td.COLORS]
    assert td.write_tokenizer(tmp_path, words) == []
    tok = CLIPTokenizer.from_pretrained(tmp_path, model_max_length=8)
    for c in td.COLORS:
        for d in td.DIGIT_WORDS:
            assert tok.convert_ids_to_tokens(tok(f"a {c} handwritten {d}").input_ids) == [
                "<|startoftext|>",
                "a</w>",
                f"{c}</w>",
                "handwritten</w>",
                f"{d}</w>",
                "<|endoftext|>",
            ]
    assert len(tok("an unknown word").input_ids) > 3  # other text falls back to byte symbols


def test_the_emoji_dataset_from_the_npm_package(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from mucs_fast.data.emoji import emoji_folder

    with pytest.raises(FileNotFoundError, match="npm pack emoji-datasource-google"):
        emoji_folder(tmp_path / "out", root=tmp_path / "absent")
    monkeypatch.setenv("MUCS_FAST_EMOJI", str(tmp_path / "absent"))
    args = [
        "demo",
        "--text",
        "--data",
        "emoji",
        "--out",
        str(tmp_path / "d"),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    assert main(args) == 2
    assert "npm pack emoji-datasource-google" in capsys.readouterr().err
    pkg = tmp_path / "pkg" / "package"
    img = pkg / "img" / "google" / "64"
    img.mkdir(parents=True)
    for name in ("1f600.png", "1f44b.png", "1f44b-1f3fd.png"):
        Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(img / name)
    entries = [
        {
            "name": "GRINNING FACE",
            "category": "Smileys & Emotion",
            "image": "1f600.png",
            "has_img_google": True,
        },
        {
            "name": "WAVING HAND SIGN",
            "category": "People & Body",
            "image": "1f44b.png",
            "has_img_google": True,
            "skin_variations": {
                "1F3FD": {"image": "1f44b-1f3fd.png", "has_img_google": True},
                "1F3FF": {"image": "1f44b-1f3ff.png", "has_img_google": True},
            },
        },  # no file
    ]
    (pkg / "emoji.json").write_text(json.dumps(entries))
    cf = read_captioned_folder(emoji_folder(tmp_path / "out", root=tmp_path / "pkg"))
    assert cf.captions == (
        "grinning face, a smileys & emotion emoji",
        "waving hand sign, a people & body emoji",
        "waving hand sign, medium skin tone, a people & body emoji",
    )
    with Image.open(cf.files[0]) as im:  # composited on white: half-transparent red → pink
        assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 127, 127)


@pytest.mark.slow
def test_flips_encode_mirror_images_and_keep_the_larger_score(tiny, tmp_path):
    from PIL import Image

    pipe = pl.load_pipeline(tiny.pipe)
    enc = pl.encode_training_set(pipe, tiny.train, tiny.cache, progress=False, flips=True)
    assert enc.latents.N == 2 * N_TRAIN
    assert torch.equal(enc.latents.labels[N_TRAIN:], enc.latents.labels[:N_TRAIN])
    px = np.stack([np.asarray(Image.open(tiny.train / f"{i:05d}.png")) for i in range(4)])
    mirrored = torch.from_numpy(px[:, :, ::-1].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        hand = pipe.vae.encode(mirrored).latent_dist.mode() * pipe.vae.config.scaling_factor
    lat = enc.latents.read(N_TRAIN, N_TRAIN + 4)
    torch.testing.assert_close(lat, hand, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(lat, enc.latents.read(0, 4))  # digits are not symmetric
    prep = pl.prepare(pipe, enc, tiny.target, [PROMPT], train_lr=2e-3)
    res = _attribute(prep, max_steps=3)
    folded = pl.fold_flips(res, N_TRAIN)
    assert folded.N == N_TRAIN and torch.equal(folded.train_ids, torch.arange(N_TRAIN))
    assert torch.equal(
        folded.scores, torch.maximum(res.scores[:, :N_TRAIN], res.scores[:, N_TRAIN:])
    )
    with pytest.raises(ValueError, match="2N rows"):
        pl.fold_flips(folded, N_TRAIN)


def test_encoding_in_batches_that_leave_a_short_last_one_gives_the_same_cache(tiny, tmp_path):
    pipe = pl.load_pipeline(tiny.pipe)
    ref = pl.encode_training_set(pipe, tiny.train, tiny.cache, progress=False)
    # 240 images in batches of 7 (the last of 2), 30 captions in batches of 28 (the last of 2)
    odd = pl.encode_training_set(pipe, tiny.train, tmp_path / "c", batch=7, progress=False)
    torch.testing.assert_close(
        odd.latents.read(0, N_TRAIN), ref.latents.read(0, N_TRAIN), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(odd.conditions.read(0, 30), ref.conditions.read(0, 30))
    assert torch.equal(odd.latents.labels, ref.latents.labels)


def test_concat_source_reads_across_its_parts():
    from mucs_fast.data import ConcatSource

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 1, 2, 3, generator=g), torch.randn(3, 1, 2, 3, generator=g)
    src = ConcatSource(TensorSource(a), TensorSource(b))
    whole = torch.cat([a, b])
    assert src.N == 8 and torch.equal(src.read(0, 8), whole)
    assert torch.equal(src.read(3, 7), whole[3:7])  # a range across the boundary
    idx = torch.tensor([7, 0, 5, 4, 5])  # any order, repeats, both parts
    assert torch.equal(src.take(idx, "cpu"), whole[idx])
    with pytest.raises(ValueError, match="differ in shape"):
        ConcatSource(TensorSource(a), TensorSource(torch.randn(2, 1, 3, 3)))
