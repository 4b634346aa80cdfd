"""The reference's algorithm replayed on resident data (`fast=False`): its DataLoaders (stand-in
`ResidentLoader`), its noise draws, its unlearning loop, its L_null and t_sched estimates, all
drawing from the one global RNG stream in the reference's program order, so that for a given
seed a run reproduces the reference's stream bit for bit. The loaders are real DataLoaders over
dataset positions passed through the caller's `fabric.setup_dataloaders`, as the reference passes
its own: under Lightning's distributed strategies (attrib.py's DDPStrategy, even with one process)
that swaps in a DistributedSampler (seed PL_GLOBAL_SEED, epoch = iteration count, each rank's
padded shard) and removes the sampler's global-RNG draw; the replay follows whatever it does.
With several processes each rank scores its shard as the reference's ranks do, and every rank
returns all shards (`gather_shards`). The math is the engine's:
the objective is `unlearn.mirrored_objective`, the stop rule `unlearn.stop_reason`, the score
`score.skew_scores`; what is the reference's own here is where every random number comes from.

`ReferenceReplay` holds the reference's public methods (its signatures) and is mixed into the
drop-in's Attributor, whose reference arguments (`self.num_noises`, `self.loss_null`, ...) it reads.
"""

from __future__ import annotations

import copy

import torch

from ..config import MUCSConfig
from ..denoisers import edm_weight
from ..noise import karras_sigma, t_sched_from_distances
from ..score import autocast_for, skew_scores
from ..unlearn import check_loss_null, mirrored_objective, stop_reason
from .reference_conf import reference_optimizer, sampler_range
from .reference_models import build_null_model


def inference_images(batch_size: int, num_noises: int) -> int:
    """Training images per inference batch of the reference: 16·B // M (at least 1), B the
    unlearning batch size and M the number of noises: 16·B (image, noise) pairs per forward."""
    return max(1, 16 * int(batch_size) // int(num_noises))


class _Positions(torch.utils.data.Dataset):
    """Dataset positions 0..N-1: what the replay's DataLoaders yield, so that a real DataLoader,
    and whatever `fabric.setup_dataloaders` makes of it, decides the order, the sharding and the
    global-RNG draws, while the images stay resident."""

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class ResidentLoader:
    """Batches (idx, x, y) of in-memory tensors in the order of a real DataLoader over dataset
    positions, standing in for the reference's DataLoaders.

    `positions`: the DataLoader (possibly returned by `fabric.setup_dataloaders`) whose batches
    are position tensors; None builds `DataLoader(shuffle=..., drop_last=...)` without a
    generator, which draws from the global RNG as the reference's loaders do (one int64 per
    iterator, the workers' base seed, and one more seeding a RandomSampler). Lightning's
    distributed strategies swap in a DistributedSampler (seed = PL_GLOBAL_SEED, epoch = the
    number of earlier iterations, this rank's shard, padded): using the loader it returns
    replays exactly that. Worker processes draw nothing from the main process's stream, so the
    replay reads in-process. Only `.dataset` of the original loader is kept (the reference's null
    model reads `dl.dataset.meta`)."""

    def __init__(
        self,
        dataset,
        ids,
        x,
        y,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        device=None,
        positions=None,
    ):
        self.dataset = dataset
        self.ids, self.x, self.y = ids, x, y
        self.batch_size, self.shuffle, self.drop_last = int(batch_size), shuffle, drop_last
        self.device = device
        if positions is None:
            positions = torch.utils.data.DataLoader(
                _Positions(x.shape[0]),
                batch_size=self.batch_size,
                shuffle=shuffle,
                drop_last=drop_last,
            )
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self):
        for p in self.positions:
            p = torch.as_tensor(p).to(self.x.device)
            batch = (self.ids[p], self.x[p], self.y[p])
            yield tuple(t.to(self.device) for t in batch) if self.device is not None else batch


def reference_loaders(fabric, dataset, data, n_infer: int, batch_size: int, device):
    """(inference loader, unlearning loader) as the reference's run() makes them: DataLoaders
    over the training set (inference: n_infer images, in order; unlearning: batch_size,
    shuffled, drop_last) passed together through `fabric.setup_dataloaders`, on resident data."""
    ids, x, y = data
    pos = _Positions(x.shape[0])
    dl_inference = torch.utils.data.DataLoader(pos, batch_size=n_infer, shuffle=False)
    dl_unlearn = torch.utils.data.DataLoader(
        pos, batch_size=batch_size, shuffle=True, drop_last=True
    )
    setup = getattr(fabric, "setup_dataloaders", None)
    if setup is not None:
        dl_inference, dl_unlearn = setup(dl_inference, dl_unlearn)
    return (
        ResidentLoader(dataset, ids, x, y, n_infer, False, False, device, dl_inference),
        ResidentLoader(dataset, ids, x, y, batch_size, True, True, device, dl_unlearn),
    )


def gather_shards(all_idx: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor):
    """(all ids [N] in dataset order, scores [Ng, N]) from every rank's (ids [n], scores [Ng, n])
    of its inference shard (a DistributedSampler's: equal sizes, strided, padded with repeats).
    Each image keeps the score of its first occurrence in sampler order, the one the reference's
    rank that owns it computed; without a process group (or one rank) the input is returned."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return all_idx, scores
    world = dist.get_world_size()
    idx_parts = [torch.empty_like(all_idx) for _ in range(world)]
    score_parts = [torch.empty_like(scores) for _ in range(world)]
    dist.all_gather(idx_parts, all_idx.contiguous())
    dist.all_gather(score_parts, scores.contiguous())
    # sampler order: the k-th item of rank r is item k·world + r of the padded list
    idx = torch.stack(idx_parts, 1).reshape(-1).cpu()
    sc = torch.stack(score_parts, 2).reshape(scores.shape[0], -1)
    first = {}
    for j, i in enumerate(idx.tolist()):
        first.setdefault(i, j)
    missing = set(ids.tolist()) - first.keys()
    if missing:
        raise RuntimeError(f"fast=False: {len(missing)} training images scored on no rank")
    cols = torch.tensor([first[i] for i in ids.tolist()], dtype=torch.int64)
    return ids.clone(), sc[:, cols.to(sc.device)]


class ReferenceReplay:
    """The reference Attributor's methods on the global RNG stream (mixed into the drop-in)."""

    def _run_reference(self, dataset, data, xgen, ygen):
        """The reference's run() on resident data, same global RNG draws in the same order:
        (all ids [Nt], scores [Ng, Nt], stop reason per target)."""
        n_infer = inference_images(self.batch_size, self.num_noises)
        dl_inference, dl_unlearn = reference_loaders(
            self.fabric, dataset, data, n_infer, self.batch_size, self._dev
        )
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
        # several processes: each rank scored its shard, as the reference's ranks do; every rank
        # returns all of them (the reference returns only its own)
        all_idx, scores = gather_shards(all_idx, self.compute_scores(loss_t, loss_u), data[0])
        return all_idx, scores, list(self._stops)

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
            sigma = karras_sigma(s, sigma_min, sigma_max, rho)[: size[0]]
        noise = sigma.view(-1, 1, 1, 1) * torch.randn(list(size), device=dev)
        return noise, sigma

    def get_model_pred(self, model, x, n, s, y, a=None):
        return model(x + n, s, y=y, a=a)

    def get_model_loss(self, x, xhat, s, reduction="pixels"):
        """λ(σ)·(xhat − x)², λ(σ) = (σ² + σ_d²)/(σ·σ_d)²; reduction "pixels" (per sample), "mean"
        or None/"none"."""
        sd = self.module.sigma_data
        w = edm_weight(s, sd).view(-1, 1, 1, 1)
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
        return t_sched_from_distances(distances, sigma, qtl)

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
        return check_loss_null(loss_null)
