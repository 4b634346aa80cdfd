"""`mucs-fast attribute` on the reference implementation's files.

    mucs-fast attribute --reference-samples samples.pt --reference-data DATA_DIR --model M --out DIR
                        [--num-attrib N] [--reference-split train] [--attrib-ids PATH]
                        [--reference-code CHECKOUT [--reference-weights ema|model]] [...]

Targets: the first N generated images of `samples.pt` (and their labels); training set: a split of
the reference's dataset folder, loaded once. `--model` is any model `mucs-fast attribute` takes, or
the reference's own checkpoint (`checkpoint_best.ckpt`, `configuration.yaml` beside it) when
`--reference-code` names the reference checkout whose `models/` define it. Writes the mucs_fast
result directory and the reference's `attrib-ids.pt` / `attrib-ids_all.pt`.
"""

from __future__ import annotations

import os
import time

from ..cli_common import attribute_config, check_top_k, load_model, print_summary
from ..engine import attribute
from ..parallel import rank_world
from ..report import write_report
from .reference import load_reference_model, save_attrib_ids
from .reference_files import load_dataset, load_metadata, load_samples


def add_reference_arguments(parser) -> None:
    g = parser.add_argument_group("reference implementation files (instead of --train/--targets)")
    g.add_argument(
        "--reference-samples",
        default=None,
        metavar="SAMPLES_PT",
        help="the reference's samples.pt: the first --num-attrib generated images are the targets",
    )
    g.add_argument(
        "--reference-data",
        default=None,
        metavar="DIR",
        help="the reference's dataset folder (metadata.pt, pt_files/): the training set",
    )
    g.add_argument(
        "--reference-split", default="train", help="split of --reference-data (default: train)"
    )
    g.add_argument(
        "--num-attrib",
        type=int,
        default=100,
        help="targets: the first N rows of --reference-samples (default 100, as attrib.py)",
    )
    g.add_argument(
        "--attrib-ids",
        default=None,
        metavar="PATH",
        help="where to write the reference's attrib-ids.pt (+ _all.pt); default: "
        "<out>/attrib-ids.pt",
    )
    g.add_argument(
        "--reference-code",
        default=None,
        metavar="CHECKOUT",
        help="reference checkout defining models/: --model is then one of its checkpoints",
    )
    g.add_argument(
        "--reference-weights",
        default="ema",
        choices=("ema", "model"),
        help="which weights of a reference checkpoint (default: ema, as attrib.py)",
    )


def uses_reference_files(args) -> bool:
    return bool(getattr(args, "reference_samples", None) or getattr(args, "reference_data", None))


def cmd_attribute_reference(args) -> int:

    if not (args.reference_samples and args.reference_data):
        raise ValueError(
            "--reference-samples and --reference-data go together (targets and training set)"
        )
    if args.num_attrib < 1:
        raise ValueError(f"--num-attrib must be >= 1, got {args.num_attrib}")
    cfg = attribute_config(args)  # --out, --device, --loss-null, ... before anything is read
    samples = load_samples(args.reference_samples)
    targets = samples.xgen[: args.num_attrib].float()
    target_labels = samples.y[: args.num_attrib]
    ids, train, train_labels = load_dataset(args.reference_data, args.reference_split)
    top_k = args.top_k or min(100, train.shape[0])
    check_top_k(top_k, train.shape[0])
    if args.reference_code:
        den = load_reference_model(
            args.model,
            args.reference_code,
            load_metadata(args.reference_data),
            which=args.reference_weights,
        )
    else:
        den = load_model(args.model, trust_pickle=args.trust_pickle)
    if not den.conditional:
        train_labels = target_labels = None
    meta = {
        "reference_files": {
            "samples": os.path.abspath(args.reference_samples),
            "data": os.path.abspath(args.reference_data),
            "split": args.reference_split,
            "num_attrib": int(targets.shape[0]),
        }
    }
    t0 = time.perf_counter()
    res = attribute(
        den,
        train,
        targets,
        cfg,
        train_labels=train_labels,
        target_labels=target_labels,
        train_ids=ids,
        device=args.device,
        progress=not args.quiet,
        run_dir=args.out,
        resume=args.resume,
        top_k=top_k,
        meta=meta,
    )
    if rank_world()[0] == 0:
        fn = args.attrib_ids or os.path.join(args.out, "attrib-ids.pt")
        save_attrib_ids(fn, res.topk(top_k), res.train_ids, res.scores)
        write_report(os.path.join(args.out, "report.png"), targets, train, res, top=min(8, res.N))
        print_summary(res, args.out, time.perf_counter() - t0)
    return 0
