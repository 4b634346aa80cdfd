"""MUCS for one target as a plain loop, written to be read beside spec/MUCS.md.

Independent of mucs_fast on purpose (no denoiser, op or engine code): a test that compares the
engine with this file pins the algorithm, not the engine against itself. EDM D-form nets only
(D = net(x_noisy, σ, y=y)). Random draws follow the engine's order so that runs agree step for step:
per step, the retain ids (one torch.randperm(N) per epoch, drop-last) from g_retain; then from
g_noise σ = exp(P_std·randn(B) + P_mean) and ε = randn(B, C, H, W) for the retain batch, then the
same for the forget batch (unless use_same_noise_train).
"""

import copy

import torch


def edm_loss(net, x, eps, sigma, y=None, sigma_data=0.5):
    """Per-sample L = λ(σ)·mean_{C,H,W}(D(x + σε, σ, y) − x)², λ = (σ² + σ_d²)/(σ·σ_d)²."""
    s = sigma.view(-1, 1, 1, 1)
    D = net(x + s * eps, sigma, y=y)
    lam = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return lam * ((D - x) ** 2).mean(dim=(1, 2, 3))


def unlearn(
    net,
    names,
    train_x,
    train_y,
    x_hat,
    y_hat,
    *,
    g_retain,
    g_noise,
    loss_null,
    lr,
    B,
    lamb=0.2,
    tolerance=0.05,
    max_steps=None,
    safety_steps=1000,
    bounded=True,
    use_same_noise_train=False,
    P_mean=-1.2,
    P_std=1.2,
    sigma_data=0.5,
):
    """Unlearn x̂ [C, H, W] from a fresh deep copy of `net`. Returns (copy, [(L_r, L_f)], steps,
    stop)."""
    net = copy.deepcopy(net).eval()
    for n, p in net.named_parameters():  # only the trainable parameters change
        p.requires_grad_(n in names)
    params = [p for n, p in net.named_parameters() if n in names]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    N = train_x.shape[0]
    perm, pos, trace, step = None, N, [], 0

    def draw(
        shape,
    ):  # torch's default dtype, as the engine draws: the same numbers for fp64 data too
        sigma = (P_std * torch.randn(shape[0], generator=g_noise) + P_mean).exp()
        return torch.randn(shape, generator=g_noise), sigma

    while True:
        if pos + B > N:  # new epoch; the incomplete last batch is dropped
            perm, pos = torch.randperm(N, generator=g_retain), 0
        idx, pos = perm[pos : pos + B], pos + B
        x_r, y_r = train_x[idx], None if train_y is None else train_y[idx]
        x_f = x_hat.expand_as(x_r)
        y_f = None if y_hat is None else y_hat.expand(B, *y_hat.shape)
        eps_r, sig_r = draw(x_r.shape)
        eps_f, sig_f = (eps_r, sig_r) if use_same_noise_train else draw(x_f.shape)
        L_r = edm_loss(net, x_r, eps_r, sig_r, y_r, sigma_data).mean()
        L_f_i = edm_loss(net, x_f, eps_f, sig_f, y_f, sigma_data)
        L_f = (
            torch.minimum(L_f_i, torch.full_like(L_f_i, loss_null)).mean()
            if bounded
            else L_f_i.mean()
        )
        trace.append((L_r.item(), L_f.item()))
        if max_steps is not None:  # a fixed budget replaces the rule
            if step >= max_steps:
                return net, trace, step, "max_steps"
        elif L_f.item() >= (1 - tolerance) * loss_null:
            return net, trace, step, "rule"
        elif step >= safety_steps:
            return net, trace, step, "cap"
        opt.zero_grad()
        (L_r - lamb * L_f).backward()  # descend on the data, ascend (bounded) on the target
        opt.step()
        step += 1


@torch.no_grad()
def scores(net, net_u, train_x, train_y, bank_eps, bank_sigma, eps=1e-3, sigma_data=0.5):
    """score[j] = mean_m (L_u − L_t)/(L_u + L_t + eps), both models on the same (ε_m, σ_m) for every
    j."""
    N, M = train_x.shape[0], bank_sigma.shape[0]
    L_t = torch.empty(N, M, dtype=torch.float64)
    L_u = torch.empty(N, M, dtype=torch.float64)
    for m in range(M):
        e = bank_eps[m].expand_as(train_x)
        s = bank_sigma[m].expand(N)
        L_t[:, m] = edm_loss(net, train_x, e, s, train_y, sigma_data)
        L_u[:, m] = edm_loss(net_u, train_x, e, s, train_y, sigma_data)
    return ((L_u - L_t) / (L_u + L_t + eps)).mean(1)
