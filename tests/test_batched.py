"""K targets at once (torch.func) equal K sequential runs, for the three model families."""

import pytest
import torch
from nets import replicated, standalone

import mucs_fast as mf
from mucs_fast.data import TensorSource
from mucs_fast.denoisers import DiffusersDenoiser, EDMDenoiser
from mucs_fast.engine import make_bank
from mucs_fast.functional import group_norm, sdpa_math, vmap_safe
from mucs_fast.models.unet import ddpm_scheduler, tiny_dit, tiny_unet
from mucs_fast.params import trainable_names
from mucs_fast.score import LossPass, original_losses, score_stacked
from mucs_fast.unlearn import RetainStream, unlearn_batched


def _family(name):
    torch.manual_seed(0)
    if name == "dit_edm":
        from mucs_fast.models import DiT

        net = DiT((1, 8, 8), label_dim=3, patch_size=2, width=32, depth=2, heads=2, cond_width=16)
        for p in (
            net.parameters()
        ):  # a "trained" model: zero-initialized outputs would give zero gradients
            torch.nn.init.normal_(p, std=0.2)
        return EDMDenoiser(net), 3

    if name == "unet":
        return DiffusersDenoiser(tiny_unet(1, 8, num_classes=3).eval(), ddpm_scheduler(100)), 3
    return DiffusersDenoiser(tiny_dit(1, 8, num_classes=3).eval(), ddpm_scheduler(100)), 3


# large enough that every family's scores are far from 0 (scores ≈ 0 pass any comparison)
LR = {"dit_edm": 3e-2}


def _sequential_and_batched(family, dtype=torch.float32, threads=None):
    """Unlearn K=3 targets one at a time (K = 1: the unbatched call) and all at once (vmapped), with
    the same per-target streams; score both ways."""
    den, n_cls = _family(family)
    den.net.to(dtype)
    g = torch.Generator().manual_seed(1)
    N, K = 12, 3
    x = (torch.rand(N, 1, 8, 8, generator=g) * 2 - 1).to(dtype)
    y = den.prepare_labels(torch.randint(0, n_cls, (N,), generator=g), N, "y")
    x_hats = (torch.rand(K, 1, 8, 8, generator=g) * 2 - 1).to(dtype)
    y_hats = den.prepare_labels(torch.arange(K) % n_cls, K, "y")
    if y is not None and torch.is_floating_point(y):
        y, y_hats = y.to(dtype), y_hats.to(dtype)
    lr = LR.get(family, 1e-3)
    cfg = mf.MUCSConfig(num_noises=4, batch_size=4, max_steps=3, lr=lr)
    names = trainable_names(den.net, den.default_frozen())

    def streams(k):
        return (
            RetainStream(N, cfg.B, torch.Generator().manual_seed(10 + k)),
            torch.Generator().manual_seed(20 + k),
        )

    def run(ks):
        ss = [streams(k) for k in ks]
        weights, infos = unlearn_batched(
            den,
            den.net,
            names,
            TensorSource(x),
            y,
            x_hats[ks],
            None if y_hats is None else y_hats[ks],
            cfg=cfg,
            loss_null=1.0,
            lr=lr,
            retains=[r for r, _ in ss],
            generators=[gen for _, gen in ss],
        )
        assert [i.steps for i in infos] == [3] * len(ks)
        return weights

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        seq = [run([k]) for k in range(K)]
    finally:
        torch.set_num_threads(old_threads)
    weights = run(list(range(K)))
    w_seq = {n: torch.cat([seq[k][n] for k in range(K)]) for n in names}

    bank = make_bank(den, (1, 8, 8), cfg, 0.7)
    bank.eps = bank.eps.to(dtype)
    ids = torch.arange(N)
    kw = dict(eps=1e-3, use_loss_ratio=True, use_same_noise_infer=True)
    s_bat = {}
    for mode in ("vmap", "loop"):
        lp = LossPass(den, den.net, names, bank, images_per_forward=5, mode=mode)
        xs = TensorSource(x)
        loss_t = original_losses(lp, xs, y, ids)
        if mode == "loop":
            s_seq = torch.cat(
                [score_stacked(lp, seq[k], xs, y, ids, loss_t, **kw) for k in range(K)]
            )
        s_bat[mode] = score_stacked(lp, weights, xs, y, ids, loss_t, **kw)
    w0 = {n: dict(den.net.named_parameters())[n].detach() for n in names}
    return w0, w_seq, weights, s_seq, s_bat


@pytest.mark.parametrize(
    "family, dtype",
    [("dit_edm", torch.float32), ("dit_diffusers", torch.float32), ("unet", torch.float64)],
)
def test_batched_equals_sequential(family, dtype):
    w0, w_seq, w_bat, s_seq, s_bat = _sequential_and_batched(family, dtype)
    for n in w0:
        # atol = 1e-2·lr (1% of one AdamW step): AdamW normalizes each gradient element, so an
        # element
        # whose gradient is nearly cancelled turns fp32 rounding (vmapped vs plain matmuls) into a
        # visible fraction of lr; elements with real gradients agree to rtol 1e-5.
        torch.testing.assert_close(
            w_bat[n], w_seq[n], rtol=1e-5, atol=1e-2 * LR.get(family, 1e-3), msg=n
        )
    assert any(
        not torch.equal(w_seq[n][k], w0[n]) for n in w0 for k in range(3)
    )  # unlearning moved weights
    scale = s_seq.abs().max().item()
    assert scale > 2e-4  # scores of ≈ 0 would pass any comparison
    for mode in s_bat:
        assert (s_seq - s_bat[mode]).abs().max().item() <= 1e-4 * scale, mode


def test_unet_fp32_batched_within_the_plain_loops_own_noise():
    """fp32 UNet: AdamW's first steps amplify rounding in near-zero gradient elements, so the plain
    loop differs from itself by ~4e-4 in a few weights between 1 and 2 CPU threads; elementwise
    rtol 1e-5 is below that floor (fp64 meets it above). Batched vs sequential must stay within
    twice the plain loop's own thread-count noise (and within 1e-3 of an lr-sized step)."""
    _, w_1t, _, s_1t, _ = _sequential_and_batched("unet", threads=1)
    w0, w_2t, w_bat, s_2t, s_bat = _sequential_and_batched("unet", threads=2)
    noise_w = max((w_1t[n] - w_2t[n]).abs().max().item() for n in w0)
    noise_s = (s_1t - s_2t).abs().max().item()
    diff_w = max((w_bat[n] - w_2t[n]).abs().max().item() for n in w0)
    diff_s = max((s - s_2t).abs().max().item() for s in s_bat.values())
    assert diff_w <= max(2 * noise_w, 1e-6), (diff_w, noise_w)
    assert diff_s <= max(2 * noise_s, 1e-6), (diff_s, noise_s)
    # on aggregate the updates agree far better than elementwise
    for n in w0:
        d_seq, d_bat = w_2t[n] - w0[n], w_bat[n] - w0[n]
        assert (d_bat - d_seq).norm() <= 1e-2 * d_seq.norm() + 1e-7, n


def test_engine_blocks_equal_one_at_a_time():
    from nets import TinyEDMNet

    torch.manual_seed(0)
    net = TinyEDMNet(C=1, label_dim=3)
    g = torch.Generator().manual_seed(0)
    train = torch.rand(30, 1, 6, 6, generator=g) * 2 - 1
    targets = torch.rand(5, 1, 6, 6, generator=g) * 2 - 1
    ytr, ytg = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (5,), generator=g)
    for extra in ({}, {"use_same_noise_infer": False}):
        base = dict(num_noises=6, lr=1e-3, safety_steps=8, **extra)
        a = mf.attribute(
            EDMDenoiser(net), train, targets, mf.MUCSConfig(**base), ytr, ytg, progress=False
        )
        b = mf.attribute(
            EDMDenoiser(net),
            train,
            targets,
            mf.MUCSConfig(**base, targets_per_batch=3),
            ytr,
            ytg,
            progress=False,
        )
        assert (a.scores - b.scores).abs().max().item() <= 1e-6, extra
        assert [i["steps"] for i in a.meta["targets"]] == [i["steps"] for i in b.meta["targets"]]
        assert [i.get("block") for i in b.meta["targets"]] == [3, 3, 3, 2, 2]
    # same seed, same machine → bitwise-same batched scores
    c = mf.attribute(
        EDMDenoiser(net),
        train,
        targets,
        mf.MUCSConfig(**base, targets_per_batch=3),
        ytr,
        ytg,
        progress=False,
    )
    assert torch.equal(b.scores, c.scores)


def test_vmap_safe_reroutes_match_the_native_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 3, 3, generator=g)
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    torch.testing.assert_close(
        group_norm(x, 4, w, b, 1e-5), torch.nn.functional.group_norm(x, 4, w, b, 1e-5)
    )
    q, k, v = (torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
    torch.testing.assert_close(
        sdpa_math(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v)
    )
    torch.testing.assert_close(
        sdpa_math(q, k, v, is_causal=True),
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    )
    # the failure this works around: a diffusers UNet (GroupNorm after batched convs) under vmap
    net = tiny_unet(1, 8).eval()
    names = [n for n, _ in net.named_parameters() if n.endswith("weight") and "norm" not in n]
    stack = replicated(net, names, 2)
    for w in stack.weights.values():
        w.add_(0.01 * torch.randn(w.shape, generator=g))
    xin, t = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 50, 99])

    def fwd(w):
        return torch.func.functional_call(net, {**stack.shared, **w}, (xin, t)).sample

    with pytest.raises(RuntimeError, match="is_contiguous"):
        torch.func.vmap(fwd)(stack.weights)
    with vmap_safe():
        out = torch.func.vmap(fwd)(stack.weights)
    torch.testing.assert_close(
        out,
        torch.stack([standalone(stack, k)(xin, t).sample for k in range(2)]),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("raw", [False, True], ids=["D", "raw-F"])
def test_compiled_scoring_equals_eager(raw):
    """compile=True: one torch.compile'd chunk function (weights as inputs, last chunk padded).
    raw-F: the stacked copies call the net's `network` method (a compiled pass once scored every
    copy as the original: all scores 0), so the scores must also be nonzero."""
    from nets import TinyEDMNet, TinyRawEDMNet

    torch.manual_seed(0)
    net = (TinyRawEDMNet if raw else TinyEDMNet)(C=1, label_dim=3)
    assert EDMDenoiser(net).raw == raw
    g = torch.Generator().manual_seed(0)
    train = (
        torch.rand(22, 1, 4, 4, generator=g) * 2 - 1
    )  # 22 images, 8 per chunk: a padded last chunk
    targets = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    ytr, ytg = torch.randint(0, 3, (22,), generator=g), torch.randint(0, 3, (3,), generator=g)
    base = dict(num_noises=5, lr=1e-3, max_steps=2, targets_per_batch=3, score_batch=40)
    a = mf.attribute(
        EDMDenoiser(net),
        train,
        targets,
        mf.MUCSConfig(**base, compile=False),
        ytr,
        ytg,
        progress=False,
        cache_dir=None,
    )
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    b = mf.attribute(
        EDMDenoiser(net),
        train,
        targets,
        mf.MUCSConfig(**base, compile=True),
        ytr,
        ytg,
        progress=False,
        cache_dir=None,
    )
    assert b.meta["compiled"] and not a.meta["compiled"]
    # L_t, every copy and the padded last chunk run one graph: no graph break (a wrapper module
    # made inside the traced code broke it at every functional_call) and no retrace (the padded
    # chunk once was an inference tensor among normal ones)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert (a.scores - b.scores).abs().max().item() <= 1e-6
    assert a.scores.abs().max().item() > 1e-3
    # the vmapped pass (the CUDA default) compiled vs eager on the same unlearned weights
    den = EDMDenoiser(net)
    stack = replicated(den.net, trainable_names(den.net, den.default_frozen()), 3)
    with torch.no_grad():
        for w in stack.weights.values():
            w.add_(0.05 * torch.randn(w.shape, generator=g))
    bank = make_bank(den, (1, 4, 4), mf.MUCSConfig(num_noises=5), 0.7)
    y = den.prepare_labels(ytr, 22, "y")
    names, ids = list(stack.weights), torch.arange(22)
    kw = dict(eps=1e-3, use_loss_ratio=True, use_same_noise_infer=True)
    s = {}
    for compile in (False, True):
        lp = LossPass(den, den.net, names, bank, images_per_forward=8, mode="vmap", compile=compile)
        xs = TensorSource(train)
        s[compile] = score_stacked(
            lp, stack.weights, xs, y, ids, original_losses(lp, xs, y, ids), **kw
        )
    s_eager, s_comp = s[False], s[True]
    assert (s_eager - s_comp).abs().max().item() <= 1e-6 and s_eager.abs().max().item() > 1e-3


def test_diffusers_dit_default_trainable_set_is_feed_forward_and_class_embedder_weights():
    den, _ = _family("dit_diffusers")
    names = trainable_names(den.net, den.default_frozen())
    assert names and all(n.endswith(".weight") for n in names)
    assert all(".ff." in n or ".class_embedder." in n for n in names), names
    assert not any(n.startswith(("pos_embed.", "proj_out_")) for n in names)
    assert any(".ff." in n for n in names) and any(".class_embedder." in n for n in names)
    unet, _ = _family("unet")  # the UNet default keeps every non-bias, non-norm weight
    assert any("conv" in n for n in trainable_names(unet.net, unet.default_frozen()))


def test_independent_noise_does_not_depend_on_the_chunking():
    """use_same_noise_infer=False: each image's noise is keyed by (stream, image id, noise index),
    so the scores are the same for any score_batch (they once moved by more than their size)."""
    den, _ = _family("dit_diffusers")
    g = torch.Generator().manual_seed(3)
    train = torch.rand(14, 1, 8, 8, generator=g) * 2 - 1
    targets = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    ytr, ytg = torch.randint(0, 3, (14,), generator=g), torch.tensor([0, 1])
    base = dict(
        num_noises=5, lr=1e-3, max_steps=2, batch_size=4, use_same_noise_infer=False, compile=False
    )
    runs = [
        mf.attribute(
            den,
            train,
            targets,
            mf.MUCSConfig(**base, score_batch=sb),
            ytr,
            ytg,
            progress=False,
            cache_dir=None,
        )
        for sb in (5, 15, 60)
    ]
    assert runs[0].scores.abs().max() > 1e-4
    for r in runs[1:]:
        torch.testing.assert_close(
            r.scores, runs[0].scores, rtol=1e-5, atol=1e-3 * runs[0].scores.abs().max().item()
        )
