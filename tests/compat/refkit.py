"""Stand-ins for the reference implementation's surroundings (no reference code): a duck-typed
Lightning Fabric, a Fabric-style module wrapper, its config object and an in-memory dataset with
its item format `(idx, x [C, H, W] in [-1, 1], y [label_dim])`."""

import contextlib
import random
from types import SimpleNamespace

import torch


class FakeFabric:
    """The Fabric methods the reference's attrib.py and Attributor call."""

    def __init__(self, device="cpu", rank=0):
        self.device = device
        self.global_rank = rank
        self.is_global_zero = rank == 0
        self.calls = []

    def seed_everything(self, seed, workers=False):
        self.calls.append(("seed_everything", seed, workers))
        random.seed(seed)
        torch.manual_seed(seed)

    def setup_dataloaders(self, *dls):
        return dls[0] if len(dls) == 1 else dls

    def setup_optimizers(self, optim):
        self.calls.append(("setup_optimizers",))
        return optim

    def backward(self, loss):
        loss.backward()

    def init_module(self):
        return contextlib.nullcontext()

    def setup(self, model):
        return Wrapped(model)

    def print(self, *a, **k):
        pass

    def barrier(self):
        pass


class Wrapped(torch.nn.Module):
    """Like Lightning's _FabricModule: `.module` is the raw module, attributes fall through."""

    def __init__(self, module):
        super().__init__()
        self._forward_module = module

    @property
    def module(self):
        return self._forward_module

    def forward(self, *a, **k):
        return self._forward_module(*a, **k)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._forward_module, name)


def make_conf(lr=1e-3, wd=0.01, name="adamw", model_name="tiny"):
    return SimpleNamespace(
        training=SimpleNamespace(optim=SimpleNamespace(name=name, lr=lr, wd=wd)),
        model=SimpleNamespace(
            name=model_name, sampler=SimpleNamespace(sigma_min=0.002, sigma_max=80, rho=7)
        ),
    )


class TensorDataset(torch.utils.data.Dataset):
    """The reference's dataset item format; `meta` like its metadata.pt."""

    def __init__(self, ids, x, y):
        self.ids, self.x, self.y = ids, x, y
        self.meta = {
            "image_size": list(x.shape[1:]),
            "label_dim": y.shape[1],
            "num_samples": len(ids),
        }

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i], self.x[i], self.y[i]


def toy_data(N=48, C=1, H=4, label_dim=3, seed=0):
    """Shuffled, non-contiguous dataset ids; images in [-1, 1]; one-hot labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(10 * N, generator=g)[:N] * 3 + 7
    x = torch.rand(N, C, H, H, generator=g) * 2 - 1
    y = torch.nn.functional.one_hot(
        torch.randint(0, label_dim, (N,), generator=g), label_dim
    ).float()
    return ids, x, y
