"""The reference's algorithm replayed on resident data (`fast=False`): its DataLoaders (stand-in
`ResidentLoader`), its noise draws, its unlearning loop, its L_null and t_sched estimates, all
drawing from the one global RNG stream in the reference's program order, so that for a given
seed a run reproduces the reference's stream bit for bit. The math is the engine's:
the objective is `unlearn.mirrored_objective`, the stop rule `unlearn.stop_reason`, the score
`score.skew_scores`; what is the reference's own here is where every random number comes from.

`ReferenceReplay` holds the reference's public methods (its signatures) and is mixed into the
drop-in's Attributor, whose reference arguments (`self.num_noises`, `self.loss_null`, ...) it reads.
"""

from __future__ import annotations

import copy
import math

import torch

from ..config import MUCSConfig
from ..score import autocast_for, skew_scores
from ..unlearn import mirrored_objective, stop_reason
from .reference_conf import reference_optimizer, sampler_range
from .reference_models import build_null_model


def inference_images(batch_size: int, num_noises: int) -> int:
    """Training images per inference batch of the reference: 16·B // M (at least 1), B the
    unlearning batch size and M the number of noises: 16·B (image, noise) pairs per forward."""
    return max(1, 16 * int(batch_size) // int(num_noises))


class ResidentLoader:
    """Batches (idx, x, y) of in-memory tensors, standing in for the reference's DataLoaders.

    It consumes the global RNG exactly as `torch.utils.data.DataLoader(shuffle=..., generator=None)`
    does: one int64 draw per iterator (the workers' base seed) and, when shuffling, one more that
    seeds the sampler's private generator for the permutation. Only `.dataset` of the original
    loader is kept (the reference's null model reads `dl.dataset.meta`)."""

    def __init__(
        self, dataset, ids, x, y, batch_size: int, shuffle: bool, drop_last: bool, device=None
    ):
        self.dataset = dataset
        self.ids, self.x, self.y = ids, x, y
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), shuffle, drop_last
        self.device = device

    def __len__(self) -> int:
        N = self.x.shape[0]
        return N // self.batch_size if self.drop_last else -(-N // self.batch_size)

    def __iter__(self):
        torch.empty((), dtype=torch.int64).random_()  # DataLoader iterator: workers' base seed
        return self._batches()

    def _batches(self):
        N = self.x.shape[0]
        if self.shuffle:  # RandomSampler without a generator: seeded from the global RNG
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        else:
            order = None
        for b in range(len(self)):
            sl = slice(b * self.batch_size, min(N, (b + 1) * self.batch_size))
            p = order[sl] if order is not None else sl
            batch = (self.ids[p], self.x[p], self.y[p])
            yield tuple(t.to(self.device) for t in batch) if self.device is not None else batch


class ReferenceReplay:
    """The reference Attributor's methods on the global RNG stream (mixed into the drop-in)."""

    def _run_reference(self, dataset, data, xgen, ygen):
        """The reference's run() on resident data, same global RNG draws in the same order:
        (all ids [Nt], scores [Ng, Nt], stop reason per target)."""
        ids, x, y = data
        n_infer = inference_images(self.batch_size, self.num_noises)
        dl_inference = ResidentLoader(dataset, ids, x, y, n_infer, False, False, self._dev)
        dl_unlearn = ResidentLoader(dataset, ids, x, y, self.batch_size, True, True, self._dev)
        if self.t_sched_train == "auto" or self.t_sched_infer == "auto":
            tmp = self.estimate_t_sched(dl_unlearn)
            if self.t_sched_train == "auto":
                self.t_sched_train = tmp
            if self.t_sched_infer == "auto":
                self.t_sched_infer = tmp
        if self.loss_null == "auto":
            self.loss_null = self.estimate_null_loss(dl_unlearn)
        model = copy.deepcopy(self.module).to(self._dev)
        all_idx, loss_t, noiseinfo = self.compute_inference_losses(model, dl_inference)
        loss_t = loss_t.unsqueeze(0)
        loss_u = []
        self._stops = []
        for i in range(len(xgen)):
            model = copy.deepcopy(self.module).to(self._dev)
            model = self.compute_unlearning(
                model, dl_unlearn, xgen[i].to(self._dev), ygen[i].to(self._dev)
            )
            _, losses, _ = self.compute_inference_losses(model, dl_inference, noiseinfo=noiseinfo)
            loss_u.append(losses)
        loss_u = torch.stack(loss_u, dim=0)
        return all_idx, self.compute_scores(loss_t, loss_u), list(self._stops)

    ###########################################################################

    def compute_inference_losses(self, model, dl, noiseinfo=None, force_y=None):
        """(idxs [Nt], losses [Nt, M] fp32, noiseinfo (noise σ·ε [M, C, H, W], σ [M])) of `model`
        on every batch of `dl`, batch layout "(n b)" (noise-major) as the reference."""
        with torch.inference_mode(), autocast_for(self._dev, self.precision):
            if noiseinfo is None:
                for batch in dl:
                    x = batch[1]
                    break
                noiseinfo = self.get_noise_info([self.num_noises] + list(x.size()[1:]))
            model.eval()
            noise, sigma = noiseinfo
            M = len(noise)
            idxs, losses = [], []
            for batch in dl:
                idx, x, y = batch[:3]
                x, y = x.to(self._dev), y.to(self._dev)
                bsz = len(x)
                xx = x.repeat(M, *([1] * (x.dim() - 1)))
                yy = y.repeat(M, *([1] * (y.dim() - 1)))
                if force_y is not None:
                    yy = force_y.to(self._dev).unsqueeze(0).expand(len(yy), *force_y.shape)
                if self.use_same_noise_infer:
                    n = noise.repeat_interleave(bsz, 0)
                    s = sigma.repeat_interleave(bsz)
                else:
                    n, s = self.get_noise_info(xx.size())
                xhat = self.get_model_pred(model, xx, n, s, yy)
                loss = self.get_model_loss(xx, xhat, s).float()
                idxs.append(torch.as_tensor(idx))
                losses.append(loss.view(M, bsz).t())
            return torch.cat(idxs, dim=0), torch.cat(losses, dim=0), noiseinfo

    def compute_unlearning(self, model, dl, xgen_i, ygen_i):
        """Mirrored bounded unlearning of one target on `model` (in place; returned), batches from
        `dl`, noise from the global RNG — the reference's loop, with a safety cap when
        max_steps=None (`self.safety_steps`, warned). Instance weights scale the retain losses
        per sample before the mean, as the reference."""
        if not isinstance(self.loss_null, (int, float)):
            raise ValueError(  # noqa: TRY004  ("auto" is a valid value, just not here)
                f"compute_unlearning needs a numeric loss_null (got {self.loss_null!r}): "
                "call estimate_null_loss(dl) first or pass loss_null=<number>"
            )
        model.eval()
        optim = reference_optimizer(self.conf.training.optim, model.parameters())
        if hasattr(self.fabric, "setup_optimizers"):
            optim = self.fabric.setup_optimizers(optim)
        for name, pars in model.named_parameters():
            pars.requires_grad = not self.is_frozen_param(name)
        cfg = MUCSConfig(
            tolerance=self.tol, max_steps=self.max_steps, safety_steps=self.safety_steps
        )
        step = 0
        while True:
            for batch in dl:
                xr, yr = batch[1].to(self._dev), batch[2].to(self._dev)
                ar = af = None
                xf = xgen_i.unsqueeze(0).expand(len(xr), *xgen_i.shape)
                yf = ygen_i.unsqueeze(0).expand(len(xr), *ygen_i.shape)
                if self.use_aug:
                    xr, ar = self.get_augmentations(xr)
                    xf, af = self.get_augmentations(xf)
                wr = (
                    self.get_instance_weight(dl.dataset, xr, yr, xf, yf).clone()
                    if self.use_instance_weights
                    else 1
                )
                nr, sr = self.get_noise_info(xr.size(), training=True)
                if self.use_same_noise_train:
                    nf, sf = nr, sr
                else:
                    nf, sf = self.get_noise_info(xf.size(), training=True)
                xrhat = self.get_model_pred(model, xr, nr, sr, yr, a=ar)
                xfhat = self.get_model_pred(model, xf, nf, sf, yf, a=af)
                _, lf, loss = mirrored_objective(
                    wr * self.get_model_loss(xr, xrhat, sr),
                    self.get_model_loss(xf, xfhat, sf),
                    self.loss_null,
                    self.lamb,
                )
                reason = stop_reason(step, float(lf.detach()), self.loss_null, cfg)
                if reason is not None:
                    self._stops = getattr(self, "_stops", []) + [reason]
                    return model
                optim.zero_grad(set_to_none=True)
                if hasattr(self.fabric, "backward"):
                    self.fabric.backward(loss)
                else:
                    loss.backward()
                optim.step()
                step += 1

    def compute_scores(self, loss_t, loss_u):
        """scores [Ng, Nt] from loss_t [1, Nt, M] and loss_u [Ng, Nt, M] (the score formula)."""
        return skew_scores(
            loss_u,
            loss_t[0],
            eps=self.eps,
            use_loss_ratio=self.use_loss_ratio,
            use_same_noise_infer=self.use_same_noise_infer,
        )

    ###########################################################################

    @torch.inference_mode()
    def get_augmentations(self, x):
        x, a = self.augment(x)
        return x, a

    @torch.inference_mode()
    def get_instance_weight(self, ds, xi, yi, xg, yg, q=0.1):
        """The reference's instance weights (use_instance_weights=True; its lib.image_metrics)."""
        sim = self.image_sim_calc(ds.denormalize(xi), ds.denormalize(xg))
        if not getattr(self.module, "unconditional", True):
            sim += torch.nn.functional.cosine_similarity(yi, yg, dim=-1).clamp(min=0).sqrt()
        thres = torch.quantile(sim, 1 - q)
        weight = (sim <= thres).float()
        return weight / weight.mean()

    @torch.inference_mode()
    def get_noise_info(self, size, training=False):
        """(noise σ·ε [size], σ [size[0]]) from the global RNG, as the reference draws them:
        t_sched None: ln σ ~ N(P_mean, P_std²); else the first size[0] of int(size[0] / t_sched)
        Karras levels (training: sorted uniform positions; inference: evenly spaced)."""
        t_sched = self.t_sched_train if training else self.t_sched_infer
        dev = self._dev
        if t_sched is None:
            s = torch.randn(size[0], device=dev)
            sigma = (self.module.sigma_P_std * s + self.module.sigma_P_mean).exp()
        else:
            num = int(size[0] / t_sched)
            if training:
                s = torch.rand(num, device=dev).sort(descending=False).values
            else:
                s = torch.linspace(0, 1, num, device=dev)
            sigma_min, sigma_max, rho = sampler_range(self.conf)
            sigma = (
                sigma_max ** (1 / rho) + s * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
            ) ** rho
            sigma = sigma[: size[0]]
        noise = sigma.view(-1, 1, 1, 1) * torch.randn(list(size), device=dev)
        return noise, sigma

    def get_model_pred(self, model, x, n, s, y, a=None):
        return model(x + n, s, y=y, a=a)

    def get_model_loss(self, x, xhat, s, reduction="pixels"):
        """λ(σ)·(xhat − x)², λ(σ) = (σ² + σ_d²)/(σ·σ_d)²; reduction "pixels" (per sample), "mean"
        or None/"none"."""
        sd = self.module.sigma_data
        w = ((s**2 + sd**2) / (s * sd) ** 2).view(-1, 1, 1, 1)
        loss = w * (xhat - x).pow(2)
        if reduction is None or reduction == "none":
            return loss
        if reduction == "mean":
            return loss.mean()
        if reduction == "pixels":
            return loss.mean((-1, -2, -3))
        raise NotImplementedError(reduction)

    def is_frozen_param(self, name):
        return any(txt in name for txt in self.frozen_params)

    ###########################################################################

    @torch.inference_mode()
    def estimate_t_sched(self, dl, num_consec=3, qtl=0.05):
        """Fraction of the full σ grid above half the `qtl` quantile of normalized Euclidean
        distances between each batch of `dl` and its `num_consec` predecessors (the reference's
        estimate, which crashes there)."""
        distances, prev_x = [], []
        x = None
        for batch in dl:
            x = batch[1].to(self._dev)
            if prev_x:
                a = x.reshape(len(x), -1).float()
                b = torch.cat(prev_x, dim=0).reshape(-1, a.shape[1]).float()
                dist = torch.cdist(a[None], b[None])[0] / a.shape[1] ** 0.5
                distances.append(dist.reshape(-1).cpu())
            prev_x.append(x)
            if len(prev_x) > num_consec:
                prev_x = prev_x[1:]
        if not distances:
            raise ValueError('t_sched="auto" needs at least two batches of training data')
        distances = torch.sort(torch.cat(distances)).values
        tmp = self.t_sched_train, self.t_sched_infer
        self.t_sched_infer = 1
        try:
            _, sigma = self.get_noise_info([self.num_noises] + list(x.size()[1:]))
        finally:
            self.t_sched_train, self.t_sched_infer = tmp
        threshold = distances[int(qtl * len(distances))] / 2
        return max((sigma.cpu() > threshold).float().mean().item(), 1.0 / self.num_noises)

    @torch.inference_mode()
    def estimate_null_loss(self, dl, num_estimates=200):
        """Mean training-noise loss of a freshly initialized model over up to `num_estimates`
        batches of `dl` (global RNG, as the reference)."""
        init = getattr(self.fabric, "init_module", None)
        if init is not None:
            with init():
                model = build_null_model(self.module, self.method_path, dl.dataset)
        else:
            model = build_null_model(self.module, self.method_path, dl.dataset)
        model = model.to(self._dev).eval()
        losses = []
        for i, batch in enumerate(dl):
            x, y = batch[1].to(self._dev), batch[2].to(self._dev)
            n, s = self.get_noise_info(x.size(), training=True)
            losses.append(self.get_model_loss(x, self.get_model_pred(model, x, n, s, y), s))
            if i + 1 >= num_estimates:
                break
        loss_null = torch.stack(losses, dim=-1).mean().item()
        if not (math.isfinite(loss_null) and loss_null > 0):
            raise ValueError(f"loss_null='auto' gave {loss_null}; pass loss_null=<number>")
        return loss_null
