"""One markdown table from a GPU check's results folder (gpu.json, ops.json): what BENCHMARKS.md
quotes."""

import json
import os
import re
import sys


def main(out: str) -> None:
    gpu_path, ops_path = os.path.join(out, "gpu.json"), os.path.join(out, "ops.json")
    k_path = os.path.join(
        out, "gpu-ktargets.json"
    )  # run.sh runs the phases separately (headline first)
    if not os.path.isfile(gpu_path) and os.path.isfile(k_path):
        gpu_path = k_path
    if os.path.isfile(gpu_path):
        g = json.load(open(gpu_path))
        if os.path.isfile(k_path):
            g.setdefault("ktargets", json.load(open(k_path)).get("ktargets"))
        print(
            f"### {g['device']} — torch {g['torch']} (CUDA {g['cuda']}), triton {g['triton']}, git "
            f"{g['git']}, "
            f"{g['date']}{' (DRY RUN)' if g.get('dry_run') else ''}\n"
        )
        s = g.get("scoring")
        if s:
            print(
                f"Scoring pass, DiT {s['model']['width']}×{s['model']['depth']} on "
                f"{tuple(s['model']['image_size'])}: "
                f"{s['flops_per_image'] / 1e9:.2f} GFLOP/image (flop_counter "
                f"{s.get('flops_counter', 0) / 1e9:.2f}, "
                f"analytic incl. attention {s.get('flops_analytic', 0) / 1e9:.2f}; MFU uses the "
                "larger), "
                f"N={s['N']}, M={s['M']}, {s['pairs_per_forward']} pairs/forward\n"
            )
            print(
                "| mode | images·noises/s | TFLOP/s | MFU (790) | CIFAR-10 exact scoring, "
                "min/target (floor 5.2) |"
            )
            print("|---|---|---|---|---|")
            for mode in ("eager", "compiled", "raw"):
                if mode in s:
                    r = s[mode]
                    print(
                        f"| {mode} | {r['pairs_per_s']:,.0f} | {r['tflops']:.1f} | "
                        f"{100 * r['mfu']:.1f} % | "
                        f"{r['scoring_minutes_per_target_cifar']:.2f} |"
                    )
            print()
        k = g.get("ktargets")
        if k:
            print(
                f"K targets, DiT {k['model']['width']}×{k['model']['depth']} on "
                f"{tuple(k['model']['image_size'])}, "
                f"B={k['B']}, {k['steps']} steps, {k['trainable']:,} trainable weights per target\n"
            )
            print("| run | target·steps/s | × K=1 |")
            print("|---|---|---|")
            for key, r in k.items():
                if key.startswith("batched_K"):
                    print(
                        f"| unlearn_batched K={key[9:]} | {r['target_steps_per_s']:.1f} | "
                        f"{r['speedup_vs_K1']:.2f} |"
                    )
            print("\n| stacked scoring | images·noises·models/s | × K=1 |")
            print("|---|---|---|")
            for key, r in k.items():
                if key.startswith("score_K"):
                    print(
                        f"| K={key[7:]} | {r['pairs_models_per_s']:,.0f} | "
                        f"{r['speedup_vs_K1']:.2f} |"
                    )
            print()
    if os.path.isfile(ops_path):
        print(op_table(json.load(open(ops_path)).get("benchmarks", [])))


PROVIDER_ORDER = ("reference", "compiled", "op", "triton", "cuda")


def op_table(benchmarks: list) -> str:
    """One row per (op, case), one column per provider: median µs, and GB/s / % of peak of the
    fastest."""
    rows: dict = {}
    for b in benchmarks:
        m = re.match(r"test_(\w+)\[(.*)\]$", b["name"])
        if not m:
            continue
        parts = m.group(2).split("-")
        provider, case = parts[-1], "-".join(p.replace("torch.", "") for p in parts[:-1])
        rows.setdefault((m.group(1), case), {})[provider] = b
    present = [p for p in PROVIDER_ORDER if any(p in r for r in rows.values())]
    out = [
        "| op | case | " + " | ".join(f"{p} µs" for p in present) + " | best GB/s | % of peak |",
        "|---|---|" + "---|" * (len(present) + 2),
    ]
    for (op, case), r in rows.items():
        med = {p: r[p]["stats"]["median"] * 1e6 for p in present if p in r}
        best = min(med, key=med.get)
        ei = r[best].get("extra_info", {})
        cells = [f"{med[p]:.1f}" if p in med else "" for p in present]
        out.append(
            f"| {op} | {case} | "
            + " | ".join(cells)
            + f" | {ei.get('GB/s', '')} ({best}) | {ei.get('pct_of_peak_bandwidth', '')} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
