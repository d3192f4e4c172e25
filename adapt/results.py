"""`make results`: leave-one-domain-out on DigitsDA, every method x target x seed.

Writes docs/RESULTS.md (mean ± std per target and on average) and docs/results.png.
Zero-shot has no randomness, so it runs once per target. Features are cached, so the image
tower runs once per domain for the whole table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from adapt.run import METHODS, AdaptRequest, adapt

log = logging.getLogger(__name__)
TARGETS = ("printed", "handwritten", "textured", "street")


def run_table(data: Path, runs: Path, cache: Path, seeds: list[int]) -> dict:
    acc: dict[str, dict[str, list[float]]] = {m: {t: [] for t in TARGETS} for m in METHODS}
    stages: dict[str, list[dict]] = {}
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    for target in TARGETS:
        for method in METHODS:
            for seed in seeds if method != "zeroshot" else seeds[:1]:
                m = adapt(
                    AdaptRequest(
                        data=data,
                        target=target,
                        out=runs / f"{method}-{target}-s{seed}",
                        method=method,
                        seed=seed,
                        cache_dir=cache,
                        progress=False,
                    )
                )
                acc[method][target].append(m["target_accuracy"])
                seconds[method].append(m["seconds"])
                if seed == seeds[0] and m["per_stage"]:
                    stages[f"{method}/{target}"] = m["per_stage"]
                log.warning("%s %s seed %d: %.4f", method, target, seed, m["target_accuracy"])
    return {"accuracy": acc, "per_stage": stages, "seconds": seconds, "seeds": seeds}


def _fmt(xs: list[float]) -> str:
    a = 100 * np.asarray(xs)
    return f"{a.mean():.1f} ± {a.std():.1f}" if len(a) > 1 else f"{a.mean():.1f}"


def markdown(res: dict, total_seconds: float) -> str:
    acc = res["accuracy"]
    lines = [
        "# DigitsDA results (leave-one-domain-out, tiny CLIP)",
        "",
        f"Top-1 accuracy on the target (%), mean ± std over seeds {res['seeds']} "
        "(zero-shot is deterministic: one run). Sources: the other three domains. "
        "Produced by `make results` "
        f"in {total_seconds / 60:.1f} min on this machine (2 CPU cores).",
        "",
        "| method | " + " | ".join(TARGETS) + " | average |",
        "|---|" + "---:|" * (len(TARGETS) + 1),
    ]
    for m in METHODS:
        avg = np.mean([acc[m][t] for t in TARGETS], axis=0)  # average per seed
        cells = [_fmt(acc[m][t]) for t in TARGETS]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(list(avg))} |")
    lines += [
        "",
        "Mean seconds per run: "
        + ", ".join(f"{m} {np.mean(res['seconds'][m]):.1f}" for m in METHODS)
        + ".",
        "",
    ]
    lines += [
        f"## Pseudo-labels by stage (seed {res['seeds'][0]})",
        "",
        "| target | method | stage | selected ratio | precision | accuracy after |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, rows in res["per_stage"].items():
        method, target = key.split("/")
        if method == "source-only":
            continue
        for r in rows:
            prec = r.get("pseudo_label_precision")
            lines.append(
                f"| {target} | {method} | {r['stage']} | {r['ratio']:.2f} | "
                f"{'-' if prec is None else f'{100 * prec:.1f}'} | {100 * r['accuracy']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = res["accuracy"]
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=100)
    width = 0.2
    x = np.arange(len(TARGETS) + 1)
    for i, m in enumerate(METHODS):
        per_seed_avg = np.mean([acc[m][t] for t in TARGETS], axis=0)
        means = [100 * np.mean(acc[m][t]) for t in TARGETS] + [100 * per_seed_avg.mean()]
        stds = [100 * np.std(acc[m][t]) for t in TARGETS] + [100 * per_seed_avg.std()]
        ax.bar(x + (i - 1.5) * width, means, width, yerr=stds, label=m, capsize=2)
    ax.set_xticks(x, [*TARGETS, "average"])
    ax.set_ylabel("target top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=4, fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adapt.results")
    p.add_argument("--data", default="data/digits")
    p.add_argument("--runs", default="runs/results")
    p.add_argument("--cache-dir", default="runs/feature-cache")
    p.add_argument("--docs", default="docs")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    t0 = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    res = run_table(Path(args.data), Path(args.runs), Path(args.cache_dir), seeds)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "RESULTS.md").write_text(markdown(res, time.time() - t0))
    (docs / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, docs / "results.png")
    print((docs / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
