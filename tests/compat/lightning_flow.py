"""attrib.py's flow inside a real `lightning.Fabric` (run as a script by test_lightning.py, since
`fabric.launch()` starts a process group and, with --devices 2, re-runs this script as rank 1).

The Fabric is built as the reference's attrib.py builds it (CPU accelerator here):
`DDPStrategy(broadcast_buffers=False)`, `fabric.launch()`, the model through `fabric.setup`, the
training loader through `fabric.setup_dataloaders`. Then, on a tiny model, per rank:
- fast: the drop-in's run() on the engine;
- slow: the drop-in's run() with fast=False (the replay on resident data);
- loaders: the replay's public methods driven in the reference's run() order by REAL DataLoaders
  over the dataset, passed through this Fabric's `setup_dataloaders` as the reference passes its
  own (the oracle of the loader mirroring: what the reference's loop would read, batch by batch);
- sampler: the class of the sampler Lightning gave the unlearning loader.
- with --reference PATH (a working copy of github sony/mucs outside this repository, imported
  by benches/dropin/refshim.py): the reference's own Attributor and the replay at a numeric
  L_null (the reference's "auto" reads its '--pre' run's files).
Each rank saves `rank<r>.pt` in --out.

python tests/compat/lightning_flow.py --devices 1 --out DIR [--reference /tmp/mucs-ref]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..")]

import torch  # noqa: E402

M, B, N, K, STEPS = 4, 4, 30, 3, 2  # N: not a multiple of 2 ranks × B (padding, drop_last)


def build_fabric(devices: int):
    import lightning

    torch.use_deterministic_algorithms(True)
    fabric = lightning.Fabric(
        accelerator="cpu",
        devices=devices,
        num_nodes=1,
        strategy=lightning.fabric.strategies.DDPStrategy(broadcast_buffers=False),
        precision="32-true",
    )
    fabric.launch()
    torch.set_num_threads(1)
    return fabric


def attributor(fabric, model, method_path, **kw):
    from refkit import make_conf

    from mucs_fast.compat.reference import Attributor

    kw = {
        "num_noises": M,
        "batch_size": B,
        "max_steps": STEPS,
        "loss_null": "auto",
        "progress": False,
        "targets_per_batch": 2,
        **kw,
    }
    return Attributor(make_conf(), fabric, model, method_path, device=fabric.device, **kw)


def loader_flow(att, dataset, xgen, ygen):
    """The reference's run() order over real DataLoaders set up by the Fabric, calling the
    drop-in's public methods: (all ids, scores, sampler class name)."""
    from mucs_fast.compat.replay import inference_images

    dl_inference = torch.utils.data.DataLoader(
        dataset, batch_size=inference_images(att.batch_size, att.num_noises), shuffle=False
    )
    dl_unlearn = torch.utils.data.DataLoader(
        dataset, batch_size=att.batch_size, shuffle=True, drop_last=True
    )
    dl_inference, dl_unlearn = att.fabric.setup_dataloaders(dl_inference, dl_unlearn)
    att.loss_null = att.estimate_null_loss(dl_unlearn)
    model = copy.deepcopy(att.module)
    all_idx, loss_t, noiseinfo = att.compute_inference_losses(model, dl_inference)
    loss_u = []
    for i in range(len(xgen)):
        model = att.compute_unlearning(copy.deepcopy(att.module), dl_unlearn, xgen[i], ygen[i])
        loss_u.append(att.compute_inference_losses(model, dl_inference, noiseinfo=noiseinfo)[1])
    scores = att.compute_scores(loss_t.unsqueeze(0), torch.stack(loss_u))
    return all_idx, scores, type(dl_unlearn.sampler).__name__


def reference_runs(path, fabric, model, method_path, dl_train, xgen, ygen):
    """{"ref": (all ids, scores) of the reference's Attributor, "slow": the replay's}, both at
    loss_null=1.2 (the reference's loaders with 2 workers instead of its 8: 2 CPU cores)."""
    from refkit import make_conf

    sys.path.insert(0, os.path.join(HERE, "..", "..", "benches", "dropin"))
    import refshim

    mucs, _, _ = refshim.import_reference(path)
    kw = {"num_noises": M, "batch_size": B, "max_steps": STEPS, "loss_null": 1.2}
    with refshim.loader_workers(2):
        ref = mucs.Attributor(make_conf(), fabric, model, method_path, device=fabric.device, **kw)
        _, ref_idx, ref_scores = ref.run(dl_train, xgen, ygen, {}, 5)
    att = attributor(fabric, model, method_path, fast=False, **kw)
    _, idx, scores = att.run(dl_train, xgen, ygen, {}, 5)
    return {"ref": (ref_idx.cpu(), ref_scores.float().cpu()), "slow": (idx, scores)}


def main(argv=None):
    from nets import TinyEDMNet
    from refkit import TensorDataset, toy_data

    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--reference", default=None)
    args = p.parse_args(argv)
    fabric = build_fabric(args.devices)
    ids, x, y = toy_data(N=N, C=1, H=4, label_dim=3)
    ds = TensorDataset(ids, x, y)
    dl_train = fabric.setup_dataloaders(torch.utils.data.DataLoader(ds, batch_size=8))
    torch.manual_seed(2)
    with fabric.init_module():
        net = TinyEDMNet(C=1, label_dim=3, width=8)
    model = fabric.setup(net)
    xgen, ygen = x[:K] * 0.7, y[:K]
    method_path = "/nonexistent/job--post"  # loss_null="auto": TinyEDMNet rebuilds from .args
    out = {"world": fabric.world_size, "rank": fabric.global_rank}
    for name, kw in (("fast", {}), ("slow", {"fast": False})):
        att = attributor(fabric, model, method_path, **kw)
        top, all_idx, scores = att.run(dl_train, xgen, ygen, {}, 5)
        out[name] = {"top": top, "all_idx": all_idx, "scores": scores, "loss_null": att.loss_null}
    att = attributor(fabric, model, method_path, fast=False)
    all_idx, scores, sampler = loader_flow(att, dl_train.dataset, xgen, ygen)
    out["loaders"] = {"all_idx": all_idx, "scores": scores, "loss_null": att.loss_null}
    out["sampler"] = sampler
    if args.reference:
        out["reference"] = reference_runs(
            args.reference, fabric, model, method_path, dl_train, xgen, ygen
        )
    torch.save(out, os.path.join(args.out, f"rank{fabric.global_rank}.pt"))
    fabric.barrier()


if __name__ == "__main__":
    main()
