"""`make results`: every method x target x seed on DigitsDA and the shift styles.

Targets: the four DigitsDA domains leave-one-domain-out (sources: the other three), and the
shift styles `lcd` and `dotmatrix` (adapt/shift.py) as held-out targets with the four
DigitsDA domains as sources. The data tree holds all six (`mp2a data digits --domains …`).
Writes docs/RESULTS.md (mean ± std per target, the DigitsDA average, every seed in
docs/results.json) and docs/results.png. Zero-shot and transductive have no randomness, so
they run once per target. Features are cached: the image tower runs once per domain.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from adapt.digits import DOMAINS
from adapt.run import METHODS, AdaptRequest, adapt
from adapt.shift import SHIFT_DOMAINS

log = logging.getLogger(__name__)
TARGETS = DOMAINS + SHIFT_DOMAINS
DETERMINISTIC = ("zeroshot", "transductive")


def sources_for(target: str) -> tuple[str, ...]:
    """Leave-one-domain-out within DigitsDA; the shift styles adapt from all four."""
    return tuple(d for d in DOMAINS if d != target)


def run_table(data: Path, runs: Path, cache: Path, seeds: list[int]) -> dict:
    acc: dict[str, dict[str, list[float]]] = {m: {t: [] for t in TARGETS} for m in METHODS}
    stages: dict[str, list[dict]] = {}
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    heads: dict[str, list[dict]] = {}  # the prototype rows' fit, per method/target and seed
    for target in TARGETS:
        for method in METHODS:
            for seed in seeds if method not in DETERMINISTIC else seeds[:1]:
                m = adapt(
                    AdaptRequest(
                        data=data,
                        target=target,
                        out=runs / f"{method}-{target}-s{seed}",
                        method=method,
                        sources=sources_for(target),
                        seed=seed,
                        cache_dir=cache,
                        progress=False,
                    )
                )
                acc[method][target].append(m["target_accuracy"])
                seconds[method].append(m["seconds"])
                if seed == seeds[0] and m["per_stage"]:
                    stages[f"{method}/{target}"] = m["per_stage"]
                if m.get("head"):
                    heads.setdefault(f"{method}/{target}", []).append(m["head"])
                log.warning("%s %s seed %d: %.4f", method, target, seed, m["target_accuracy"])
    return {
        "accuracy": acc,
        "per_stage": stages,
        "seconds": seconds,
        "heads": heads,
        "seeds": seeds,
    }


def _avg(acc: dict, method: str, targets: tuple[str, ...]) -> list[float]:
    """The average over `targets`, per seed (deterministic methods repeat their one run)."""
    n = max(len(acc[method][t]) for t in targets)
    return list(np.mean([np.resize(acc[method][t], n) for t in targets], axis=0))


def _fmt(xs: list[float]) -> str:
    a = 100 * np.asarray(xs)
    return f"{a.mean():.1f} ± {a.std():.1f}" if len(a) > 1 else f"{a.mean():.1f}"


def markdown(res: dict, total_seconds: float) -> str:
    acc = res["accuracy"]
    lines = [
        "# Results: DigitsDA (leave-one-domain-out) and the shift styles, tiny CLIP",
        "",
        f"Top-1 accuracy on the target (%), mean ± std over seeds {res['seeds']} "
        "(zero-shot and transductive are deterministic: one run). DigitsDA targets adapt from "
        "the other three DigitsDA domains; `lcd` and `dotmatrix` (adapt/shift.py) from all "
        "four. 'DigitsDA avg' averages the four DigitsDA targets per seed. Every run is in "
        "docs/results.json. Produced by `make results` "
        f"in {total_seconds / 60:.1f} min on this machine (2 CPU cores).",
        "",
        "| method | " + " | ".join(TARGETS) + " | DigitsDA avg |",
        "|---|" + "---:|" * (len(TARGETS) + 1),
    ]
    for m in METHODS:
        cells = [_fmt(acc[m][t]) for t in TARGETS]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(_avg(acc, m, DOMAINS))} |")
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
        if method in ("source-only", "mp2a-t"):  # mp2a-t runs mp2a's stages, then refines
            continue
        for r in rows:
            prec = r.get("pseudo_label_precision")
            lines.append(
                f"| {target} | {method} | {r['stage']} | {r['ratio']:.2f} | "
                f"{'-' if prec is None else f'{100 * prec:.1f}'} | {100 * r['accuracy']:.1f} |"
            )
    lines += [
        "",
        "## Refinement (trust region) of the transductive heads",
        "",
        "Per seed: lambda used (1 unless the clusters relabelled more than 20 % of the "
        "head's labels), the fraction relabelled, the prototype row's mixing weight.",
        "",
        "| method / target | lambda | relabelled | prototype weight |",
        "|---|---|---|---|",
    ]
    for key, fits in res.get("heads", {}).items():
        lam = ", ".join(f"{f['kl_weight']:g}" for f in fits)
        rel = ", ".join(f"{100 * f['relabelled']:.1f} %" for f in fits)
        wts = ", ".join(f"{f['prototype_weight']:g}" for f in fits)
        lines.append(f"| {key} | {lam} | {rel} | {wts} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = res["accuracy"]
    fig, ax = plt.subplots(figsize=(10, 3.8), dpi=100)
    width = 0.8 / len(METHODS)
    x = np.arange(len(TARGETS) + 1)
    for i, m in enumerate(METHODS):
        per_seed_avg = np.asarray(_avg(acc, m, DOMAINS))
        means = [100 * np.mean(acc[m][t]) for t in TARGETS] + [100 * per_seed_avg.mean()]
        stds = [100 * np.std(acc[m][t]) for t in TARGETS] + [100 * per_seed_avg.std()]
        offset = (i - (len(METHODS) - 1) / 2) * width
        ax.bar(x + offset, means, width, yerr=stds, label=m, capsize=2)
    ax.set_xticks(x, [*TARGETS, "DigitsDA avg"])
    ax.set_ylabel("target top-1 (%)")
    ax.set_ylim(0, 100)
    ax.legend(ncol=len(METHODS), fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adapt.results")
    p.add_argument("--data", default="data/shift", help="DigitsDA with the shift styles")
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
