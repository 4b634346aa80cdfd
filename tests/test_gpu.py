"""The engine on a CUDA device (skipped without one): batched == plain, compiled == eager, bf16
scoring close to fp32, CPU and CUDA agree, all three model families run batched."""

import pytest
import torch

import mucs_fast as mf

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _problem(K=4, N=64):
    from mucs_fast.models import DiT

    torch.manual_seed(0)
    net = DiT(
        (1, 8, 8), label_dim=3, patch_size=2, width=32, depth=2, heads=2, cond_width=16
    ).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    train = torch.rand(N, 1, 8, 8, generator=g) * 2 - 1
    targets = torch.rand(K, 1, 8, 8, generator=g) * 2 - 1
    ytr, ytg = torch.randint(0, 3, (N,), generator=g), torch.randint(0, 3, (K,), generator=g)
    return mf.EDMDenoiser(net, train_lr=1e-2), train, targets, ytr, ytg


def _run(den, train, targets, ytr, ytg, device, **cfg):
    base = dict(num_noises=8, batch_size=16, max_steps=3, precision="fp32")
    base.update(cfg)
    return mf.attribute(
        den,
        train,
        targets,
        mf.MUCSConfig(**base),
        ytr,
        ytg,
        device=device,
        progress=False,
        cache_dir=None,
    )


def test_batched_equals_plain_on_cuda():
    p = _problem()
    a = _run(*p, "cuda", targets_per_batch=1)
    b = _run(*p, "cuda", targets_per_batch=4)
    assert b.meta["device"].startswith("cuda")
    assert (a.scores - b.scores).abs().max().item() <= 1e-5


def test_compiled_equals_eager_on_cuda():
    p = _problem()
    a = _run(*p, "cuda", targets_per_batch=4, compile=False)
    b = _run(*p, "cuda", targets_per_batch=4, compile=True)
    assert b.meta["compiled"]
    assert (a.scores - b.scores).abs().max().item() <= 1e-5


def test_cpu_and_cuda_agree_and_bf16_is_close():
    p = _problem()
    cpu = _run(*p, "cpu", targets_per_batch=4)
    gpu = _run(*p, "cuda", targets_per_batch=4)
    assert (cpu.scores - gpu.scores).abs().max().item() <= 1e-4
    bf16 = _run(*p, "cuda", targets_per_batch=4, precision="auto")  # the reference's policy on CUDA
    assert torch.isfinite(bf16.scores).all()
    for k in range(4):  # same ranking up to bf16 noise
        r = torch.corrcoef(
            torch.stack(
                [
                    bf16.scores[k].argsort().argsort().float(),
                    gpu.scores[k].argsort().argsort().float(),
                ]
            )
        )[0, 1]
        assert r > 0.9


@pytest.mark.parametrize("family", ["unet", "dit_diffusers"])
def test_diffusers_models_batched_on_cuda(family):
    from mucs_fast.models.unet import ddpm_scheduler, tiny_dit, tiny_unet

    torch.manual_seed(0)
    model = tiny_unet(1, 8, num_classes=3) if family == "unet" else tiny_dit(1, 8, num_classes=3)
    den = mf.DiffusersDenoiser(model.eval(), ddpm_scheduler(100), train_lr=1e-2)
    _, train, targets, ytr, ytg = _problem()
    a = _run(den, train, targets, ytr, ytg, "cuda", targets_per_batch=1)
    b = _run(den, train, targets, ytr, ytg, "cuda", targets_per_batch=4)
    assert (a.scores - b.scores).abs().max().item() <= 1e-4
