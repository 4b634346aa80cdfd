"""Drop-in replacement for the reference implementation's `attribution/mucs.py::Attributor`.

In a checkout of the reference (github sony/mucs), a file `attribution/mucs_fast.py` holding

    from mucs_fast.compat.reference import Attributor

makes `python attrib.py --method=mucs_fast ...` and `python pipeline.py ... --attrib=mucs_fast` use
mucs_fast. Constructor, side effects and public methods are the reference's; `run()` executes on
the mucs_fast engine (`mucs_fast.attribute`): training data loaded once and kept on the device, K
targets unlearned together (torch.func) and scored in one pass over the data, no DataLoader workers.

Results follow the reference's semantics (σ grids, trainable set, AdamW from the training config
with lr / lr_factor, the bound and stop rule, bf16 autocast scoring on CUDA, the score formula).
What differs is where the randomness comes from. The reference draws everything from one global
stream seeded by `fabric.seed_everything(seed)`: DataLoader shuffles, the null model's
initialization, the null-loss noise, the inference bank and every unlearning step's noise, in
program order. The engine (default, `fast=True`) gives each its own generator, derived from `seed`:
- inference bank: one CPU generator (ε [M, C, H, W]; the σ grid itself is deterministic);
- L_null: the fresh model's initialization, its retain batches and its noise, one stream each;
- each target: its retain-batch order (CPU) and its training noise (on the device), seeded by
  `seed` and the target's content — a target's scores do not depend on the other targets, their
  order, the batching (K) or the number of processes;
- t_sched="auto": the shuffle of the distance estimate;
- use_same_noise_infer=False: each model's own ε per image (the σ levels of the bank).
So end-to-end scores differ from the reference's as a run with another seed does; the inference
losses for a given noise bank are the same numbers. `fast=False` runs the reference's own
algorithm on the resident data, drawing from the global stream in the reference's order (each
DataLoader iterator's seed draws included), with its loaders set up by the caller's Fabric as the
reference's are (Lightning's DistributedSampler under DDPStrategy: its seed, epochs and shards),
and batching inference as it does (16·B // M images, on every device), for bit-for-bit
comparisons with it; with several processes every rank returns every rank's shard.

Fixed reference defects (defaults otherwise unchanged): t_sched_*="auto" works; max_steps=None
stops at `safety_steps` (warned, reported) instead of possibly looping forever; with several
processes (torch.distributed initialized, world size > 1) the engine splits the work over the ranks
(mucs_fast.parallel) and every rank returns the full result (the reference scores only each rank's
shard and every rank writes the same files); omegaconf objects in
checkpoints load with weights_only=True (`load_checkpoint`, `omegaconf_safe_globals`).

This module is the import path of that one-line file; it re-exports the drop-in's pieces:
`attributor` (the Attributor: constructor, side effects, run() on the engine), `replay` (the
reference's algorithm on its global stream: `ResidentLoader`, the public methods, fast=False),
`distributed` (an alias of `mucs_fast.parallel.rank_world`, kept for scripts that import it: (rank,
world size)), `reference_conf` (its optimizer and sampler config), `reference_models` (its models:
raw module, null model, checkpoints), `reference_files` (its files).
"""

from ..parallel import rank_world as distributed
from .attributor import DEFAULT_TARGETS_PER_BATCH, Attributor, get_topk
from .reference_conf import optimizer_spec
from .reference_files import (
    ReferenceData,
    Samples,
    attrib_ids_all_path,
    center_crop,
    dataset_tensors,
    install_omegaconf_safe_globals,
    load_attrib_ids,
    load_checkpoint,
    load_dataset,
    load_files,
    load_metadata,
    load_samples,
    omegaconf_globals,
    omegaconf_safe_globals,
    save_attrib_ids,
    save_dataset,
    save_samples,
    to_model_range,
)
from .reference_models import load_reference_model, raw_module
from .replay import ResidentLoader

__all__ = [
    "DEFAULT_TARGETS_PER_BATCH",
    "Attributor",
    "ReferenceData",
    "ResidentLoader",
    "Samples",
    "attrib_ids_all_path",
    "center_crop",
    "dataset_tensors",
    "distributed",
    "get_topk",
    "install_omegaconf_safe_globals",
    "load_attrib_ids",
    "load_checkpoint",
    "load_dataset",
    "load_files",
    "load_metadata",
    "load_reference_model",
    "load_samples",
    "omegaconf_globals",
    "omegaconf_safe_globals",
    "optimizer_spec",
    "raw_module",
    "save_attrib_ids",
    "save_dataset",
    "save_samples",
    "to_model_range",
]
